"""The training loop: schedules, optimiser groups, exact resume, atomic checkpoints, NaN handling, learning."""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from llamavit.models import CheckpointError
from llamavit.train import NonFiniteLossError, TrainConfig, Trainer, model_from_checkpoint, soft_mask_rate, train
from llamavit.train import checkpoint as ckpt_mod
from llamavit.train.checkpoint import latest_checkpoint, load_training_state, read_meta

TINY = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)


def tiny_cfg(tmp_path, name="run", **over):
    base = dict(model="illama_tiny_patch16_224", model_kwargs=dict(TINY), img_size=32, in_chans=3, data="synthetic",
                epochs=3, batch_size=16, lr=3e-3, warmup_epochs=0.5, log_every=1, progress=False,
                output=str(tmp_path / name), scale=(0.5, 1.0), crop_pct=1.0)
    return TrainConfig(**{**base, **over})


def official_mask_schedule(epochs, niter, cutoff, schedule):
    """iLLaMA's mask_scheduler (mode 'soft', rate 1), written out with numpy as the official code does."""
    early = cutoff * niter
    first = np.full(early, 1.0) if schedule == "constant" else np.linspace(1.0, 0.0, early)
    return np.concatenate((first, np.zeros((epochs - cutoff) * niter)))


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_soft_mask_schedule_matches_official(schedule):
    expected = official_mask_schedule(epochs=6, niter=7, cutoff=3, schedule=schedule)
    got = [soft_mask_rate(s, 7, schedule, 3) for s in range(6 * 7)]
    np.testing.assert_allclose(got, expected, atol=1e-12)
    with pytest.raises(ValueError, match="unknown soft-mask schedule"):
        soft_mask_rate(0, 7, "cosine", 3)


def test_config_validation_and_yaml(tmp_path):
    with pytest.raises(ValueError, match="soft_mask must be"):
        TrainConfig(soft_mask="sometimes")
    with pytest.raises(ValueError, match=r"unknown training option\(s\) \['lerning_rate'\]"):
        TrainConfig.from_dict({"lerning_rate": 1.0})
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.01\nepochs: 4\nscale: [0.5, 1.0]\n")
    cfg = TrainConfig.from_yaml(str(path), epochs=7)
    assert (cfg.lr, cfg.epochs, cfg.scale) == (0.01, 7, (0.5, 1.0))
    with pytest.raises(ValueError, match="config file not found"):
        TrainConfig.from_yaml(str(tmp_path / "nope.yaml"))


def test_no_weight_decay_on_1d_params_pos_embed_cls_token(tmp_path):
    trainer = Trainer(tiny_cfg(tmp_path, weight_decay=0.05))
    decay_of = {}
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            decay_of[names[id(p)]] = group["weight_decay"]
    assert decay_of["pos_embed"] == 0 and decay_of["cls_token"] == 0
    assert decay_of["blocks.0.norm1.weight"] == 0 and decay_of["blocks.0.attn.qkv.bias"] == 0
    assert decay_of["blocks.0.attn.qkv.weight"] == 0.05 and decay_of["head.weight"] == 0.05


