"""OpenMMLab VisionLLaMA backbones (mmseg / mmdet / mmpretrain files) into the plain and pyramid trunks.

The official files are written here from the facts in llamavit/dense/openmmlab.py (key names and shapes of
mmpretrain's VisionLLaMA / MAELLaMA and mmseg's PyramidVisionLLaMA), independently of the converter.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import llamavit
from llamavit.dense.openmmlab import (MMPRETRAIN_KWARGS, backbone_state_dict, is_openmmlab_state,
                                      load_openmmlab_backbone)
from llamavit.errors import CheckpointError
from llamavit.models.visionllama import convert_official

DIM, DEPTH, HEADS, PATCH, IMG = 64, 2, 2, 16, 32
PYRAMID_DIMS, PYRAMID_DEPTHS, PYRAMID_HEADS, SR_RATIOS = (16, 32, 32, 64), (2, 2, 2, 2), (1, 1, 1, 2), (8, 4, 2, 1)


def _round_up(n: int, k: int = 256) -> int:
    return k * math.ceil(n / k)


# --- official state dicts, from the recorded facts ---------------------------------------------------
def mmpretrain_backbone(cls_token=False, final_norm=False, avg_norm=False, layer_scale=False, grid=IMG // PATCH):
    """mmpretrain VisionLLaMA (arch: DIM wide, DEPTH layers, feedforward_channels 4 * DIM) under its own names."""
    hidden = _round_up(int(4 * DIM * 8 / 3))   # LLaMAMLP: int(8/3 * feedforward_channels), to a multiple of 256
    shapes = {"patch_embed.projection.weight": (DIM, 3, PATCH, PATCH), "patch_embed.projection.bias": (DIM,),
              "pos_embed": (1, grid * grid + int(cls_token), DIM)}
    if cls_token:
        shapes["cls_token"] = (1, 1, DIM)
    for i in range(DEPTH):
        p = f"layers.{i}."
        shapes.update({p + "ln1.weight": (DIM,), p + "ln1.bias": (DIM,),
                       p + "attn.qkv.weight": (3 * DIM, DIM), p + "attn.qkv.bias": (3 * DIM,),
                       p + "attn.proj.weight": (DIM, DIM), p + "attn.proj.bias": (DIM,),
                       p + "ln2.weight": (DIM,), p + "ln2.bias": (DIM,),
                       p + "ffn.w12.weight": (2 * hidden, DIM), p + "ffn.w12.bias": (2 * hidden,),
                       p + "ffn.w3.weight": (DIM, hidden), p + "ffn.w3.bias": (DIM,)})
        if layer_scale:
            shapes.update({p + "attn.gamma1.weight": (DIM,), p + "ffn.gamma2.weight": (DIM,)})
    for name, present in (("ln1", final_norm), ("ln2", avg_norm)):
        if present:
            shapes.update({f"{name}.weight": (DIM,), f"{name}.bias": (DIM,)})
    return {k: torch.randn(s) for k, s in shapes.items()}


def twins_llama_backbone(norm_after_stage=False):
    """mmseg PyramidVisionLLaMA (GroupBlock: LSA at even, GSA at odd index) under its own names."""
    shapes = {}
    for s, dim in enumerate(PYRAMID_DIMS):
        cin, k = (3, 4) if s == 0 else (PYRAMID_DIMS[s - 1], 2)
        shapes.update({f"patch_embeds.{s}.proj.weight": (dim, cin, k, k), f"patch_embeds.{s}.proj.bias": (dim,),
                       f"patch_embeds.{s}.norm.weight": (dim,), f"patch_embeds.{s}.norm.bias": (dim,)})
        hidden = _round_up(int(2 * 4 * dim / 3))
        for j in range(PYRAMID_DEPTHS[s]):
            p = f"blocks.{s}.{j}."
            shapes.update({p + n: (dim,) for n in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
                                                   "gamma_1", "gamma_2", "attn.proj.bias")})
            shapes.update({p + "attn.proj.weight": (dim, dim), p + "mlp.c_fc1.weight": (hidden, dim),
                           p + "mlp.c_fc2.weight": (hidden, dim), p + "mlp.c_proj.weight": (dim, hidden)})
            if j % 2 == 0:
                shapes.update({p + "attn.qkv.weight": (3 * dim, dim), p + "attn.qkv.bias": (3 * dim,)})
                continue
            shapes.update({p + "attn.q.weight": (dim, dim), p + "attn.q.bias": (dim,),
                           p + "attn.kv.weight": (2 * dim, dim), p + "attn.kv.bias": (2 * dim,)})
            sr = SR_RATIOS[s]
            if sr > 1:
                shapes.update({p + "attn.sr.weight": (dim, dim, sr, sr), p + "attn.sr.bias": (dim,),
                               p + "attn.norm.weight": (dim,), p + "attn.norm.bias": (dim,)})
        if norm_after_stage:
            shapes.update({f"norm_list.{s}.weight": (dim,), f"norm_list.{s}.bias": (dim,)})
    return {k: torch.randn(s) for k, s in shapes.items()}


def save_mm(tmp_path, backbone, name="iter_160000.pth", heads=("decode_head", "auxiliary_head")):
    """An mmengine-style file: {'meta', 'state_dict'} with backbone.* beside heads / necks."""
    state = {f"backbone.{k}": v for k, v in backbone.items()}
    for head in heads:
        state[f"{head}.conv_seg.weight"] = torch.randn(150, 8, 1, 1)
        state[f"{head}.conv_seg.bias"] = torch.randn(150)
    path = tmp_path / name
    torch.save({"meta": {"mmseg_version": "1.2.2", "iter": 160000, "cfg": "model = dict(type='EncoderDecoder')"},
                "state_dict": state}, path)
    return path


def plain(**kwargs):
    options = {**MMPRETRAIN_KWARGS, "embed_dim": DIM, "depth": DEPTH, "num_heads": HEADS, "img_size": IMG,
               "num_classes": 7, **kwargs}
    return llamavit.create_model("visionllama_base_patch16_224", **options).eval()


def pyramid(**kwargs):
    options = {"embed_dims": PYRAMID_DIMS, "depths": PYRAMID_DEPTHS, "num_heads": PYRAMID_HEADS, "img_size": 64,
               "rope_auto_scale": True, "num_classes": 3, **kwargs}
    return llamavit.create_model("visionllama_pyramid_small_224", **options).eval()


def message(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text, text
    return text


# --- plain: mmpretrain VisionLLaMA / MAELLaMA -------------------------------------------------------
def test_is_openmmlab_state():
    backbone = mmpretrain_backbone()
    assert is_openmmlab_state({"meta": {}, "state_dict": {"backbone.pos_embed": backbone["pos_embed"]}})
    assert is_openmmlab_state({f"backbone.{k}": v for k, v in backbone.items()})
    assert not is_openmmlab_state(plain().state_dict())
    assert not is_openmmlab_state(torch.zeros(1))


def test_mae_file_lands_in_the_plain_trunk(tmp_path):
    """An MAE pre-training file (class token, sin-cos pos_embed, final ln1, neck.* decoder) -> our plain trunk."""
    official = mmpretrain_backbone(cls_token=True, final_norm=True)
    path = save_mm(tmp_path, official, "epoch_800.pth", heads=("neck",))
    model = plain()
    head = {k: v.clone() for k, v in model.get_classifier().state_dict().items()}
    load_openmmlab_backbone(model, str(path))

    hidden = official["layers.0.ffn.w3.weight"].shape[1]
    assert torch.equal(model.patch_embed.proj.weight, official["patch_embed.projection.weight"])
    blk = model.blocks[1]
    assert torch.equal(blk.norm1.bias, official["layers.1.ln1.bias"])
    assert torch.equal(blk.attn.qkv.weight, official["layers.1.attn.qkv.weight"])
    assert torch.equal(blk.attn.proj.bias, official["layers.1.attn.proj.bias"])
    assert torch.equal(blk.mlp.fc1_g.weight, official["layers.1.ffn.w12.weight"][:hidden])
    assert torch.equal(blk.mlp.fc1_x.bias, official["layers.1.ffn.w12.bias"][hidden:])
    assert torch.equal(blk.mlp.fc2.weight, official["layers.1.ffn.w3.weight"])
    assert torch.equal(model.norm.weight, official["ln1.weight"])
    assert all(torch.equal(v, head[k]) for k, v in model.get_classifier().state_dict().items())

    # the fused SwiGLU as mmpretrain computes it: w3(silu(x1) * x2), (x1, x2) = w12(x) in halves
    x = torch.randn(2, 5, DIM)
    x1, x2 = F.linear(x, official["layers.0.ffn.w12.weight"], official["layers.0.ffn.w12.bias"]).chunk(2, dim=-1)
    expected = F.linear(F.silu(x1) * x2, official["layers.0.ffn.w3.weight"], official["layers.0.ffn.w3.bias"])
    with torch.no_grad():
        assert torch.allclose(model.blocks[0].mlp(x), expected, atol=1e-5)

        images = torch.randn(2, 3, IMG, IMG)
        tokens = model.forward_features(images)
        assert tokens.shape == (2, (IMG // PATCH) ** 2, DIM) and torch.isfinite(tokens).all()
        assert torch.equal(tokens, model.forward_features(images))


def test_rope_positions_are_mmpretrains():
    """mmpretrain's table: patches only, x = p mod G, y = p div G, angles interleaved (x w_k, y w_k) per k."""
    grid, head_dim = 3, DIM // HEADS
    p = torch.arange(grid * grid)
    freqs = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 4).float() / head_dim)
    angles = torch.stack((torch.outer((p % grid).float(), freqs), torch.outer((p // grid).float(), freqs)), -1)
    cos, sin = plain(img_size=grid * PATCH).rope_tables((grid * PATCH, grid * PATCH))
    assert torch.allclose(cos, angles.flatten(1).cos(), atol=1e-6)
    assert torch.allclose(sin, angles.flatten(1).sin(), atol=1e-6)


def test_mmseg_plain_file_keeps_our_final_norm(tmp_path):
    """final_norm=False (the UperNet configs): no ln1; pos_embed sized for 512 px is dropped all the same."""
    official = mmpretrain_backbone(grid=32)
    model = plain()
    norm = {k: v.clone() for k, v in model.norm.state_dict().items()}
    load_openmmlab_backbone(model, str(save_mm(tmp_path, official)))
    assert all(torch.equal(v, norm[k]) for k, v in model.norm.state_dict().items())
    assert torch.equal(model.blocks[0].attn.qkv.bias, official["layers.0.attn.qkv.bias"])


def test_avg_featmap_norm_is_our_pooled_norm(tmp_path):
    """out_type='avg_featmap': ln2 normalises the mean of the patch tokens, as our head's norm does."""
    official = mmpretrain_backbone(avg_norm=True)
    model = load_openmmlab_backbone(plain(), str(save_mm(tmp_path, official)))
    tokens = torch.randn(2, 4, DIM)
    expected = F.layer_norm(tokens.mean(1), (DIM,), official["ln2.weight"], official["ln2.bias"], eps=1e-6)
    with torch.no_grad():
        assert torch.allclose(model.forward_head(tokens, pre_logits=True), expected, atol=1e-5)


def test_layer_scale_maps_when_present():
    official = mmpretrain_backbone(layer_scale=True)
    state = backbone_state_dict({f"backbone.{k}": v for k, v in official.items()}, plain(init_values=1e-4))
    assert torch.equal(state["blocks.1.ls1.gamma"], official["layers.1.attn.gamma1.weight"])
    assert torch.equal(state["blocks.1.ls2.gamma"], official["layers.1.ffn.gamma2.weight"])


def test_missing_backbone_key_is_named(tmp_path):
    official = mmpretrain_backbone()
    del official["layers.1.ffn.w3.weight"]
    with pytest.raises(CheckpointError) as excinfo:
        load_openmmlab_backbone(plain(), str(save_mm(tmp_path, official)))
    assert "missing keys: backbone.layers.1.ffn.w3.weight (blocks.1.mlp.fc2.weight)" in message(excinfo)


def test_wrong_shape_is_named(tmp_path):
    official = mmpretrain_backbone()
    official["layers.0.attn.proj.weight"] = torch.randn(DIM, DIM // 2)
    with pytest.raises(CheckpointError) as excinfo:
        load_openmmlab_backbone(plain(), str(save_mm(tmp_path, official)))
    assert (r"shape mismatch: backbone.layers.0.attn.proj.weight as blocks.0.attn.proj.weight (64, 32) vs model "
            r"(64, 64)") in message(excinfo)


def test_unknown_backbone_key_is_unexpected():
    official = {f"backbone.{k}": v for k, v in mmpretrain_backbone().items()}
    official["backbone.layers.0.attn.rel_pos_h"] = torch.zeros(3, 32)
    with pytest.raises(CheckpointError, match=r"unexpected keys: backbone\.layers\.0\.attn\.rel_pos_h"):
        backbone_state_dict(official, plain())


def test_our_default_plain_model_is_told_what_to_change():
    official = {f"backbone.{k}": v for k, v in mmpretrain_backbone().items()}
    with pytest.raises(CheckpointError, match=r"class_token=False, global_pool='avg'"):
        backbone_state_dict(official, llamavit.create_model("visionllama_base_patch16_224", embed_dim=DIM,
                                                            depth=DEPTH, num_heads=HEADS))
    with pytest.raises(CheckpointError, match=r"MMPRETRAIN_KWARGS.*unexpected keys: backbone\.layers\.0\.ffn\.w12\.b"):
        backbone_state_dict(official, plain(mlp_bias=False))


@pytest.mark.parametrize("extra, why", [
    ({"pre_norm.weight": (DIM,)}, r"backbone\.pre_norm\.weight \(1 keys\): pre_norm=True"),
    ({"layers.2.attn.sr.weight": (DIM, 1, 4, 4), "layers.2.attn.norm.weight": (DIM,)},
     r"backbone\.layers\.2\.attn\.norm\.weight \(2 keys\): LLaMADETv1's sub-sampled"),
    ({"ln1.weight": (DIM,), "ln2.weight": (DIM,)}, r"two final norms"),
])
def test_unimplemented_parts_are_refused(extra, why):
    official = {**mmpretrain_backbone(), **{k: torch.randn(s) for k, s in extra.items()}}
    with pytest.raises(CheckpointError, match=why):
        backbone_state_dict({f"backbone.{k}": v for k, v in official.items()}, plain())


def test_file_without_backbone_is_refused_in_one_line(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"model": plain().state_dict()}, path)
    with pytest.raises(CheckpointError) as excinfo:
        load_openmmlab_backbone(plain(), str(path))
    assert "no backbone.* keys" in message(excinfo)


def test_generic_loaders_refuse_an_openmmlab_file(tmp_path):
    """load_backbone (convert.py) does not know the layout: it fails naming the trunk weights, never half-loads."""
    path = save_mm(tmp_path, mmpretrain_backbone())
    with pytest.raises(CheckpointError, match="lacks trunk weights"):
        llamavit.models.load_backbone(plain(), str(path))


def test_family_and_model_mismatch_is_refused():
    plain_file = {f"backbone.{k}": v for k, v in mmpretrain_backbone().items()}
    pyramid_file = {f"backbone.{k}": v for k, v in twins_llama_backbone().items()}
    with pytest.raises(CheckpointError, match="holds a plain backbone but VisionLLaMAPyramid"):
        backbone_state_dict(plain_file, pyramid())
    with pytest.raises(CheckpointError, match="holds a pyramid backbone but VisionLLaMA is"):
        backbone_state_dict(pyramid_file, plain())
    with pytest.raises(CheckpointError, match="not ILLaMA"):
        backbone_state_dict(plain_file, llamavit.create_model("illama_tiny_patch16_224", depth=1))


# --- pyramid: mmseg PyramidVisionLLaMA / mmdet PyramidVisionLLaMADET -------------------------------------
def test_pyramid_file_lands_in_the_pyramid_trunk(tmp_path):
    official = twins_llama_backbone()
    model = pyramid()
    kept = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("norm.", "head."))}
    load_openmmlab_backbone(model, str(save_mm(tmp_path, official)))

    assert torch.equal(model.patch_embeds[2].norm.weight, official["patch_embeds.2.norm.weight"])
    blk = model.blocks[1][1]   # GSA, sr 4
    assert torch.equal(blk.attn.kv.weight, official["blocks.1.1.attn.kv.weight"])
    assert torch.equal(blk.attn.sr.weight, official["blocks.1.1.attn.sr.weight"])
    assert torch.equal(blk.mlp.fc1_g.weight, official["blocks.1.1.mlp.c_fc1.weight"])
    assert torch.equal(blk.mlp.fc1_x.weight, official["blocks.1.1.mlp.c_fc2.weight"])
    assert torch.equal(blk.ls2.gamma, official["blocks.1.1.gamma_2"])
    assert torch.equal(model.blocks[3][0].attn.qkv.bias, official["blocks.3.0.attn.qkv.bias"])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in kept.items())

    # the dense names are the classifier's: the classification filter agrees key for key
    state = backbone_state_dict({f"backbone.{k}": v for k, v in official.items()}, model)
    assert state.keys() == convert_official(official).keys()

    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        maps = model.forward_intermediates(images, intermediates_only=True)
        again = model.forward_intermediates(images, intermediates_only=True)
    assert [tuple(m.shape) for m in maps] == [(1, d, 16 // 2 ** i, 16 // 2 ** i) for i, d in enumerate(PYRAMID_DIMS)]
    assert all(torch.isfinite(m).all() and torch.equal(m, n) for m, n in zip(maps, again))


def test_pyramid_norm_after_stage_is_refused(tmp_path):
    with pytest.raises(CheckpointError) as excinfo:
        load_openmmlab_backbone(pyramid(), str(save_mm(tmp_path, twins_llama_backbone(norm_after_stage=True))))
    assert "backbone.norm_list.0.bias (8 keys): norm_after_stage=True" in message(excinfo)


def test_pyramid_missing_key_is_named():
    official = twins_llama_backbone()
    del official["blocks.0.1.mlp.c_fc1.weight"]
    with pytest.raises(CheckpointError, match=r"backbone\.blocks\.0\.1\.mlp\.c_fc1\.weight \(blocks\.0\.1\.mlp\.fc1_g"):
        backbone_state_dict({f"backbone.{k}": v for k, v in official.items()}, pyramid())


def _fake_module(name: str, cls_name: str):
    """A module `name` holding a class `cls_name` (as mmengine's would), registered in sys.modules."""
    import sys
    import types
    module = types.ModuleType(name)

    def __init__(self):
        self._log_history = np.array([0.5, 0.25])
        self._count_history = np.array([1, 1])
        self._max_length = 1000000
    cls = type(cls_name, (), {"__init__": __init__, "__module__": name})
    module.__dict__[cls_name] = cls
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    sys.modules[name] = module
    return cls, [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def test_mmengine_training_checkpoints_load_without_unpickling_their_objects(tmp_path):
    import sys
    from llamavit.models import read_state_dict
    buffer, added = _fake_module("mmengine.logging.history_buffer", "HistoryBuffer")
    weights = {"backbone.patch_embed.projection.weight": torch.randn(4, 3, 2, 2)}
    checkpoint = {"meta": {"epoch": 800, "seed": np.int64(0), "mean": np.float64(0.5)},
                  "state_dict": weights, "message_hub": {"log_scalars": {"train/loss": buffer()}}}
    torch.save(checkpoint, tmp_path / "epoch_800.pth")
    evil, more = _fake_module("payload.tools", "Payload")
    torch.save({"state_dict": weights, "meta": evil()}, tmp_path / "evil.pth")
    for name in set(added + more):
        sys.modules.pop(name, None)   # mmengine is not installed: the reader must not need it
    state = read_state_dict(str(tmp_path / "epoch_800.pth"), state_keys=("state_dict", "model"))
    assert list(state) == list(weights) and torch.equal(state[list(weights)[0]], list(weights.values())[0])
    with pytest.raises(CheckpointError, match="holds Python objects other than tensors.*payload.tools.Payload"):
        read_state_dict(str(tmp_path / "evil.pth"), state_keys=("state_dict",))
