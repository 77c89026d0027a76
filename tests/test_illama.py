"""iLLaMA: parity with the official implementation, checkpoint loading, the timm contract, errors."""
import argparse

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

import llamavit
from llamavit import CheckpointError

TOL = 1e-4
STANDARD_KWARGS = ("embed_dim", "depth", "num_heads", "mlp_ratio", "num_classes", "img_size", "patch_size",
                   "in_chans", "qkv_bias")
SMALL = dict(embed_dim=48, depth=2, num_heads=2, img_size=32, patch_size=8, num_classes=5)
SMALL_PATCHES = (32 // 8) ** 2
ILLAMA_NAMES = llamavit.list_models("illama*")
OFFICIAL_BLOCK_KEYS = ("norm1.weight", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
                       "norm2.weight", "mlp.fc1.weight", "mlp.fc2.weight", "mlp.fc3.weight")


def small(name="illama_tiny_patch16_224", **kwargs):
    return llamavit.create_model(name, **{**SMALL, **kwargs})


def max_diff(a, b):
    assert a.shape == b.shape, f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
    return (a.float() - b.float()).abs().max().item()


def official_state_dict(model):
    """Our state dict under the official iLLaMA key names (SwiGLU fc1 = gate, fc3 = up, fc2 = down)."""
    return {k.replace("mlp.fc1_g.", "mlp.fc1.").replace("mlp.fc1_x.", "mlp.fc3."): v.clone()
            for k, v in model.state_dict().items()}


class NotATensor:
    """An arbitrary Python object; unpickling it would record that it happened."""
    unpickled = False

    def __init__(self):
        self.payload = [1, 2, 3]

    def __setstate__(self, state):
        NotATensor.unpickled = True
        self.__dict__.update(state)


# --- parity with the official implementation ------------------------------------------------------
@pytest.fixture
def official(illama_fixture_path):
    fx = torch.load(illama_fixture_path, weights_only=True)
    assert fx["family"] == "illama"
    kwargs = {k: fx["ours"]["kwargs"][k] for k in STANDARD_KWARGS if k in fx["ours"]["kwargs"]}
    return fx, kwargs


def _check_outputs(model, fx):
    x, outs = fx["inputs"], fx["outputs"]
    checked = []
    model.eval()
    for rate, suffix in ((0.0, ""), (0.5, "_softmask_0.5"), (1.0, "_softmask_1.0")):
        if not any(k.endswith(suffix) for k in outs) and suffix:
            continue
        model.set_soft_mask_rate(rate)
        with torch.no_grad():
            tokens = model.forward_features(x)
            got = {"logits": model(x), "tokens": tokens, "features": model.forward_head(tokens, pre_logits=True)}
        for name, value in got.items():
            if name + suffix in outs:
                d = max_diff(value, outs[name + suffix])
                assert d <= TOL, f"{name}{suffix}: max|diff| = {d:.3g} > {TOL}"
                checked.append(name + suffix)
    model.set_soft_mask_rate(0.0)
    return checked


def test_parity_official_release_checkpoint(official, tmp_path):
    fx, kwargs = official
    path = tmp_path / "official.pth"
    torch.save({"model": fx["state_dict"]}, path)
    model = llamavit.create_model("illama_tiny_patch16_224", checkpoint_path=str(path), **kwargs)
    assert sum(p.numel() for p in model.parameters()) == fx["param_count"]
    checked = _check_outputs(model, fx)
    assert {"logits", "tokens", "features"} <= set(checked)
    assert {"logits_softmask_0.5", "logits_softmask_1.0"} <= set(checked)
    # the three masks give genuinely different answers: the rate is really applied
    outs = fx["outputs"]
    assert max_diff(outs["logits"], outs["logits_softmask_1.0"]) > 1e-3
    assert max_diff(outs["logits"], outs["logits_softmask_0.5"]) > 1e-3


def test_parity_plain_state_dict(official, tmp_path):
    fx, kwargs = official
    path = tmp_path / "plain.pth"
    torch.save(fx["state_dict"], path)
    model = llamavit.create_model("illama_tiny_patch16_224", checkpoint_path=str(path), **kwargs)
    assert "logits" in _check_outputs(model, fx)


def test_parity_official_training_checkpoint_with_namespace(official, tmp_path, monkeypatch):
    fx, kwargs = official
    path = tmp_path / "checkpoint-best.pth"
    args = argparse.Namespace(model="illama_tiny", lr=4e-3, epochs=300, cutoff_epoch=50, soft_mask_rate=0.0)
    torch.save({"model": fx["state_dict"], "optimizer": {"state": {}, "param_groups": [{"lr": 4e-3}]},
                "epoch": 299, "scaler": {"scale": 65536.0}, "args": args,
                "model_ema": {k: v + 1 for k, v in fx["state_dict"].items()}}, path)
    calls = []
    real_load = torch.load

    def spy_load(*a, **kw):
        calls.append(kw.get("weights_only"))
        return real_load(*a, **kw)

    monkeypatch.setattr(torch, "load", spy_load)
    model = llamavit.create_model("illama_tiny_patch16_224", checkpoint_path=str(path), **kwargs)
    assert calls and all(w is True for w in calls), f"torch.load called with weights_only={calls}"
    assert "logits" in _check_outputs(model, fx)     # 'model', not 'model_ema', was loaded


def test_arbitrary_pickled_object_is_refused(official, tmp_path):
    fx, kwargs = official
    path = tmp_path / "evil.pth"
    torch.save({"model": fx["state_dict"], "extra": NotATensor()}, path)
    NotATensor.unpickled = False
    with pytest.raises(CheckpointError, match="weights_only") as err:
        llamavit.create_model("illama_tiny_patch16_224", checkpoint_path=str(path), **kwargs)
    assert str(path) in str(err.value)
    assert not NotATensor.unpickled


# --- parameter counts ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name,count", [
    ("illama_tiny_patch16_224", 5_701_096), ("illama_small_patch16_224", 22_018_024),
    ("illama_base_patch16_224", 86_502_376), ("illama_large_patch16_224", 310_445_032)])
