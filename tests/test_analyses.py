"""The analyses: ECE values, ranks of known matrices, attention probabilities that reproduce the layer,
int8 quantisation, and `llamavit analyze calibration|quantize|resolution|attention` on a tiny trained run."""
import json

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import llamavit
from llamavit.cli import main
from llamavit.eval.attention import (analyze_attention, attention_probabilities, collect_attention, effective_ranks,
                                     matrix_ranks)
from llamavit.eval.calibration import calibration_bins, expected_calibration_error
from llamavit.eval.quantize import analyze_quantization, quantize_dynamic_int8, quantize_static_int8
from llamavit.layers import Attention, RotaryEmbedding, prefix_causal_mask


# --- calibration -----------------------------------------------------------------------------------
def test_ece_of_a_perfectly_calibrated_predictor_is_near_zero():
    g = torch.Generator().manual_seed(0)
    n, classes = 200_000, 10
    confidence = 0.1 + 0.9 * torch.rand(n, generator=g)
    predicted = torch.randint(classes, (n,), generator=g)
    probs = ((1 - confidence) / (classes - 1))[:, None].repeat(1, classes)
    probs[torch.arange(n), predicted] = confidence
    correct = torch.rand(n, generator=g) < confidence            # right with probability = confidence
    targets = torch.where(correct, predicted, (predicted + 1 + torch.randint(classes - 1, (n,), generator=g)) % classes)
    assert expected_calibration_error(probs, targets) < 0.005


def test_ece_of_an_overconfident_predictor_matches_a_hand_computation():
    confidence = torch.tensor([0.95, 0.95, 0.90, 0.55, 0.52])
    probs = torch.stack((confidence, 1 - confidence), dim=1)       # class 0 predicted every time
    targets = torch.tensor([0, 1, 1, 0, 1])                        # right, wrong, wrong, right, wrong
    # 15 bins: 0.95 -> bin 14, 0.90 -> 13, 0.55 -> 8, 0.52 -> 7
    expected = 2 / 5 * abs(0.5 - 0.95) + 1 / 5 * 0.90 + 1 / 5 * abs(1 - 0.55) + 1 / 5 * 0.52
    assert expected_calibration_error(probs, targets) == pytest.approx(expected, abs=1e-6)
    bins = calibration_bins(probs, targets)
    assert [b["count"] for b in bins if b["count"]] == [1, 1, 1, 2]
    assert bins[14]["accuracy"] == 0.5 and bins[14]["confidence"] == pytest.approx(0.95)
    # always right at confidence 1, and bin edges: 1/15 falls in the first bin
    assert expected_calibration_error(torch.eye(3), torch.arange(3)) == pytest.approx(0.0)
    assert calibration_bins(torch.full((1, 15), 1 / 15), torch.tensor([0]))[0]["count"] == 1


# --- ranks -----------------------------------------------------------------------------------------
def test_ranks_of_known_matrices():
    u, v = torch.randn(6, 1), torch.randn(1, 6)
    rows = torch.randn(2, 6)
    two = rows[torch.tensor([0, 1, 0, 1, 1, 0])]                    # two distinct rows
    maps = torch.stack((u @ v, torch.eye(6), torch.ones(6, 6).tril(), two, torch.zeros(6, 6).index_fill_(0,
                        torch.tensor([0]), 1.0)))
    assert matrix_ranks(maps).tolist() == [1, 6, 6, 2, 1]
    eff = effective_ranks(maps)
    assert eff[0].item() == pytest.approx(1.0, abs=1e-4) and eff[1].item() == pytest.approx(6.0, abs=1e-4)
    assert 1.0 < eff[2].item() < 6.0
    uniform = torch.full((1, 4, 4), 0.25)                           # fully collapsed attention: rank one
    assert matrix_ranks(uniform).item() == 1 and matrix_ranks(torch.eye(4) + 1e-4, rtol=1e-2).item() == 4
    assert matrix_ranks(torch.diag(torch.tensor([1.0, 1e-3, 1e-6])), rtol=1e-4).item() == 2