def _losses(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [(r["step"], r.get("loss"), r.get("val_top1")) for r in map(json.loads, f)]


def test_resume_continues_exactly(tmp_path):
    """Stop after k steps, resume, and get the same losses and weights as an uninterrupted run — with
    augmentation, mixup/cutmix, drop path, dropout, EMA and the soft-mask schedule all active."""
    extra = dict(mixup=0.4, cutmix=0.4, drop_path=0.1, ema_decay=0.9, soft_mask="linear", soft_mask_epochs=1,
                 model_kwargs={**TINY, "drop_rate": 0.1}, clip_grad=1.0)
    full = train(tiny_cfg(tmp_path, "full", **extra))
    train(tiny_cfg(tmp_path, "split", max_steps=5, **extra))
    assert load_training_state(latest_checkpoint(str(tmp_path / "split")))["step"] == 5
    resumed = train(tiny_cfg(tmp_path, "split", resume=True, **extra))
    assert resumed["resumed"] and resumed["steps"] == full["steps"] == 12
    assert _losses(tmp_path / "full") == _losses(tmp_path / "split")
    a = model_from_checkpoint(str(tmp_path / "full")).state_dict()
    b = model_from_checkpoint(str(tmp_path / "split")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ema_a = model_from_checkpoint(str(tmp_path / "full"), use_ema=True).state_dict()
    ema_b = model_from_checkpoint(str(tmp_path / "split"), use_ema=True).state_dict()
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert not torch.equal(ema_a["head.weight"], a["head.weight"])


def test_training_learns_and_writes_outputs(tmp_path):
    cfg = tiny_cfg(tmp_path, epochs=12, lr=1e-2, scale=(1.0, 1.0), hflip=0.0, soft_mask="constant", soft_mask_epochs=2)
    summary = train(cfg)
    losses = [r["loss"] for r in map(json.loads, open(os.path.join(cfg.output, "log.jsonl"))) if "loss" in r]
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.4
    assert summary["val_top1"] >= 50.0  # 4 classes, chance is 25%
    for name in ("curves.png", "summary.json", "config.json"):
        assert os.path.getsize(os.path.join(cfg.output, name)) > 0
    meta = read_meta(cfg.output)
    assert meta["model"] == "illama_tiny_patch16_224" and meta["classes"] == [f"class_{i}" for i in range(4)]
    assert len([d for d in os.listdir(os.path.join(cfg.output, "checkpoints")) if d.startswith("step-")]) == 2


def test_killed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, epochs=2)
    trainer = Trainer(cfg)
    first = trainer.save()
    trainer.step = 4

    def broken_save(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(CheckpointError, match=r"cannot write .*\.tmp-step-00000004-\d+: disk full \(simulated\) while "
                                              r"writing checkpoint step-00000004; the previous checkpoint is intact"):
        trainer.save()
    assert latest_checkpoint(cfg.output) == first
    assert sorted(os.listdir(os.path.join(cfg.output, "checkpoints"))) == ["latest", "step-00000000"]   # no .tmp
    assert load_training_state(first)["step"] == 0


def test_fresh_run_over_an_earlier_runs_checkpoints_keeps_its_own(tmp_path):
    """Pruning must not sort an earlier run's later steps above the checkpoint just written."""
    cfg = tiny_cfg(tmp_path, epochs=2, keep_checkpoints=2)
    trainer = Trainer(cfg)
    for step in (100, 200):   # an earlier, longer run in the same output directory
        trainer.step = step
        trainer.save()
    trainer.step = 3
    written = trainer.save()
    assert os.path.isdir(written) and latest_checkpoint(cfg.output) == written
    assert load_training_state(written)["step"] == 3
    names = sorted(d for d in os.listdir(os.path.join(cfg.output, "checkpoints")) if d.startswith("step-"))
    assert names == ["step-00000003", "step-00000100", "step-00000200"]   # nothing of either run lost
    trainer.step = 4
    trainer.save()
    trainer.step = 5
    trainer.save()   # the fresh run's own older checkpoints are pruned as usual
    names = sorted(d for d in os.listdir(os.path.join(cfg.output, "checkpoints")) if d.startswith("step-"))
    assert names == ["step-00000004", "step-00000005", "step-00000100", "step-00000200"]


def test_fresh_run_moves_an_earlier_run_aside_and_resume_keeps_it(tmp_path, capsys):
    first = Trainer(tiny_cfg(tmp_path, epochs=1, max_steps=3, ckpt_every=3)).fit()
    assert first["steps"] == 3
    run_dir = tmp_path / "run"
    Trainer(tiny_cfg(tmp_path, epochs=1, max_steps=2, ckpt_every=2)).fit()   # fresh, not --resume
    moved = [d for d in os.listdir(run_dir) if d.startswith("previous-")]
    assert len(moved) == 1 and f"its files were moved to {run_dir / moved[0]}" in capsys.readouterr().out
    earlier = run_dir / moved[0]
    assert load_training_state(latest_checkpoint(str(earlier)))["step"] == 3
    assert [json.loads(line)["step"] for line in open(earlier / "log.jsonl")][:3] == [1, 2, 3]
    assert load_training_state(latest_checkpoint(str(run_dir)))["step"] == 2
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["latest", "step-00000002"]
    assert max(json.loads(line)["step"] for line in open(run_dir / "log.jsonl")) == 2
    Trainer(tiny_cfg(tmp_path, epochs=1, max_steps=4, ckpt_every=2, resume=True)).fit()   # --resume moves nothing
    assert [d for d in os.listdir(run_dir) if d.startswith("previous-")] == moved


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny_cfg(tmp_path, epochs=2, ckpt_every=2)
    trainer = Trainer(cfg)
    real = trainer.criterion
    calls = {"n": 0}

    def poisoned(logits, targets):
        calls["n"] += 1
        loss = real(logits, targets)
        return loss * float("nan") if calls["n"] == 4 else loss

    trainer.criterion = poisoned
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 3; training stopped"):
        trainer.fit()
    good = latest_checkpoint(cfg.output)
    assert os.path.basename(good) == "step-00000002"
    weights = model_from_checkpoint(cfg.output).state_dict()
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_resume_refuses_another_models_checkpoint(tmp_path):
    train(tiny_cfg(tmp_path, "a", epochs=1))
    other = tiny_cfg(tmp_path, "a", epochs=1, resume=True, model_kwargs={**TINY, "embed_dim": 48})
    with pytest.raises(ValueError, match=r"--resume with other options than the run in .* \(model_kwargs "):
        Trainer(other).fit()
    other = dataclasses.replace(other, allow_config_change=True)   # let through: the weights still cannot fit
    with pytest.raises(CheckpointError, match="shape mismatch: blocks.0.attn.proj.bias"):
        Trainer(other).fit()


def test_state_file_is_weights_only_loadable(tmp_path):
    train(tiny_cfg(tmp_path, epochs=1))
    path = os.path.join(latest_checkpoint(str(tmp_path / "run")), "state.pt")
    state = torch.load(path, weights_only=True)
    assert state["step"] == 4 and state["config"]["model"] == "illama_tiny_patch16_224"


def test_bf16_autocast_step_trains(tmp_path):
    trainer = Trainer(tiny_cfg(tmp_path, amp=True, epochs=1))
    images = torch.randn(16, 3, 32, 32)
    targets = torch.arange(16) % 4
    before = trainer.model.head.weight.detach().clone()
    loss = trainer.train_step(images, targets)["loss"]
    assert np.isfinite(loss) and trainer.step == 1
    assert trainer.model.head.weight.dtype == torch.float32  # autocast leaves the master weights in fp32
    assert not torch.equal(before, trainer.model.head.weight)
