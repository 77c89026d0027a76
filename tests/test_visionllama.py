"""VisionLLaMA plain and pyramid: parity with the official code, 2D RoPE / AS2DRoPE, the timm contract,
feature maps, any resolution, errors."""
import argparse
import math

import pytest
import timm
import torch
from conftest import FIXTURES_DIR, fixture_files

import llamavit
from llamavit.layers import Rope2D, apply_rope, grid_positions, rope_2d_angles

TOL = 1e-4
PLAIN = "visionllama_small_patch16_224"
PYRAMID = "visionllama_pyramid_small_224"
PLAIN_SMALL = dict(embed_dim=32, depth=2, num_heads=2, img_size=32, patch_size=8, num_classes=5, mlp_multiple_of=8)
PYRAMID_SMALL = dict(embed_dims=(16, 24, 32, 48), depths=(2, 1, 2, 1), num_heads=(1, 2, 2, 3), img_size=64,
                     wss=(4, 2, 2, 2), sr_ratios=(4, 2, 2, 1), num_classes=5, mlp_multiple_of=8)
PARITY_KWARGS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "num_classes", "img_size", "patch_size", "in_chans",
                 "qkv_bias", "class_token", "global_pool", "rope_auto_scale", "embed_dims", "depths", "wss",
                 "sr_ratios")


def max_diff(a, b):
    assert a.shape == b.shape, f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    return (a.float() - b.float()).abs().max().item()


def small(name, **kwargs):
    base = PYRAMID_SMALL if "pyramid" in name else PLAIN_SMALL
    return llamavit.create_model(name, **{**base, **kwargs})


def _fixture_params():
    paths = fixture_files("visionllama_*.pt")
    if not paths:
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"no visionllama fixtures in {FIXTURES_DIR}"))]
    return [pytest.param(p, id=p.stem) for p in paths]


@pytest.fixture(params=_fixture_params())
def official(request):
    fx = torch.load(request.param, weights_only=True)
    name = PYRAMID if fx["family"] == "visionllama_pyramid" else PLAIN
    kwargs = {k: v for k, v in fx["ours"]["kwargs"].items() if k in PARITY_KWARGS}
    return fx, name, kwargs


def _load(fx, name, kwargs, tmp_path, wrap="release", **overrides):
    path = tmp_path / f"{wrap}.pth"
    if wrap == "release":
        torch.save({"model": fx["state_dict"]}, path)
    elif wrap == "plain":
        torch.save(fx["state_dict"], path)
    else:  # the deit-style training checkpoint the official repo releases, argparse.Namespace included
        torch.save({"model": fx["state_dict"], "optimizer": {}, "lr_scheduler": {}, "epoch": 299,
                    "scaler": {}, "args": argparse.Namespace(model="pllama_wols_small_patch16", drop_path=0.2)}, path)
    return llamavit.create_model(name, checkpoint_path=str(path), **{**kwargs, **overrides}).eval()


def _attention_outputs(model, x):
    """Each block's attention-branch output (before layer scale), keyed as in the fixtures."""
    outs, hooks = {}, []
    if hasattr(model, "patch_embeds"):
        for i, stage in enumerate(model.blocks):
            for j, blk in enumerate(stage):
                hooks.append(blk.attn.register_forward_hook(
                    lambda m, a, o, key=f"attn_out_s{i}_b{j}": outs.__setitem__(key, o)))
    else:
        for i, blk in enumerate(model.blocks):
            hooks.append(blk.attn.register_forward_hook(lambda m, a, o, key=f"attn_out{i}": outs.__setitem__(key, o)))
    with torch.no_grad():
        tokens = model.forward_features(x)
        got = {"logits": model(x), "tokens": tokens, "tokens_prenorm": tokens,
               "features": model.forward_head(tokens, pre_logits=True), **outs}
    for h in hooks:
        h.remove()
    return got


def _compare(got, outs, suffix):
    checked = []
    for key, value in got.items():
        if key + suffix in outs:
            d = max_diff(value, outs[key + suffix])
            assert d <= TOL, f"{key}{suffix}: max|diff| = {d:.3g} > {TOL}"
            checked.append(key + suffix)
    return checked