@pytest.mark.parametrize("mode", ["bidirectional", "causal", "soft", "prefix"])
def test_attention_probabilities_reproduce_the_layer(mode):
    # 'prefix': AIM's prefix-causal mask, injected at forward (grouped-query heads too)
    attn = Attention(24, 3, num_kv_heads=1 if mode == "prefix" else None,
                     mask_mode="bidirectional" if mode == "prefix" else mode)
    attn.soft_mask_rate = 0.3
    mask = prefix_causal_mask(9, 3) if mode == "prefix" else None
    x = torch.randn(2, 9, 24)
    rope = RotaryEmbedding(8, 9)(9)
    probs = attention_probabilities(attn, x, rope, mask)
    torch.testing.assert_close(probs, attn.probabilities(x, rope, mask))
    _, _, v = attn.qkv(x).view(2, 9, -1, 8).transpose(1, 2).split([3, attn.num_kv_heads, attn.num_kv_heads], dim=1)
    out = attn.proj((probs @ v.repeat_interleave(3 // attn.num_kv_heads, dim=1)).transpose(1, 2).reshape(2, 9, -1))
    torch.testing.assert_close(out, attn(x, rope, mask), atol=1e-5, rtol=1e-5)
    if mode == "prefix":   # the prefix sees itself whole, the rest is causal
        assert (probs[..., :3, :3] > 0).all() and (probs.triu(1)[..., 3:] == 0).all()
    if mode == "causal":
        assert (probs.triu(1) == 0).all()
    if mode == "soft":   # the official mask is not renormalised: only the last row (sees every key) sums to one
        sums = probs.sum(-1)
        assert (sums[..., :-1] < 1 - 1e-3).all() and torch.allclose(sums[..., -1], torch.ones(2, 3))


def test_attention_maps_of_illama_and_timm_models():
    model = llamavit.create_model("illama_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=24, depth=2,
                                  num_heads=2, num_classes=3)
    x = torch.randn(2, 3, 32, 32)
    result = analyze_attention(model, x, layers=[-1], heads=[1])
    assert result["layers"] == [1] and result["maps"][1].shape == (2, 1, 4, 4)
    assert result["query"] == "class token (last)"
    assert result["ranks"]["mean_rank"] == 17.0                     # causal (r = 0): triangular, full rank
    model.set_soft_mask_rate(1.0)                                   # bidirectional at init: near uniform
    assert analyze_attention(model, x)["ranks"]["mean_effective_rank"] < 3.0
    vit = llamavit.create_model("timm:vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=24, depth=2,
                                num_heads=2, num_classes=3)
    maps = collect_attention(vit, x)
    assert sorted(maps) == [0, 1] and maps[0].shape == (2, 2, 17, 17)
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(2, 2, 17))
    with pytest.raises(ValueError, match="out of range"):
        collect_attention(vit, x, layers=[5])


# --- quantisation ----------------------------------------------------------------------------------
def test_quantized_models_run_and_report_accuracy_and_size():
    model = llamavit.create_model("illama_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=2,
                                  num_heads=2, num_classes=4).eval()
    images, labels = torch.randn(32, 3, 16, 16), torch.randint(4, (32,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=16)
    result = analyze_quantization(model, loader)
    rows = {r["method"]: r for r in result["results"]}
    assert set(rows) == {"float32", "int8_dynamic", "int8_static"}
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    for name in ("int8_dynamic", "int8_static"):
        row = rows[name]
        assert "error" not in row and 0.0 <= row["top1"] <= 100.0
        assert row["int8"] == linears and row["float"] == 0
        assert row["size_ratio"] > 1.8   # at D=32 the float patch embed, pos_embed and norms weigh more
        assert row["top1_drop"] == pytest.approx(rows["float32"]["top1"] - row["top1"])
    with torch.no_grad():
        ref = model(images)
        for qmodel in (quantize_dynamic_int8(model), quantize_static_int8(model, [images])):
            assert (qmodel(images) - ref).abs().max() < 0.1 * ref.abs().max()
    assert isinstance(model.blocks[0].attn.qkv, nn.Linear)          # the original is untouched


# --- the commands on a tiny trained run ------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from llamavit.train import TrainConfig, train
    out = tmp_path_factory.mktemp("run")
    train(TrainConfig(model="illama_tiny_patch16_224", model_kwargs=dict(patch_size=4, embed_dim=32, depth=2,
                      num_heads=2), img_size=16, in_chans=3, data="synthetic", batch_size=16, epochs=1,
                      warmup_epochs=0, output=str(out), progress=False, crop_pct=1.0))
    return out


def test_analyze_commands_on_a_tiny_run(tiny_run, tmp_path, capsys):
    base = ["--checkpoint", str(tiny_run)]
    assert main(["analyze", "calibration", *base, "--output", str(tmp_path / "cal")]) == 0
    cal = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert cal["num_bins"] == 15 and cal["num_images"] == 64 and 0.0 <= cal["ece"] <= 1.0
    assert "ECE" in capsys.readouterr().out

    assert main(["analyze", "quantize", *base, "--output", str(tmp_path / "q"), "--calibration-batches", "1",
                 "--batch-size", "32"]) == 0
    q = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert [r["method"] for r in q["results"]] == ["float32", "int8_dynamic", "int8_static"]
    assert all("top1" in r for r in q["results"])
    assert "int8_static" in capsys.readouterr().out

    assert main(["analyze", "resolution", *base, "--sizes", "16", "18", "32", "--output", str(tmp_path / "r")]) == 0
    res = json.loads((tmp_path / "r" / "resolution.json").read_text())
    assert res["train_size"] == 16 and "error" in res["results"][1] and "top1" in res["results"][2]

    assert main(["analyze", "attention", *base, "--num-images", "2", "--layers", "0", "-1", "--heads", "0",
                 "--output", str(tmp_path / "a")]) == 0
    att = json.loads((tmp_path / "a" / "attention.json").read_text())
    assert att["layers"] == [0, 1] and att["heads"] == [0] and att["ranks"]["num_tokens"] == 17
    out = capsys.readouterr().out
    assert "mean rank" in out and "wrote" in out
    for path in ("cal/reliability.png", "q/quantization.png", "r/resolution.png", "a/image000_attention.png",
                 "a/image001_attention.png", "a/attention_spectrum.png"):
        assert (tmp_path / path).stat().st_size > 0
    assert main(["analyze", "attention", *base, "--heads", "7", "--output", str(tmp_path / "b")]) == 2