def test_official_parameter_counts(name, count):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == count
    # the 384 variant differs only by the (576 - 196) extra pos_embed rows
    with torch.device("meta"):
        hi = timm.create_model(name.replace("_224", "_384"))
    assert sum(p.numel() for p in hi.parameters()) == count + (576 - 196) * model.embed_dim


@pytest.mark.parametrize("name,dims", [
    ("illama_tiny_patch16_224", (192, 12, 3, 512)), ("illama_small_patch16_384", (384, 12, 6, 1024)),
    ("illama_base_patch16_224", (768, 12, 12, 2048)), ("illama_large_patch16_224", (1024, 24, 16, 2816))])
def test_named_configs(name, dims):
    dim, depth, heads, hidden = dims
    with torch.device("meta"):
        model = llamavit.create_model(name)
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (dim, depth, heads)
    assert model.blocks[0].mlp.fc1_g.out_features == hidden
    assert model.patch_embed.patch_size == (16, 16)
    assert model.patch_embed.img_size == ((384, 384) if "384" in name else (224, 224))
    assert model.num_classes == 1000 and model.soft_mask_rate == 0.0


def test_state_dict_keys_are_official_after_conversion():
    model = small()
    keys = set(official_state_dict(model))
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
                "head.weight", "head.bias"}
    expected |= {f"blocks.{i}.{k}" for i in range(2) for k in OFFICIAL_BLOCK_KEYS}
    assert keys == expected


# --- timm contract, on every registered name ---------------------------------------------------------
def test_list_models():
    assert ILLAMA_NAMES == sorted(f"illama_{s}_patch16_{r}" for s in ("tiny", "small", "base", "large")
                                  for r in (224, 384))
    assert llamavit.list_models("illama_tiny*") == ["illama_tiny_patch16_224", "illama_tiny_patch16_384"]


@pytest.fixture(params=ILLAMA_NAMES)
def name(request):
    return request.param