@pytest.mark.parametrize("wrap", ["release", "plain", "training"])
def test_parity_with_official_outputs(official, wrap, tmp_path):
    fx, name, kwargs = official
    model = _load(fx, name, kwargs, tmp_path, wrap)
    assert sum(p.numel() for p in model.parameters()) == fx["param_count"]
    checked = _compare(_attention_outputs(model, fx["inputs"]), fx["outputs"], "")
    assert {"logits", "features"} <= set(checked)
    assert any(k.startswith("attn_out") for k in checked)
    if wrap == "release":  # another resolution, same model object (RoPE recomputed, no weight touched)
        hr = fx["inputs_hr"]
        checked = _compare(_attention_outputs(model, hr), fx["outputs"], f"_at_{hr.shape[-1]}")
        assert {f"logits_at_{hr.shape[-1]}", f"features_at_{hr.shape[-1]}"} <= set(checked)


def test_parity_with_auto_scale_switched(official, tmp_path):
    fx, name, kwargs = official
    for suffix in ("_noscale", "_autoscale"):
        if "logits" + suffix not in fx["outputs"]:
            continue
        model = _load(fx, name, kwargs, tmp_path, rope_auto_scale=suffix == "_autoscale")
        assert "logits" + suffix in _compare(_attention_outputs(model, fx["inputs"]), fx["outputs"], suffix)
        hr = fx["inputs_hr"]
        assert f"logits_at_{hr.shape[-1]}{suffix}" in _compare(
            _attention_outputs(model, hr), fx["outputs"], f"_at_{hr.shape[-1]}{suffix}")
        # the switch matters: outputs differ from the fixture's own setting
        assert max_diff(fx["outputs"]["logits"], fx["outputs"]["logits" + suffix]) > 1e-4 or name == PYRAMID


def test_parity_pyramid_stage_maps(official, tmp_path):
    fx, name, kwargs = official
    if name != PYRAMID:
        pytest.skip("stage maps are a pyramid output")
    model = _load(fx, name, kwargs, tmp_path)
    with torch.no_grad():
        maps = model.forward_intermediates(fx["inputs"], intermediates_only=True)
    assert len(maps) == 4
    for i, m in enumerate(maps):
        assert max_diff(m.flatten(2).transpose(1, 2), fx["outputs"][f"stage{i}"]) <= TOL


def test_rope_tables_equal_official_tables(official):
    fx, name, kwargs = official
    outs = fx["outputs"]
    if name == PLAIN:
        model = llamavit.create_model(name, **kwargs)
        size = kwargs["img_size"]
        for suffix, hw, auto in (("", size, True), ("_at_96", 96, True), ("_noscale", size, False)):
            model.cfg.rope_auto_scale = auto if kwargs["rope_auto_scale"] else not auto
            cos, sin = model.rope_tables((hw, hw))
            ref = outs["rope_freqs_cis" + suffix]
            assert max_diff(cos, ref[..., 0]) < 1e-6 and max_diff(sin, ref[..., 1]) < 1e-6
    else:
        model = llamavit.create_model(name, **kwargs)
        grid = kwargs["img_size"] // kwargs.get("patch_size", 4)
        for i in range(4):
            lsa, gsa = model.stage_ropes(i, (grid >> i, grid >> i))
            window, q, k = lsa["rope"], gsa["rope"], gsa["key_rope"]
            for key, table in ((f"rope_lsa_s{i}", window), (f"rope_gsa_q_s{i}", q), (f"rope_gsa_k_s{i}", k)):
                ref = outs[key]
                assert max_diff(table[0], ref[..., 0]) < 1e-6 and max_diff(table[1], ref[..., 1]) < 1e-6, key


# --- 2D RoPE and AS2DRoPE ------------------------------------------------------------------------
def test_grid_positions_and_class_token_position():
    x, y = grid_positions(6, 3, class_token=True)
    assert x.tolist() == [2, 0, 1, 2, 0, 1, 2] and y.tolist() == [-1, 0, 0, 0, 1, 1, 1]
    x, y = grid_positions(4, 4, step=2.0, offset=0.5)   # the official GSA key quirk: full-width rows
    assert x.tolist() == [0.5, 2.5, 4.5, 6.5] and y.tolist() == [0.5] * 4


