"""AIM v1: parity with apple/ml-aim, split backbone/head checkpoints, parameter counts, the mask contract."""
import math

import pytest
import timm
import torch
from conftest import FIXTURES_DIR, fixture_files

import llamavit
from llamavit import CheckpointError
from llamavit.layers import prefix_causal_mask
from llamavit.layers.pos_embed import sincos_2d

TOL = 1e-4
STANDARD_KWARGS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "num_classes", "img_size", "patch_size",
                   "in_chans", "qkv_bias", "probe_layers")
SMALL = dict(embed_dim=48, depth=3, num_heads=3, img_size=28, patch_size=7, num_classes=5, probe_layers=2)
AIM_FIXTURES = fixture_files("aim_*.pt")


def small(**kwargs):
    return llamavit.create_model("aim_600m_patch14_224", **{**SMALL, **kwargs}).eval()


def max_diff(a, b):
    assert a.shape == b.shape, f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    return (a.float() - b.float()).abs().max().item()


# --- parity with the official implementation ------------------------------------------------------
@pytest.fixture(params=[pytest.param(p, id=p.stem) for p in AIM_FIXTURES] or [pytest.param(
    None, id="no-fixtures", marks=pytest.mark.skip(reason=f"no aim_*.pt parity fixtures in {FIXTURES_DIR}"))])
def official(request):
    fx = torch.load(request.param, weights_only=True)
    assert fx["family"] == "aim"
    kwargs = {k: fx["ours"]["kwargs"][k] for k in STANDARD_KWARGS if k in fx["ours"]["kwargs"]}
    return fx, kwargs


def _views(model, x, mask=None):
    with torch.no_grad():
        tokens = model.forward_features(x, attn_mask=mask)
        return {"logits": model(x, attn_mask=mask), "tokens": tokens,
                "features": model.forward_head(tokens, pre_logits=True)}


def test_parity_official_release(official, tmp_path):
    fx, kwargs = official
    path = tmp_path / "official.pth"
    torch.save({"model": fx["state_dict"]}, path)
    model = llamavit.create_model("aim_600m_patch14_224", checkpoint_path=str(path), **kwargs).eval()
    assert sum(p.numel() for p in model.parameters()) == fx["param_count"]
    outs, x = fx["outputs"], fx["inputs"]
    checked = []
    cases = [("", x, None), ("_causal", x, fx["masks"]["causal"].bool()),
             ("_prefix", x, fx["masks"]["prefix_attn"].bool())]
    cases += [(k[len("logits"):], fx["inputs" + k[len("logits"):]], None) for k in outs if k.startswith("logits_at_")]
    for suffix, inp, mask in cases:
        for name, value in _views(model, inp, mask).items():
            if name + suffix in outs:
                d = max_diff(value, outs[name + suffix])
                assert d <= TOL, f"{name}{suffix}: max|diff| = {d:.3g}"
                checked.append(name + suffix)
    assert {"logits", "features", "tokens", "logits_causal", "tokens_causal", "logits_prefix", "tokens_prefix",
            "features_prefix"} <= set(checked)
    assert any(c.startswith("logits_at_") for c in checked)
    # the masks change the answer: they really reach every block
    assert max_diff(outs["logits"], outs["logits_causal"]) > 1e-3
    assert max_diff(outs["logits_causal"], outs["logits_prefix"]) > 1e-3
    if "last_normed" in outs:  # what the pre-training decoder reads
        with torch.no_grad():
            assert max_diff(model.forward_trunk(x), outs["last_normed"]) <= TOL


def test_prefix_mask_of_fixture_is_ours(official):
    fx, _ = official
    lengths = torch.tensor(fx["prefix_lengths"])
    n = fx["masks"]["causal"].shape[0]
    assert torch.equal(prefix_causal_mask(n, lengths), fx["masks"]["prefix_attn"].bool())
    assert torch.equal(prefix_causal_mask(n, 1), fx["masks"]["causal"].bool())


def test_split_backbone_and_head_files_load_without_copy(official, tmp_path, monkeypatch):
    """The official release layout: a backbone file and a head file, merged; tensors are assigned, not copied."""
    fx, kwargs = official
    sd = fx["state_dict"]
    backbone, head = tmp_path / "aim_attnprobe_backbone.pth", tmp_path / "aim_attnprobe_head_best_layers.pth"
    torch.save({k: v for k, v in sd.items() if not k.startswith("head.")}, backbone)
    torch.save({k: v for k, v in sd.items() if k.startswith("head.")}, head)
    loaded = []
    real_load = torch.load

    def spy_load(*a, **kw):
        loaded.append(real_load(*a, **kw))
        return loaded[-1]

    monkeypatch.setattr(torch, "load", spy_load)
    model = llamavit.create_model("aim_600m_patch14_224", checkpoint_path=[str(backbone), str(head)], **kwargs).eval()
    with torch.no_grad():
        assert max_diff(model(fx["inputs"]), fx["outputs"]["logits"]) <= TOL
    pointers = {t.data_ptr() for obj in loaded for t in obj.values()}
    assert all(not p.is_meta and p.data_ptr() in pointers for p in model.parameters())
    assert model.head.bn.num_batches_tracked.dtype == torch.long
    # the head alone is not enough, and overlapping files are refused
    with pytest.raises(CheckpointError, match="missing keys: preprocessor"):
        llamavit.create_model("aim_600m_patch14_224", checkpoint_path=[str(head)], **kwargs)
    with pytest.raises(CheckpointError, match="repeats keys"):
        llamavit.create_model("aim_600m_patch14_224", checkpoint_path=[str(backbone), str(head), str(head)], **kwargs)