def test_timm_create_model_small(name):
    assert SMALL["embed_dim"] // SMALL["num_heads"] % 2 == 0, "RoPE needs an even head dim"
    model = timm.create_model(name, **SMALL)
    assert isinstance(model, llamavit.models.ILLaMA)
    assert model.default_cfg["input_size"] == ((3, 384, 384) if "384" in name else (3, 224, 224))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        tokens = model.forward_features(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    assert tokens.shape == (2, SMALL_PATCHES + 1, 48) and torch.isfinite(tokens).all()
    assert model.num_features == 48
    torch.testing.assert_close(model.forward_head(tokens), out)
    # the pooled feature is the final-norm class token, appended LAST
    torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), tokens[:, -1])


def test_reset_classifier_switches_the_pooling():
    model = small().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
    model.reset_classifier(7)
    assert model.num_classes == 7 and model.get_classifier().out_features == 7
    with torch.no_grad():
        after = model(x)
        feats_after = model.forward_head(model.forward_features(x), pre_logits=True)
    assert before.shape == (2, 5) and after.shape == (2, 7)
    torch.testing.assert_close(feats_after, feats)                  # only the head changed
    torch.testing.assert_close(after, model.head(feats))
    model.reset_classifier(0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), feats)
    model.reset_classifier(3, global_pool="avg")
    with torch.no_grad():
        tokens = model.forward_features(x)
        torch.testing.assert_close(model(x), model.head(tokens.mean(1)))
    with pytest.raises(ValueError, match="global_pool must be 'token' or 'avg', got 'max'"):
        model.reset_classifier(3, global_pool="max")


