"""AIM pre-training: the target, the loss, the prefix mask, the decoder, the loop (learning, exact resume, CLI)."""
import json

import pytest
import torch
from safetensors.torch import load_file

import llamavit
from llamavit.cli import main as cli_main
from llamavit.layers import prefix_causal_mask
from llamavit.objectives import (AutoregressiveObjective, DecoderConfig, PixelDecoder, next_patch_loss,
                                 normalized_targets, patchify, sample_prefix_lengths, unpatchify)
from llamavit.train.pretrain import PretrainConfig, Pretrainer

TINY_AIM = dict(embed_dim=32, depth=2, num_heads=2, patch_size=8, probe_layers=1)
TINY_ILLAMA = dict(embed_dim=32, depth=2, num_heads=2, patch_size=8)


def tiny_cfg(tmp_path, **kwargs):
    base = dict(model="aim_600m_patch14_224", model_kwargs=TINY_AIM, img_size=32, data="synthetic", decoder_dim=32,
                decoder_depth=2, epochs=3, batch_size=16, lr=3e-3, warmup_frac=0.1, output=str(tmp_path / "run"),
                progress=False, log_every=1)
    return PretrainConfig(**{**base, **kwargs})


# --- target and loss, by hand -------------------------------------------------------------------------
def test_patchify_order_and_inverse():
    img = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)   # channels 0..15 and 16..31
    patches = patchify(img, 2)
    assert patches.shape == (1, 4, 8)
    # patch 1 = row 0, col 1: pixels (0,2), (0,3), (1,2), (1,3), channel fastest
    assert patches[0, 1].tolist() == [2, 18, 3, 19, 6, 22, 7, 23]
    assert torch.equal(unpatchify(patches, 2, (2, 2), 2), img)


def test_normalized_target_uses_unbiased_variance():
    out = normalized_targets(torch.tensor([[[1.0, 2.0, 3.0, 4.0]]]))
    var = 5.0 / 3.0                                        # sum of squares 5 over n - 1 = 3
    expect = [(v - 2.5) / (var + 1e-6) ** 0.5 for v in (1, 2, 3, 4)]
    assert torch.allclose(out[0, 0], torch.tensor(expect), atol=1e-6)


def test_next_patch_loss_by_hand():
    # two samples, 4 patches of 2 values; sample 0 has prefix 1 (targets 1, 2, 3), sample 1 prefix 3 (target 3)
    preds = torch.tensor([[[1., 1.], [2., 0.], [0., 0.], [9., 9.]],
                          [[5., 5.], [5., 5.], [1., 3.], [9., 9.]]])
    targets = torch.tensor([[[0., 0.], [0., 1.], [2., 2.], [1., -1.]],
                            [[0., 0.], [0., 0.], [0., 0.], [2., 2.]]])
    # sample 0: pred0 vs t1 -> (1 + 0)/2 = 0.5; pred1 vs t2 -> (0 + 4)/2 = 2; pred2 vs t3 -> (1 + 1)/2 = 1
    # sample 1: pred2 vs t3 -> (1 + 1)/2 = 1;  mean over the 4 targets = 4.5 / 4
    loss = next_patch_loss(preds, targets, torch.tensor([1, 3]))
    assert loss.item() == pytest.approx(4.5 / 4)


def test_prefix_mask_against_naive_loops():
    n, lengths = 7, torch.tensor([1, 3, 6])
    mask = prefix_causal_mask(n, lengths)
    assert mask.shape == (3, 1, n, n) and mask.dtype == torch.bool
    for b, length in enumerate(lengths.tolist()):
        for i in range(n):
            for j in range(n):
                assert mask[b, 0, i, j].item() == (j <= i or j < length)


def test_prefix_lengths_cover_the_official_range():
    g = torch.Generator().manual_seed(0)
    draws = sample_prefix_lengths(4000, 16, g)
    assert draws.min().item() == 1 and draws.max().item() == 15
    with pytest.raises(ValueError):
        sample_prefix_lengths(2, 16, g, low=0)


# --- decoder -------------------------------------------------------------------------------------------
def test_official_decoder_size_and_quirk():
    with torch.device("meta"):
        dec = PixelDecoder(1536, 14 * 14 * 3, DecoderConfig())
    per_block = 2 * 2 * 2048 + 2 * 2048 * 8192
    expect = (1536 * 2048 + 2048) + 12 * per_block + 2 * 2048 + (2048 * 588 + 588)
    assert sum(p.numel() for p in dec.parameters()) == expect
    blk = PixelDecoder(8, 4, DecoderConfig(dim=8, depth=1)).decoder_blocks[0]
    x = torch.randn(2, 3, 8)
    y = x + blk.norm1(x)
    assert torch.allclose(blk(x), y + blk.mlp(blk.norm2(y)))
    assert PixelDecoder(8, 4, DecoderConfig(dim=8, depth=1, identity_attn_quirk=False)).decoder_blocks[0].norm1 is None


