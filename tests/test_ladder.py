"""The iLLaMA ablation ladder: each rung builds the intended architecture, the all-iLLaMA rung computes what
illama_* computes, and `llamavit ablate` runs end to end on a tiny synthetic ladder."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from timm.layers import Mlp

import llamavit
from llamavit.ablation import load_ladder, rung_train_config
from llamavit.cli import main
from llamavit.layers import RMSNorm, SwiGLU

LADDER = Path(__file__).resolve().parent.parent / "configs" / "ladder_illama.yaml"
SMALL = dict(img_size=28, in_chans=1, num_classes=10, depth=2)


def architecture(model) -> dict:
    """What the modules are, read from the module tree (types, parameters, flags), not from names."""
    blocks = list(model.blocks)
    norms = {type(m) for b in blocks for m in (b.norm1, b.norm2)} | {type(model.norm)}
    mlps = {type(b.mlp) for b in blocks}
    assert len(norms) == 1 and len(mlps) == 1
    mlp = blocks[0].mlp
    mlp_linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    acts = {type(m) for m in mlp.modules() if isinstance(m, (nn.GELU, nn.SiLU))}
    return {
        "norm": norms.pop(),
        "mlp": (mlps.pop(), frozenset(acts), len(mlp_linears)),
        "mlp_bias": {m.bias is not None for m in mlp_linears},
        "qkv_bias": {b.attn.qkv.bias is not None for b in blocks},
        "proj_bias": {b.attn.proj.bias is not None for b in blocks},
        "mask_mode": {b.attn.mask_mode for b in blocks},
        "soft_mask_rate": {b.attn.soft_mask_rate for b in blocks},
        "cls_first": model.num_prefix_tokens == 1 and model.cls_index == 0,
        "pos_embed": isinstance(getattr(model, "pos_embed", None), nn.Parameter),
        "rope": model.rope is not None,
    }


EXPECTED_CHANGE = {"rmsnorm": {"norm"}, "swiglu": {"mlp"}, "bias": {"mlp_bias"},
                   "causal_cls_first": {"mask_mode"}, "cls_last": {"cls_first"}, "rope": {"rope"},
                   "soft_constant": set(), "soft_linear": set()}


def test_each_rung_builds_the_intended_architecture_and_changes_one_ingredient():
    ladder = load_ladder(str(LADDER))
    assert [r.name for r in ladder.rungs] == ["vit"] + list(EXPECTED_CHANGE)
    archs = [architecture(llamavit.create_model(ladder.model, **{**r.model_kwargs, **SMALL})) for r in ladder.rungs]
    vit = archs[0]
    assert vit["norm"] is nn.LayerNorm and vit["mlp"] == (Mlp, frozenset({nn.GELU}), 2)
    assert vit["mlp_bias"] == vit["qkv_bias"] == vit["proj_bias"] == {True}
    assert vit["mask_mode"] == {"bidirectional"} and vit["cls_first"] and vit["pos_embed"] and not vit["rope"]
    for prev, arch, rung in zip(archs, archs[1:], ladder.rungs[1:]):
        changed = {k for k in arch if arch[k] != prev[k]}
        assert changed == EXPECTED_CHANGE[rung.name], rung.name
    illama = archs[ladder.rungs.index(next(r for r in ladder.rungs if r.name == "rope"))]
    assert illama["norm"] is RMSNorm and illama["mlp"] == (SwiGLU, frozenset({nn.SiLU}), 3)
    assert illama["mlp_bias"] == {False} and illama["qkv_bias"] == illama["proj_bias"] == {True}
    assert illama["mask_mode"] == {"soft"} and illama["soft_mask_rate"] == {0.0}
    assert not illama["cls_first"] and illama["pos_embed"] and illama["rope"]


def test_soft_mask_rungs_change_only_the_schedule_scaled_to_the_budget(tmp_path):
    ladder = load_ladder(str(LADDER))
    by_name = {r.name: r for r in ladder.rungs}
    for name, schedule in (("rope", "none"), ("soft_constant", "constant"), ("soft_linear", "linear")):
        cfg = rung_train_config(ladder, by_name[name], 1, str(tmp_path), epochs=12)
        assert cfg.soft_mask == schedule and cfg.seed == 1 and cfg.epochs == 12
        assert cfg.output == str(tmp_path / name / "seed1")
        if schedule != "none":
            assert cfg.soft_mask_epochs == pytest.approx(12 * 0.1667)
    assert by_name["soft_linear"].model_kwargs == by_name["rope"].model_kwargs


def test_causal_rung_with_leading_class_token_attends_only_to_itself():
    from llamavit.eval.attention import collect_attention
    ladder = load_ladder(str(LADDER))
    rung = next(r for r in ladder.rungs if r.name == "causal_cls_first")
    model = llamavit.create_model(ladder.model, **{**rung.model_kwargs, **SMALL}).eval()
    x = torch.randn(2, 1, 28, 28)
    for probs in collect_attention(model, x).values():
        assert (probs[:, :, 0, 1:] == 0).all() and (probs[:, :, 0, 0] > 0).all()
    # the official post-softmax mask does not renormalise: the class token's weight on itself is divided by
    # the softmax sum over ALL tokens, so the image still reaches it as one scalar per head and layer
    logits = model(x)
    assert not torch.equal(logits[0], logits[1]) and torch.allclose(logits[0], logits[1], atol=0.05)
    # with the renormalised causal mask it sees nothing of the image at all
    blind = llamavit.create_model(ladder.model, **{**rung.model_kwargs, "mask_mode": "causal", **SMALL}).eval()
    logits = blind(x)
    assert torch.allclose(logits[0], logits[1], atol=1e-6)
    last = next(r for r in ladder.rungs if r.name == "cls_last")
    model = llamavit.create_model(ladder.model, **{**last.model_kwargs, **SMALL}).eval()
    assert not torch.allclose(*model(x), atol=1e-3)


def test_all_illama_rung_computes_exactly_illama():
    kw = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5)
    reference = llamavit.create_model("illama_tiny_patch16_224", **kw).eval()
    ladder = load_ladder(str(LADDER))
    opts = {k: v for k, v in next(r for r in ladder.rungs if r.name == "rope").model_kwargs.items() if k not in kw}
    model = llamavit.create_model("ladder_vit_tiny_patch16_224", **{**opts, **kw}).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    for rate, size in ((0.0, 32), (0.4, 32), (1.0, 32), (0.0, 48)):
        reference.set_soft_mask_rate(rate)
        model.set_soft_mask_rate(rate)
        x = torch.randn(2, 3, size, size)
        assert torch.equal(model.forward_features(x), reference.forward_features(x))
        assert torch.equal(model(x), reference(x))


def test_ladder_vit_named_defaults_are_a_plain_vit():
    model = llamavit.create_model("ladder_vit_tiny_patch16_224")
    assert "ladder_vit_tiny_patch16_224" in llamavit.list_models("ladder*")
    arch = architecture(model)
    assert arch["norm"] is nn.LayerNorm and arch["mask_mode"] == {"bidirectional"} and arch["cls_first"]
    assert (len(model.blocks), model.embed_dim, model.patch_embed.grid_size, model.num_classes) == (12, 192, (14, 14),
                                                                                                   1000)
    with pytest.raises(ValueError, match="norm must be one of"):
        llamavit.create_model("ladder_vit_tiny_patch16_224", norm="batchnorm")


def test_ablate_cli_runs_a_tiny_ladder(tmp_path, capsys):
    ladder = tmp_path / "ladder.yaml"
    ladder.write_text("""