# --- names and parameter counts -------------------------------------------------------------------
@pytest.mark.parametrize("name,count", [
    ("aim_600m_patch14_224", 686_791_680), ("aim_1b_patch14_224", 1_219_809_280),
    ("aim_3b_patch14_224", 2_741_975_040), ("aim_7b_patch14_224", 6_483_058_688)])
def test_official_parameter_counts(name, count):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == count


def test_official_key_names():
    keys = set(small().state_dict())
    assert {"preprocessor.patchifier.proj.weight", "preprocessor.patchifier.proj.bias",
            "preprocessor.patchifier.norm.weight", "trunk.blocks.0.norm1.bias", "trunk.blocks.2.attn.qkv.weight",
            "trunk.blocks.2.attn.proj.weight", "trunk.blocks.1.mlp.fc1.weight", "trunk.blocks.1.mlp.fc2.weight",
            "trunk.post_trunk_norm.weight", "head.cls_token", "head.k.weight", "head.v.weight", "head.linear.weight",
            "head.bn.running_mean", "head.bn.running_var", "head.bn.num_batches_tracked"} <= keys
    assert not any(k.endswith(".bias") and (".attn." in k or ".mlp." in k or k.startswith("head.")) for k in keys)


# --- the mask contract ------------------------------------------------------------------------------
def test_mask_shapes_agree_and_causality_holds():
    model = small()
    x = torch.randn(2, 3, 28, 28)
    n = 16
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    with torch.no_grad():
        a = model.forward_features(x, attn_mask=causal)
        b = model.forward_features(x, attn_mask=causal.expand(2, 1, n, n))
        assert max_diff(a, b) == 0
        # patch 5 (row 1, col 1) and later do not reach tokens 0..4 under the causal mask
        x2 = x.clone()
        x2[:, :, 7:, 7:] += 1.0
        c = model.forward_features(x2, attn_mask=causal)
        assert max_diff(a[:, :5], c[:, :5]) < 1e-6
        assert max_diff(a[:, 5:], c[:, 5:]) > 1e-3
        # prefix-causal: with prefix 4 tokens 0..4 still do not see patch 5; with prefix 8 token 0 does
        for length, sees_patch_5 in ((4, False), (8, True)):
            prefix = prefix_causal_mask(n, torch.tensor([length, length]))
            first = [model.forward_features(inp, attn_mask=prefix)[:, 0] for inp in (x, x2)]
            d = max_diff(*first)
            assert (d > 1e-3) == sees_patch_5
        full = torch.ones(n, n, dtype=torch.bool)
        assert max_diff(model.forward_features(x), model.forward_features(x, attn_mask=full)) < 1e-6


def test_wrong_mask_size_is_explained():
    with pytest.raises(ValueError, match="does not fit 16 tokens"):
        small()(torch.randn(1, 3, 28, 28), attn_mask=torch.ones(9, 9, dtype=torch.bool))


def test_sincos_table_and_any_resolution():
    d, h, w = 8, 2, 3
    table = sincos_2d(d, h, w)
    for p in range(h * w):
        row, col = divmod(p, w)
        omega = [1 / 10000 ** (i / 2) for i in range(2)]
        expect = [math.sin(col * o) for o in omega] + [math.cos(col * o) for o in omega] + \
                 [math.sin(row * o) for o in omega] + [math.cos(row * o) for o in omega]
        assert torch.allclose(table[p], torch.tensor(expect), atol=1e-6)
    model = small()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 42, 21)).shape == (2, 5)


# --- timm contract and options ---------------------------------------------------------------------
def test_probe_layers_int_is_last_k_and_list_works():
    a, b = small(probe_layers=2), small(probe_layers=[1, 2])
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert max_diff(a(x), b(x)) == 0
    assert a.probe_layers == (1, 2)
    with pytest.raises(ValueError, match="probe_layers"):
        small(probe_layers=[3])
    with pytest.raises(ValueError, match="probe_layers"):
        small(probe_layers=4)


def test_attentive_head_contract():
    model = small()
    x = torch.randn(2, 3, 28, 28)
    tokens = model.forward_features(x)
    assert tokens.shape == (2, 16, 48) and model.num_features == 48
    assert "head.cls_token" in model.no_weight_decay()
    model.reset_classifier(7)
    assert model(x).shape == (2, 7) and model.get_classifier().bias is None   # the official head has no bias
    assert timm.create_model("aim_1b_patch14_224", **SMALL).pretrained_cfg["classifier"] == "head.linear"
    # the classifier never reads the post-trunk norm: frozen there, trainable for pre-training
    assert not any(p.requires_grad for p in model.trunk.post_trunk_norm.parameters())
    model.set_post_trunk_norm_trainable()
    assert all(p.requires_grad for p in model.trunk.post_trunk_norm.parameters())