def test_2d_rope_channel_layout():
    head_dim = 16
    angles = rope_2d_angles(torch.tensor([3.0]), torch.tensor([5.0]), head_dim)
    w = 10000.0 ** (-torch.arange(0, head_dim, 4).float() / head_dim)
    assert torch.allclose(angles[0, 0::2], 3.0 * w) and torch.allclose(angles[0, 1::2], 5.0 * w)
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_2d_angles(torch.zeros(1), torch.zeros(1), 6)


def test_2d_rope_preserves_norms_and_is_relative():
    gen = torch.Generator().manual_seed(0)
    head_dim = 32
    q, k = torch.randn(2, 1, 1, 1, head_dim, generator=gen, dtype=torch.float64)

    def rotated_dot(pq, pk):
        ang = rope_2d_angles(torch.tensor([pq[0], pk[0]], dtype=torch.float64),
                             torch.tensor([pq[1], pk[1]], dtype=torch.float64), head_dim)
        qr = apply_rope(q.expand(1, 1, 2, head_dim), ang.cos(), ang.sin())[0, 0, 0]
        kr = apply_rope(k.expand(1, 1, 2, head_dim), ang.cos(), ang.sin())[0, 0, 1]
        assert torch.allclose(qr.norm(), q.norm()) and torch.allclose(kr.norm(), k.norm())
        return (qr @ kr).item()

    base = rotated_dot((1.0, 2.0), (4.0, 0.5))
    for shift in ((3.0, -1.0), (-7.5, 10.0), (0.25, 0.0)):  # same offset between q and k, anywhere
        moved = rotated_dot((1.0 + shift[0], 2.0 + shift[1]), (4.0 + shift[0], 0.5 + shift[1]))
        assert math.isclose(base, moved, rel_tol=1e-9, abs_tol=1e-9)
    assert abs(base - rotated_dot((1.0, 2.0), (4.0, 1.5))) > 1e-3  # a different offset changes the score


def test_auto_scale_maps_every_resolution_onto_the_anchor():
    model = small(PLAIN, rope_auto_scale=True, class_token=False, global_pool="avg")
    cos32, _ = model.rope_tables((32, 32))     # 4x4 grid
    cos64, _ = model.rope_tables((64, 64))     # 8x8 grid: patch (2i, 2j) sits where (i, j) sat at 32 px
    even = cos64.view(8, 8, -1)[::2, ::2].reshape(16, -1)
    assert max_diff(even, cos32) < 1e-6
    no_scale = small(PLAIN, rope_auto_scale=False, class_token=False, global_pool="avg")
    assert max_diff(no_scale.rope_tables((64, 64))[0][:16], cos64[:16]) > 1e-2


def test_rope_tables_are_cached_and_never_saved():
    rope = Rope2D(8)
    assert rope(16, 4, 0.5)[0] is rope(16, 4, 0.5)[0]
    assert rope(16, 4, 0.5)[0] is not rope(16, 4, 1.0)[0]
    model = small(PLAIN)
    model(torch.randn(1, 3, 32, 32))
    assert not any("rope" in k for k in model.state_dict())
    pyramid = small(PYRAMID)
    assert not any("rope" in k for k in pyramid.state_dict())


# --- named configs and the timm contract ----------------------------------------------------------
@pytest.mark.parametrize("name,count", [
    ("visionllama_small_patch16_224", 21_961_192), ("visionllama_base_patch16_224", 86_388_712),
    ("visionllama_large_patch16_224", 310_342_632), ("visionllama_pyramid_small_224", 25_903_976),
    ("visionllama_pyramid_base_224", 56_029_480), ("visionllama_pyramid_large_224", 104_721_128)])
def test_official_parameter_counts(name, count):
    with torch.device("meta"):
        model = llamavit.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == count