model: ladder_vit_tiny_patch16_224
base_model: {patch_size: 8, embed_dim: 24, depth: 1, num_heads: 2}
train: {img_size: 16, in_chans: 3, data: synthetic, batch_size: 16, epochs: 1, warmup_epochs: 0, log_every: 1}
rank_images: 4
rungs:
  - {name: vit, change: plain, model: {mask_mode: bidirectional}}
  - {name: linear, change: + causal + soft mask, model: {mask_mode: soft, class_token_position: last},
     train: {soft_mask: linear, soft_mask_fraction: 1.0}}
""")
    out = tmp_path / "out"
    rc = main(["ablate", "illama-ladder", "--config", str(ladder), "--seeds", "0", "1", "--output", str(out),
               "--no-progress"])
    assert rc == 0
    result = json.loads((out / "ladder.json").read_text())
    assert len(result["runs"]) == 4 and result["budget"]["epochs"] == 1
    assert {r["attention"] for r in result["runs"] if r["rung"] == "vit"} == {"bidirectional"}
    assert {r["attention"] for r in result["runs"] if r["rung"] != "vit"} == {"causal"}
    records = [json.loads(line) for line in (out / "linear" / "seed0" / "log.jsonl").read_text().splitlines()]
    rates = [r["soft_mask_rate"] for r in records if "loss" in r]
    assert rates == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])   # the linear schedule over the 4 steps of the budget
    comparison = result["attention_rank_comparison"]
    assert comparison["causal"]["mean_rank"] == comparison["causal"]["num_tokens"]   # triangular: full rank
    for row in result["summary"]:
        assert row["params"] > 0 and row["top1"]["mean"] is not None and row["final_train_loss"]["mean"] > 0
    for name in ("ladder.md", "ladder_curves.png", "ladder_attention_spectrum.png"):
        assert (out / name).stat().st_size > 0
    assert "| linear |" in (out / "ladder.md").read_text()
    assert "effective rank" in capsys.readouterr().out