# --- any trunk -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kwargs,lead,trail", [("aim_600m_patch14_224", TINY_AIM, 0, 0),
                                                    ("illama_tiny_patch16_224", TINY_ILLAMA, 0, 1)])
def test_objective_is_causal_beyond_the_prefix(name, kwargs, lead, trail):
    model = llamavit.create_model(name, num_classes=0, img_size=32, **kwargs)
    obj = AutoregressiveObjective(model, DecoderConfig(dim=16, depth=1), img_size=32, in_chans=3).eval()
    assert (obj.lead, obj.trail) == (lead, trail)
    x = torch.randn(1, 3, 32, 32)
    x2 = x.clone()
    x2[:, :, 24:, 24:] += 1.0                                  # only the last patch (15) changes
    prefix = torch.tensor([4])
    with torch.no_grad():
        loss, p1, _ = obj(x, prefix)
        _, p2, _ = obj(x2, prefix)
    assert torch.isfinite(loss)
    assert (p1[:, :15] - p2[:, :15]).abs().max() < 1e-5        # predictions before patch 15 never see it
    assert (p1[:, 15] - p2[:, 15]).abs().max() > 1e-4


# --- the loop ------------------------------------------------------------------------------------------
def _losses(run_dir):
    with open(run_dir / "log.jsonl") as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def test_pretraining_lowers_the_loss_and_writes_artifacts(tmp_path):
    cfg = tiny_cfg(tmp_path, epochs=12, log_every=4)
    summary = Pretrainer(cfg).fit()
    losses = _losses(tmp_path / "run")
    assert summary["steps"] == 48
    assert sum(losses[-3:]) / 3 < 0.85 * losses[0], losses
    assert (tmp_path / "run" / "reconstructions.png").is_file()
    # the checkpoint is a llamavit checkpoint of the trunk: create_model / probing read it
    trunk = llamavit.create_model("aim_600m_patch14_224", num_classes=0, img_size=32, **TINY_AIM,
                                  checkpoint_path=str(tmp_path / "run" / "checkpoints" / "step-00000048"))
    assert trunk(torch.randn(1, 3, 32, 32)).shape == (1, 32)


def test_resume_is_exact(tmp_path):
    straight = Pretrainer(tiny_cfg(tmp_path / "a"))
    straight.fit()
    Pretrainer(tiny_cfg(tmp_path / "b", max_steps=5)).fit()
    resumed = Pretrainer(tiny_cfg(tmp_path / "b", resume=True))
    summary = resumed.fit()
    assert summary["resumed"] and summary["steps"] == straight.step == 12
    assert _losses(tmp_path / "b" / "run") == _losses(tmp_path / "a" / "run")
    a = load_file(str(tmp_path / "a" / "run" / "checkpoints" / "step-00000012" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "run" / "checkpoints" / "step-00000012" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    for p, q in zip(straight.objective.decoder.parameters(), resumed.objective.decoder.parameters()):
        assert torch.equal(p, q)


def test_optimizer_follows_the_recipe(tmp_path):
    trainer = Pretrainer(tiny_cfg(tmp_path))
    groups = trainer.optimizer.param_groups
    assert all(g["betas"] == (0.9, 0.95) for g in groups)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    named = dict(trainer.objective.named_parameters())
    assert id(named["model.trunk.blocks.0.norm1.weight"]) in no_decay
    assert id(named["decoder.decoder_pred.bias"]) in no_decay
    assert id(named["model.trunk.blocks.0.attn.qkv.weight"]) not in no_decay


def test_cli_pretrain_illama(tmp_path, capsys):
    out = tmp_path / "cli"
    code = cli_main(["pretrain", "aim", "--model", "illama_tiny_patch16_224", "--model-kwargs", "embed_dim=32",
                     "depth=1", "num_heads=2", "patch_size=8", "--img-size", "32", "--data", "synthetic",
                     "--decoder-dim", "16", "--decoder-depth", "1", "--epochs", "1", "--batch-size", "16",
                     "--amp", "--output", str(out), "--no-progress"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 4
    assert (out / "checkpoints" / "latest").is_file()


def test_nan_loss_stops_pretraining_and_keeps_the_last_good_checkpoint(tmp_path):
    from llamavit.train import NonFiniteLossError
    trainer = Pretrainer(tiny_cfg(tmp_path, ckpt_every=2))
    real_forward, calls = trainer.objective.forward, []

    def nan_from_step_3(images, prefix):
        calls.append(1)
        loss, preds, targets = real_forward(images, prefix)
        return (loss * float("nan") if len(calls) > 3 else loss), preds, targets

    trainer.objective.forward = nan_from_step_3
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 3; training stopped, nothing was saved after "
                                                 r"the last good checkpoint, .*checkpoints/step-00000002"):
        trainer.fit()
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert saved == ["step-00000002"]