def test_official_swiglu_width_and_layer_scale():
    with torch.device("meta"):
        model = llamavit.create_model("visionllama_base_patch16_224")
    assert model.blocks[0].mlp.fc1_g.out_features == 2048 and model.blocks[0].mlp.fc1_g.bias is None
    assert model.blocks[0].ls1.gamma.shape == (768,)
    assert isinstance(model.blocks[0].norm1, torch.nn.LayerNorm) and model.blocks[0].norm1.eps == 1e-6


def test_pyramid_feature_maps_shapes_and_strides():
    model = timm.create_model(PYRAMID, features_only=True, **PYRAMID_SMALL)
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [16, 24, 32, 48]
    maps = model(torch.randn(2, 3, 64, 96))
    assert [tuple(m.shape) for m in maps] == [(2, 16, 16, 24), (2, 24, 8, 12), (2, 32, 4, 6), (2, 48, 2, 3)]
    some = timm.create_model(PYRAMID, features_only=True, out_indices=(1, 3), **PYRAMID_SMALL)
    assert [m.shape[1] for m in some(torch.randn(1, 3, 64, 64))] == [24, 48]


def test_pyramid_intermediates_end_in_the_features():
    model = small(PYRAMID).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert max_diff(final, model.forward_features(x)) < 1e-6
        assert max_diff(model.norm(maps[-1].flatten(2).transpose(1, 2)), final) < 1e-6


def test_plain_feature_maps():
    model = timm.create_model(PLAIN, features_only=True, out_indices=(0, 1), **PLAIN_SMALL)
    maps = model(torch.randn(2, 3, 32, 48))
    assert [tuple(m.shape) for m in maps] == [(2, 32, 4, 6), (2, 32, 4, 6)]


@pytest.mark.parametrize("name,sizes", [(PLAIN, [(16, 16), (48, 48), (32, 64), (96, 40)]),
                                        (PYRAMID, [(96, 96), (64, 128), (100, 100)])])
def test_any_resolution_without_touching_weights(name, sizes):
    model = small(name).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for h, w in sizes:
        with torch.no_grad():
            assert model(torch.randn(1, 3, h, w)).shape == (1, 5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_plain_without_class_token_pools_through_the_norm():
    model = small(PLAIN, class_token=False, global_pool="avg").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (2, 16, 32)
        assert max_diff(model.forward_head(tokens, pre_logits=True), model.norm(tokens.mean(1))) < 1e-6


def test_plain_takes_an_attention_mask():
    model = small(PLAIN).eval()
    x = torch.randn(1, 3, 32, 32)
    n = 17
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    x2 = x.clone()
    x2[..., 24:, 24:] += 1.0   # changes only the last patch
    with torch.no_grad():
        a, b = model.forward_features(x, attn_mask=causal), model.forward_features(x2, attn_mask=causal)
    assert max_diff(a[:, :-1], b[:, :-1]) < 1e-6 and max_diff(a[:, -1], b[:, -1]) > 1e-4


# --- errors ---------------------------------------------------------------------------------------
def test_input_errors_are_explained():
    plain, pyramid = small(PLAIN), small(PYRAMID)
    with pytest.raises(ValueError, match="expected 3 input channel"):
        plain(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="not a positive multiple of the patch size 8x8"):
        plain(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="expected 3 input channel"):
        pyramid(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="at least 32x32"):
        pyramid(torch.randn(1, 3, 16, 16))


def test_configuration_errors_are_explained():
    with pytest.raises(ValueError, match="needs class_token=True"):
        small(PLAIN, class_token=False, global_pool="token")
    with pytest.raises(ValueError, match="wss has 3 entries but depths has 4 stages"):
        small(PYRAMID, wss=(4, 2, 2))
    with pytest.raises(ValueError, match="global_pool must be 'avg'"):
        small(PYRAMID, global_pool="token")
    with pytest.raises(ValueError, match="divisible by 4"):
        small(PLAIN, embed_dim=36, num_heads=6)


def test_checkpoint_of_the_other_family_is_refused(tmp_path):
    path = tmp_path / "plain.pth"
    torch.save({"model": small(PLAIN).state_dict()}, path)
    with pytest.raises(llamavit.CheckpointError, match="missing"):
        llamavit.create_model(PYRAMID, checkpoint_path=str(path), **PYRAMID_SMALL)