def test_rope_buffers_not_in_state_dict(name):
    model = small(name)
    sd = model.state_dict()
    assert not any("rope" in k or "freqs" in k or k.endswith(("cos", "sin", "inv_freq")) for k in sd)
    buffers = {n for n, _ in model.named_buffers()}
    assert {"rope.cos", "rope.sin", "rope.inv_freq"} <= buffers
    assert model.rope.cos.shape == (SMALL_PATCHES + 1, 24 // 2)
    # a fresh model loads the state dict strictly, tables recomputed
    fresh = small(name)
    fresh.load_state_dict(sd, strict=True)


@pytest.mark.parametrize("size", [48, 64])
def test_any_resolution(name, size):
    model = small(name).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = model(x)
        tokens = model.forward_features(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    assert tokens.shape == (2, (size // 8) ** 2 + 1, 48)


def test_resolution_change_equals_model_built_with_interpolated_pos_embed(tmp_path):
    """A model built at 32 fed 64 px == a model built at 64 holding the interpolated pos_embed."""
    model32 = small().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out32 = model32(x)
        tokens32 = model32.forward_features(x)

    sd = model32.state_dict()
    pos = sd["pos_embed"]
    patch_pos = resample_abs_pos_embed(pos[:, :-1], [8, 8], [4, 4], num_prefix_tokens=0)
    sd64 = {**sd, "pos_embed": torch.cat((patch_pos, pos[:, -1:]), dim=1)}
    model64 = small(img_size=64).eval()
    model64.load_state_dict(sd64, strict=True)
    with torch.no_grad():
        assert max_diff(model64(x), out32) <= 1e-5
        assert max_diff(model64.forward_features(x), tokens32) <= 1e-5

    # the same through checkpoint loading: the official filter resamples pos_embed to the model's grid
    path = tmp_path / "at32.pth"
    torch.save({"model": official_state_dict(model32)}, path)
    loaded = small(img_size=64, checkpoint_path=str(path)).eval()
    assert loaded.pos_embed.shape == (1, 65, 48)
    with torch.no_grad():
        assert max_diff(loaded(x), out32) <= 1e-5
        assert max_diff(loaded.pos_embed, model64.pos_embed) == 0.0


def test_attn_mask_argument_on_model():
    model = small().eval()
    x = torch.randn(2, 3, 32, 32)
    n = SMALL_PATCHES + 1
    with torch.no_grad():
        model.set_soft_mask_rate(1.0)
        bidirectional = model(x)
        model.set_soft_mask_rate(0.0)
        full = model(x, attn_mask=torch.ones(n, n, dtype=torch.bool))
        causal = model(x)
    torch.testing.assert_close(full, bidirectional, atol=1e-5, rtol=1e-5)
    assert max_diff(causal, bidirectional) > 1e-4


# --- checkpoint formats ---------------------------------------------------------------------------------
def test_own_checkpoint_formats_round_trip(tmp_path):
    model = small().eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    st = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(st))
    ddp = tmp_path / "ddp.pth"
    torch.save({"model": {"module." + k: v for k, v in official_state_dict(model).items()}}, ddp)
    ckdir = tmp_path / "ckpt"
    ckdir.mkdir()
    save_file(model.state_dict(), str(ckdir / "model.safetensors"))
    for path in (st, ddp, ckdir):
        other = small(checkpoint_path=str(path)).eval()
        with torch.no_grad():
            assert max_diff(other(x), ref) == 0.0, path.name
    # loading into a model built at another resolution resamples the official pos_embed
    other = small(img_size=48, checkpoint_path=str(ddp))
    assert other.pos_embed.shape == (1, 37, 48)
    torch.testing.assert_close(other.pos_embed[:, -1], model.pos_embed[:, -1])   # class row kept, last


def test_checkpoint_with_renamed_keys_names_them(tmp_path):
    sd = official_state_dict(small())
    sd["blocks.0.attn.in_proj.weight"] = sd.pop("blocks.0.attn.qkv.weight")
    del sd["head.bias"]
    path = tmp_path / "renamed.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError) as err:
        small(checkpoint_path=str(path))
    msg = str(err.value)
    assert "does not fit ILLaMA" in msg and str(path) in msg
    assert "missing keys: blocks.0.attn.qkv.weight, head.bias" in msg
    assert "unexpected keys: blocks.0.attn.in_proj.weight" in msg


def test_checkpoint_of_other_dims_reports_shape_mismatch(tmp_path):
    path = tmp_path / "wider.pth"
    torch.save({"model": official_state_dict(small(embed_dim=64))}, path)
    with pytest.raises(CheckpointError, match="shape mismatch") as err:
        small(checkpoint_path=str(path))
    msg = str(err.value)
    assert "blocks.0.attn.proj.bias (64,) vs model (48,)" in msg
    assert "more)" in msg                                          # the long list is cut, with a count
    # a deeper model: the extra block's keys are unexpected
    path2 = tmp_path / "deeper.pth"
    torch.save(official_state_dict(small(depth=3)), path2)
    with pytest.raises(CheckpointError, match=r"unexpected keys: blocks\.2\.attn\.proj\.bias"):
        small(checkpoint_path=str(path2))


def test_checkpoint_errors_for_missing_and_unreadable_files(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(CheckpointError, match=f"checkpoint not found: {missing}"):
        small(checkpoint_path=str(missing))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        small(checkpoint_path=str(garbage))
    not_sd = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_sd)
    with pytest.raises(CheckpointError, match="does not hold a state dict of tensors"):
        small(checkpoint_path=str(not_sd))
    empty_dir = tmp_path / "dir"
    empty_dir.mkdir()
    with pytest.raises(CheckpointError, match="directory without model.safetensors"):
        small(checkpoint_path=str(empty_dir))
    assert issubclass(CheckpointError, ValueError)


# --- errors ---------------------------------------------------------------------------------------------------
def test_unknown_model_name_suggests_close_name():
    with pytest.raises(ValueError, match=r"unknown model 'illama_tiny_patch16_22'; did you mean "
                                         r"illama_tiny_patch16_224") as err:
        llamavit.create_model("illama_tiny_patch16_22")
    assert not isinstance(err.value, CheckpointError)
    with pytest.raises(ValueError, match="unknown model 'resnet_xyz_q'; `llamavit models` lists them"):
        llamavit.create_model("resnet_xyz_q")


def test_pretrained_without_checkpoint_path_is_explained():
    with pytest.raises(ValueError, match="downloads no weights; pass checkpoint_path="):
        llamavit.create_model("illama_tiny_patch16_224", pretrained=True)


def test_unknown_kwarg_lists_valid_options():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['embed_dims'\]") as err:
        llamavit.create_model("illama_tiny_patch16_224", embed_dims=48)
    msg = str(err.value)
    assert "valid options:" in msg
    for option in ("embed_dim", "depth", "num_heads", "mlp_ratio", "img_size", "drop_path_rate", "global_pool"):
        assert f"'{option}'" in msg
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['bogus'\]"):
        timm.create_model("illama_tiny_patch16_224", bogus=1)


def test_forward_input_errors():
    model = small()
    with pytest.raises(ValueError, match=r"expected 3 input channel\(s\), got 1"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"input size 36x32 is not a positive multiple of the patch size 8x8$"):
        model(torch.randn(1, 3, 36, 32))
    with pytest.raises(ValueError, match=r"expected images of shape \(B, C, H, W\)"):
        model(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match=r"expected a floating-point image tensor, got torch.uint8 \(e.g. x.float\(\)"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="expected a batch of at least one image, got an empty batch"):
        model(torch.zeros(0, 3, 32, 32))
    with pytest.raises(ValueError, match="img_size 28x28 is not a multiple of the patch size 8x8"):
        small(img_size=28)
    gray = small(in_chans=1)
    assert gray(torch.randn(1, 1, 32, 32)).shape == (1, 5)


def test_set_soft_mask_rate_validates_and_propagates():
    model = small()
    for bad in (1.5, -0.1):
        with pytest.raises(ValueError, match=rf"soft mask rate must be in \[0, 1\], got {bad}"):
            model.set_soft_mask_rate(bad)
    model.set_soft_mask_rate(0.3)
    assert model.soft_mask_rate == 0.3
    assert all(blk.attn.soft_mask_rate == 0.3 for blk in model.blocks)
    assert small(soft_mask_rate=0.7).blocks[1].attn.soft_mask_rate == 0.7
    with pytest.raises(ValueError, match="global_pool must be 'token' or 'avg', got 'max'"):
        small(global_pool="max")


# --- causality -------------------------------------------------------------------------------------------------
def _first_and_last_change(model, x, x2):
    with torch.no_grad():
        a, b = model.forward_features(x), model.forward_features(x2)
    return (a[:, 0] - b[:, 0]).abs().max().item(), (a[:, -1] - b[:, -1]).abs().max().item()


def test_causality_of_the_masks():
    """Perturb the last patch: does the first token's output move?

    - renormalised causal attention: no, earlier tokens are independent of later ones;
    - the official soft mask at r = 0: the VALUES of later tokens are masked, but their KEYS still sit in
      the softmax denominator (the mask is applied after the softmax), so it moves, a little;
    - r = 1 (bidirectional): it moves.
    """
    x = torch.randn(2, 3, 32, 32)
    x2 = x.clone()
    x2[:, :, 24:, 24:] += 3 * torch.randn(2, 3, 8, 8)           # the last patch in raster order

    causal = small(mask_mode="causal").eval()
    with torch.no_grad():     # re-randomise as the parity fixtures do: sharper attention than the init's
        for n, p in causal.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in n else 0.1 * torch.randn_like(p))
    first, last = _first_and_last_change(causal, x, x2)
    assert first <= 1e-6, f"causal mode: first token moved by {first}"
    assert last > 1e-3

    soft = small().eval()
    soft.load_state_dict(causal.state_dict())
    soft.set_soft_mask_rate(0.0)
    first0, last0 = _first_and_last_change(soft, x, x2)
    soft.set_soft_mask_rate(1.0)
    first1, last1 = _first_and_last_change(soft, x, x2)
    assert first1 > 1e-3 and last1 > 1e-3
    assert first0 > 1e-4 and last0 > 1e-3
    assert first0 < first1                                          # far less than fully bidirectional


def test_bad_head_configuration_is_explained():
    with pytest.raises(ValueError, match="RoPE needs an even head dim, got 15"):
        small(embed_dim=30, num_heads=2)
    with pytest.raises(ValueError, match=r"dim \(50\) must be divisible by num_heads \(3\)"):
        small(embed_dim=50, num_heads=3)
