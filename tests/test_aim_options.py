"""The AIM paper's pre-training options: patch orders, targets (pixels, k-means tokens), fully causal
attention, the linear head, the masked baseline, the held-out loss, probing with causal attention."""
import copy

import pytest
import torch

import llamavit
from llamavit.layers import prefix_causal_mask
from llamavit.objectives import (ORDERS, AutoregressiveObjective, DecoderConfig, MaskedObjective, PixelDecoder,
                                 fit_codebook, load_codebook, masked_patch_loss, next_patch_loss, patch_order,
                                 patch_targets, patchify, random_patch_mask, save_codebook, visit_rank)
from llamavit.train.pretrain import CODEBOOK_NAME, PretrainConfig, Pretrainer
from llamavit.train.probe import trunk_features

TINY_AIM = dict(embed_dim=32, depth=2, num_heads=2, patch_size=8, probe_layers=1)
TINY_ILLAMA = dict(embed_dim=32, depth=2, num_heads=2, patch_size=8)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(tmp_path, **kwargs):
    base = dict(model="aim_600m_patch14_224", model_kwargs=TINY_AIM, img_size=32, data="synthetic", decoder_dim=32,
                decoder_depth=1, epochs=2, batch_size=16, lr=3e-3, warmup_frac=0.1, output=str(tmp_path / "run"),
                progress=False, log_every=1)
    return PretrainConfig(**{**base, **kwargs})


# --- orders ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ORDERS)
@pytest.mark.parametrize("grid", [(3, 3), (4, 5)])
def test_every_order_is_a_permutation(name, grid):
    order = patch_order(name, grid)
    n = grid[0] * grid[1]
    assert sorted(order.tolist()) == list(range(n))
    assert torch.equal(order[visit_rank(order)], torch.arange(n))


def test_orders_visit_the_documented_patches():
    # 3 x 3 grid, raster indices
    # 0 1 2
    # 3 4 5
    # 6 7 8
    assert patch_order("raster", (3, 3)).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert patch_order("reverse_raster", (3, 3)).tolist() == [8, 7, 6, 5, 4, 3, 2, 1, 0]
    assert patch_order("column", (3, 3)).tolist() == [0, 3, 6, 1, 4, 7, 2, 5, 8]
    assert patch_order("reverse_column", (3, 3)).tolist() == [8, 5, 2, 7, 4, 1, 6, 3, 0]
    # the walk 0 3 6 7 8 5 2 1 4 (down the first column, right, up, left, inwards), visited backwards
    assert patch_order("spiral", (3, 3)).tolist() == [4, 1, 2, 5, 8, 7, 6, 3, 0]
    assert patch_order("checkerboard", (3, 3)).tolist() == [0, 2, 4, 6, 8, 1, 3, 5, 7]
    # 2 x 3: walk 0 3 4 5 2 1 -> starts at 1
    assert patch_order("spiral", (2, 3)).tolist() == [1, 2, 5, 4, 3, 0]
    assert torch.equal(patch_order("random", (4, 4), seed=3), patch_order("random", (4, 4), seed=3))
    assert not torch.equal(patch_order("random", (4, 4), seed=3), patch_order("random", (4, 4), seed=4))
    with pytest.raises(ValueError, match="unknown patch order 'zigzag'"):
        patch_order("zigzag", (3, 3))


def test_prefix_mask_follows_the_order():
    order = patch_order("spiral", (3, 3))
    rank = visit_rank(order)
    mask = prefix_causal_mask(9, torch.tensor([2]), rank=rank)[0, 0]
    for i in range(9):
        for j in range(9):
            assert bool(mask[i, j]) == bool(rank[j] <= rank[i] or rank[j] < 2), (i, j)
    assert torch.equal(prefix_causal_mask(9, 3, rank=torch.arange(9)), prefix_causal_mask(9, 3))


@pytest.mark.parametrize("name,kwargs", [("aim_600m_patch14_224", TINY_AIM), ("illama_tiny_patch16_224", TINY_ILLAMA)])
def test_a_patch_sees_only_its_predecessors_in_the_order(name, kwargs):
    model = llamavit.create_model(name, num_classes=0, img_size=32, **kwargs)
    obj = AutoregressiveObjective(model, DecoderConfig(dim=16, depth=1), 32, 3, order="spiral").eval()
    order = patch_order("spiral", (4, 4))
    x = torch.randn(1, 3, 32, 32)
    changed = int(order[9])                       # the 10th patch visited
    row, col = divmod(changed, 4)
    x2 = x.clone()
    x2[:, :, row * 8:(row + 1) * 8, col * 8:(col + 1) * 8] += 1.0
    with torch.no_grad():
        _, p1, _ = obj(x, torch.tensor([3]))
        _, p2, _ = obj(x2, torch.tensor([3]))
    before, after = order[:9], order[9:]
    assert (p1[:, before] - p2[:, before]).abs().max() < 1e-5
    assert (p1[:, after] - p2[:, after]).abs().amax(-1).min() > 1e-5


def test_next_patch_loss_in_an_order_by_hand():
    preds, targets = torch.randn(1, 4, 2), torch.randn(1, 4, 2)
    order = torch.tensor([2, 0, 3, 1])
    loss = next_patch_loss(preds, targets, torch.tensor([2]), order)
    # visiting steps 1..3 are targets; those at step >= 2: patch 3 (from 0) and patch 1 (from 3)
    expect = ((preds[0, 0] - targets[0, 3]).square().mean() + (preds[0, 3] - targets[0, 1]).square().mean()) / 2
    assert torch.allclose(loss, expect)


# --- targets --------------------------------------------------------------------------------------------
def test_codebook_learns_clusters_and_round_trips(tmp_path):
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0, 0.0], [5.0, 5.0, 5.0], [-5.0, 5.0, 0.0]])
    labels = torch.randint(0, 3, (600,), generator=g)
    patches = centres[labels] + 0.1 * torch.randn(600, 3, generator=g)
    book = fit_codebook(patches, 3, seed=0)
    codes = book.encode(patches)
    # each learned code is one true cluster
    assert all(len(set(labels[codes == k].tolist())) == 1 for k in range(3))
    assert (book.decode(codes) - centres[labels]).abs().max() < 0.1
    save_codebook(book, str(tmp_path / "book.safetensors"), images=1)
    again = load_codebook(str(tmp_path / "book.safetensors"))
    assert torch.equal(again.centroids, book.centroids)
    assert torch.equal(again.encode(patches), codes)
    with pytest.raises(ValueError, match="needs at least 8 patches"):
        fit_codebook(patches[:5], 8)


def test_token_target_is_cross_entropy_over_codes():
    book = fit_codebook(torch.randn(64, 4), 4, seed=0)
    patches = torch.randn(1, 3, 4)
    codes = patch_targets(patches, "tokens", book)
    assert codes.dtype == torch.int64 and codes.shape == (1, 3)
    logits = torch.randn(1, 3, 4)
    loss = next_patch_loss(logits, codes, torch.tensor([1]))
    expect = torch.nn.functional.cross_entropy(logits[0, :2], codes[0, 1:])
    assert torch.allclose(loss, expect)
    assert torch.equal(patch_targets(patches, "pixels"), patches)
    with pytest.raises(ValueError, match="needs a patch codebook"):
        patch_targets(patches, "tokens")


def test_linear_head_is_one_linear_layer():
    head = PixelDecoder(32, 12, DecoderConfig(dim=64, depth=0))
    assert [type(m).__name__ for m in head.modules()] == ["PixelDecoder", "Linear"]
    x = torch.randn(2, 4, 32)
    assert torch.allclose(head(x, (2, 2)), x @ head.decoder_pred.weight.T + head.decoder_pred.bias)


# --- the masked baseline --------------------------------------------------------------------------------
def test_random_patch_mask_hides_the_ratio():
    hidden = random_patch_mask(5, 16, 0.75, torch.Generator().manual_seed(0))
    assert hidden.dtype == torch.bool and hidden.sum(1).tolist() == [12] * 5
    with pytest.raises(ValueError, match="hides 0 of 16 patches"):
        random_patch_mask(1, 16, 0.01)


def test_masked_loss_counts_hidden_patches_only():
    preds, targets = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    hidden = torch.tensor([[True, False, False, True], [False, False, True, False]])
    loss = masked_patch_loss(preds, targets, hidden)
    expect = torch.stack([(preds[b, i] - targets[b, i]).square().mean() for b, i in ((0, 0), (0, 3), (1, 2))]).mean()
    assert torch.allclose(loss, expect)
    preds2 = preds.clone()
    preds2[~hidden] += 10.0
    assert torch.allclose(masked_patch_loss(preds2, targets, hidden), loss)


@pytest.mark.parametrize("name,kwargs", [("aim_600m_patch14_224", TINY_AIM), ("illama_tiny_patch16_224", TINY_ILLAMA)])
def test_masked_objective_hides_patches_and_attends_both_ways(name, kwargs):
    model = llamavit.create_model(name, num_classes=0, img_size=32, **kwargs).eval()
    plain = copy.deepcopy(model)
    obj = MaskedObjective(model, DecoderConfig(dim=16, depth=1), 32, 3, mask_ratio=0.5).eval()
    hidden = torch.zeros(1, 16, dtype=torch.bool)
    hidden[0, [1, 5, 15]] = True
    x = torch.randn(1, 3, 32, 32)
    x_hidden = x.clone()
    x_hidden[:, :, 24:, 24:] += 3.0                   # patch 15: hidden, so the trunk never sees the change
    x_seen = x.clone()
    x_seen[:, :, 24:, 16:24] += 3.0                   # patch 14: visible; bidirectional: every patch sees it
    with torch.no_grad():
        _, base, _ = obj(x, hidden)
        _, p_hidden, _ = obj(x_hidden, hidden)
        _, p_seen, _ = obj(x_seen, hidden)
    assert (base - p_hidden).abs().max() < 1e-5
    assert (base - p_seen).abs().amax(-1).min() > 1e-6     # patch 0 too: no causal mask
    assert obj.mask_token.shape == (1, 1, 32) and "mask_token" in obj.no_weight_decay()
    with torch.no_grad():                             # outside the objective's forward the hook passes through
        assert torch.allclose(model.forward_features(x), plain.forward_features(x))


# --- the loop with each option --------------------------------------------------------------------------
@pytest.mark.parametrize("options", [dict(order="checkerboard"), dict(order="random", order_seed=2),
                                     dict(attention="causal"), dict(target="pixels"), dict(decoder_depth=0),
                                     dict(objective="masked", mask_ratio=0.5),
                                     dict(model="illama_tiny_patch16_224", model_kwargs=TINY_ILLAMA,
                                          objective="masked", target="pixels")])
def test_each_option_trains(tmp_path, options):
    trainer = Pretrainer(tiny_cfg(tmp_path, **options))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    summary = trainer.fit()
    assert summary["steps"] == 8 and summary["final_train_loss"] is not None
    assert torch.isfinite(torch.tensor(summary["final_train_loss"]))
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])]
    assert any("blocks." in k for k in changed)
    assert (tmp_path / "run" / "reconstructions.png").is_file()


def test_token_target_fits_and_keeps_its_codebook(tmp_path):
    cfg = tiny_cfg(tmp_path, target="tokens", codebook_size=16, codebook_images=32, val_images=32, max_steps=4)
    first = Pretrainer(cfg)
    summary = first.fit()
    path = tmp_path / "run" / CODEBOOK_NAME
    assert path.is_file() and first.objective.codebook.size == 16
    assert first.objective.decoder.decoder_pred.out_features == 16
    assert [r["step"] for r in summary["val_curve"]] == [4]     # epochs of 4 steps; cut at max_steps 4
    assert summary["final_val_loss"] > 0
    resumed = Pretrainer(PretrainConfig(**{**cfg.to_dict(), "resume": True, "max_steps": 0}))
    assert torch.equal(resumed.objective.codebook.centroids, load_codebook(str(path)).centroids)
    summary = resumed.fit()
    assert summary["steps"] == 8 and [r["step"] for r in summary["val_curve"]] == [4, 8]


def test_held_out_loss_is_deterministic(tmp_path):
    trainer = Pretrainer(tiny_cfg(tmp_path, val_images=20, batch_size=8))
    assert trainer.validation_loss() == trainer.validation_loss()


@pytest.mark.parametrize("options,message", [
    (dict(order="zigzag"), "order must be one of"),
    (dict(target="dvae"), "target must be one of"),
    (dict(attention="full"), "attention must be one of"),
    (dict(objective="mae", target="tokens"), "predicts normalised pixels only"),
    (dict(objective="masked", order="spiral"), "options of the autoregressive objective"),
    (dict(codebook_size=1), "codebook_size"),
])
def test_bad_options_are_refused(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        tiny_cfg(tmp_path, **options)


# --- probing with causal attention ----------------------------------------------------------------------
def test_probe_features_under_causal_attention():
    model = llamavit.create_model("aim_600m_patch14_224", num_classes=0, img_size=32, **TINY_AIM).eval()
    x = torch.randn(2, 3, 32, 32)
    x2 = x.clone()
    x2[:, :, 24:, 24:] += 1.0                        # the last patch
    causal, causal2 = trunk_features(model, x, "causal"), trunk_features(model, x2, "causal")
    assert (causal[:, :15] - causal2[:, :15]).abs().max() < 1e-5
    both = trunk_features(model, x, "bidirectional")
    assert torch.allclose(both, trunk_features(model, x), atol=1e-5)      # AIM's own attention: bidirectional
    assert (both - trunk_features(model, x2, "bidirectional"))[:, :15].abs().max() > 1e-4
    assert patchify(x, 8).shape[1] == causal.shape[1]
