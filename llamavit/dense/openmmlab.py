"""OpenMMLab VisionLLaMA backbones (mmseg, mmdet and mmpretrain files) -> llamavit's plain and pyramid trunks.

The dense-prediction code of Meituan-AutoML/VisionLLaMA (commit 33fa561) saves mmengine checkpoints,
`{'meta': ..., 'state_dict': {'backbone.*', 'decode_head.*', 'auxiliary_head.*', 'neck.*', 'rpn_head.*', ...}}`.
Only `backbone.*` is kept. What the official code holds there:

plain    `VisionLLaMA` of mmpretrain/mmpretrain/models/backbones/vision_llama.py, taken by the ADE20K UperNet
         configs (mmseg/configs/mae/lama-{base,large}_upernet_*.py, type 'mmpretrain.VisionLLaMA', final_norm=False,
         out_type='featmap'), its MAE subclass `MAELLaMA` (mmpretrain/mmpretrain/models/selfsup/mae.py: with a
         class token, final_norm=True) and ViTDet's `LLaMADET` / `LLaMADETv1` (mmdetection/projects/ViTDet/vitdet/
         vit.py). Block: x + attn(ln1 x), x + ffn(ln2 x), LayerNorm eps 1e-6, 2D RoPE on q and k as the classifier;
         FFN = mmpretrain's `LLaMAMLP`: w3(silu(x1) * x2) with (x1, x2) = w12(x) split in halves, biases on,
         hidden 256 * ceil(int(8/3 * feedforward_channels) / 256) (arch base 8192, large 11008).
           patch_embed.projection.*                 -> patch_embed.proj.*
           layers.i.ln1.* / layers.i.ln2.*          -> blocks.i.norm1.* / blocks.i.norm2.*
           layers.i.attn.qkv.* / layers.i.attn.proj.*   -> the same names (qkv rows ordered (3, heads, head_dim))
           layers.i.ffn.w12.{weight,bias}           -> rows [:h] blocks.i.mlp.fc1_g (the SiLU'd half), [h:] fc1_x
           layers.i.ffn.w3.*                        -> blocks.i.mlp.fc2.*
           layers.i.attn.gamma1.weight / ffn.gamma2.weight -> blocks.i.ls1.gamma / ls2.gamma (layer_scale_init_value
                                                       > 0 only; no released config sets it)
           ln1.* (final_norm=True) or ln2.* (out_type='avg_featmap', the norm of the pooled mean) -> norm.*
         Dropped: `pos_embed` (kept as a frozen parameter, never added in forward) and `cls_token` (MAE concatenates
         it AFTER the blocks, for its decoder; the RoPE table has rows for the patches only, so no class token ever
         passes through the blocks). RoPE positions are x = p mod G, y = p div G over the patches, as ours without a
         class token; the official table is built once for the square constructor img_size, ours per input grid,
         so the two agree at that size. Build the model with `MMPRETRAIN_KWARGS`.
pyramid  `PyramidVisionLLaMA` of mmseg/mmseg/models/backbones/twins_llama.py (configs mmseg/configs/twins/
         twins_svt_lama_as-{s,b,l}_uperhead_*.py) and the same class as `PyramidVisionLLaMADET` in
         mmdetection/mmdet/models/backbones/twins_llama.py (mmdetection/configs/twins/
         mask-rcnn_twins-b-p4-w7_fpn_ms-crop-3x_coco.py): the classifier's names (patch_embeds.i.{proj,norm},
         blocks.i.j.{norm1, norm2, attn.qkv | attn.{q,kv,sr,norm}, attn.proj, mlp.c_fc1/c_fc2/c_proj, gamma_1/2}),
         renamed as the classification filter renames them; final norm and head deleted; every config sets
         auto_scale=True (build with rope_auto_scale=True). Their default norm_after_stage=True adds `norm_list.i`,
         a LayerNorm after each stage whose output also feeds the next stage's patch embedding. llamavit's pyramid
         has no such norm, so those files are refused; norm_after_stage=False files map exactly.
Our final `norm`, which the dense backbones lack, stays as initialised, as the classifier does: without a class
token (plain) it acts only on the pooled vector, and the pyramid's feature maps are taken un-normed.

Not visible in the weights: `LLaMADET` runs blocks 0, 1, 3, 4, 6, 7, 9, 10 inside 14x14 windows (window-local
RoPE). Its keys are those of `VisionLLaMA` and load one for one, but our plain trunk attends globally in every block.
"""
import re
from functools import lru_cache
from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from ..errors import CheckpointError
from ..models import keys_report, read_state_dict
from ..models.visionllama import VisionLLaMA
from ..models.visionllama_pyramid import VisionLLaMAPyramid

PREFIX = "backbone."
# create_model options under which our plain trunk holds mmpretrain's VisionLLaMA (feedforward_channels = 4 * D:
# arch base, large, deit-small); the named size gives embed_dim, depth and num_heads
MMPRETRAIN_KWARGS = {"class_token": False, "global_pool": "avg", "init_values": 0.0, "mlp_bias": True,
                     "mlp_ratio": 16.0}

# (official prefix, ours) with {i}, {j} standing for indices; the first match wins in either direction
Rules = Tuple[Tuple[str, str], ...]
_PLAIN: Rules = (
    ("patch_embed.projection.", "patch_embed.proj."),
    ("layers.{i}.ln1.", "blocks.{i}.norm1."),
    ("layers.{i}.ln2.", "blocks.{i}.norm2."),
    ("layers.{i}.attn.qkv.", "blocks.{i}.attn.qkv."),
    ("layers.{i}.attn.proj.", "blocks.{i}.attn.proj."),
    ("layers.{i}.attn.gamma1.weight", "blocks.{i}.ls1.gamma"),
    ("layers.{i}.ffn.w12.", "blocks.{i}.mlp.fc1_g."),   # split in `_plain_tensors`
    ("layers.{i}.ffn.w12.", "blocks.{i}.mlp.fc1_x."),   # (only read back, to name a missing fc1_x)
    ("layers.{i}.ffn.w3.", "blocks.{i}.mlp.fc2."),
    ("layers.{i}.ffn.gamma2.weight", "blocks.{i}.ls2.gamma"),
    ("ln1.", "norm."),
    ("ln2.", "norm."),
)
_PYRAMID: Rules = (
    ("patch_embeds.{i}.", "patch_embeds.{i}."),
    ("blocks.{i}.{j}.mlp.c_fc1.", "blocks.{i}.{j}.mlp.fc1_g."),
    ("blocks.{i}.{j}.mlp.c_fc2.", "blocks.{i}.{j}.mlp.fc1_x."),
    ("blocks.{i}.{j}.mlp.c_proj.", "blocks.{i}.{j}.mlp.fc2."),
    ("blocks.{i}.{j}.gamma_1", "blocks.{i}.{j}.ls1.gamma"),
    ("blocks.{i}.{j}.gamma_2", "blocks.{i}.{j}.ls2.gamma"),
    ("blocks.{i}.{j}.", "blocks.{i}.{j}."),
    ("norm.", "norm."),
)
_PLAIN_DROPPED = ("pos_embed", "cls_token")
# official backbone parts llamavit's trunks do not implement: (key pattern, why)
_REFUSED = {
    "plain": ((r"pre_norm\.", "pre_norm=True puts a LayerNorm before the blocks; llamavit's plain VisionLLaMA has "
                              "none"),
              (r"layers\.\d+\.attn\.(sr|norm)\.", "LLaMADETv1's sub-sampled global attention; llamavit's plain "
                                                  "VisionLLaMA attends over all tokens")),
    "pyramid": ((r"norm_list\.", "norm_after_stage=True puts a LayerNorm after every stage, feeding the next one; "
                                 "llamavit's pyramid has none (only norm_after_stage=False backbones map)"),),
}


def is_openmmlab_state(state_dict: Mapping) -> bool:
    """Whether a loaded file or state dict is OpenMMLab's: wrapped as {'meta', 'state_dict'} or with `backbone.*`."""
    if not isinstance(state_dict, Mapping):
        return False
    if "meta" in state_dict and isinstance(state_dict.get("state_dict"), Mapping):
        return True
    return any(isinstance(k, str) and k.startswith(PREFIX) for k in state_dict)


def backbone_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """The `backbone.*` tensors of an OpenMMLab state dict (or its {'meta', 'state_dict'} wrapper) under `model`'s
    names; heads and necks dropped. Raise CheckpointError on any missing, unexpected or wrongly shaped key."""
    if isinstance(state_dict.get("state_dict"), Mapping):
        state_dict = state_dict["state_dict"]
    backbone = {k[len(PREFIX):]: v for k, v in state_dict.items() if k.startswith(PREFIX)}
    if not backbone:
        tops = {k.split(".")[0] + ".*" for k in state_dict}
        raise CheckpointError(f"no {PREFIX}* keys, so not an OpenMMLab segmentor / detector / pre-training file "
                              f"(its keys: {keys_report(tops, 4)})")
    family = _family(model)
    held = ("pyramid" if any(k.startswith("patch_embeds.") for k in backbone)
            else "plain" if any(k.startswith("layers.") for k in backbone) else "unknown")
    if held != family:
        raise CheckpointError(f"{PREFIX}* holds a {held} backbone but {type(model).__name__} is the {family} "
                              f"VisionLLaMA (plain: layers.i.*, pyramid: patch_embeds.i.* and blocks.i.j.*)")
    for pattern, why in _REFUSED[family]:
        hits = sorted(k for k in backbone if re.match(pattern, k))
        if hits:
            raise CheckpointError(f"{PREFIX}{hits[0]} ({len(hits)} keys): {why}")
    if family == "plain":
        _check_plain(backbone, model)
    rules = _PLAIN if family == "plain" else _PYRAMID

    ours: Dict[str, torch.Tensor] = {}
    source: Dict[str, str] = {}   # our key -> the official key it came from, for messages
    unexpected = []
    for key, value in backbone.items():
        if family == "plain" and key in _PLAIN_DROPPED:
            continue
        name = _rename(key, rules)
        if name is None:
            unexpected.append(PREFIX + key)
            continue
        pairs = _plain_tensors(name, value) if family == "plain" else ((name, value),)
        for our_key, tensor in pairs:
            ours[our_key], source[our_key] = tensor, key
    _check(model, ours, source, unexpected, rules, family)
    return ours


def load_openmmlab_backbone(model: nn.Module, path: str, raw: Optional[Mapping[str, torch.Tensor]] = None
                            ) -> nn.Module:
    """Load the `backbone.*` weights of an OpenMMLab file into `model` (plain or pyramid VisionLLaMA) strictly,
    all but the classifier and a final norm the release does not have; `raw`: the file's state dict when read."""
    raw = raw if raw is not None else read_state_dict(path, state_keys=("state_dict", "model"))
    try:
        state = backbone_state_dict(raw, model)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    model.load_state_dict(state, strict=False)   # completeness checked above, the optional keys aside
    return model


# --- helpers ---------------------------------------------------------------------------------------
def _family(model: nn.Module) -> str:
    if isinstance(model, VisionLLaMAPyramid):
        return "pyramid"
    if isinstance(model, VisionLLaMA):
        return "plain"
    raise CheckpointError(f"OpenMMLab VisionLLaMA backbones load into llamavit's VisionLLaMA or VisionLLaMAPyramid, "
                          f"not {type(model).__name__}")


def _check_plain(backbone: Dict[str, torch.Tensor], model: nn.Module) -> None:
    if any(k.startswith("ln1.") for k in backbone) and any(k.startswith("ln2.") for k in backbone):
        raise CheckpointError(f"{PREFIX}ln1.* and {PREFIX}ln2.* (final_norm=True with out_type='avg_featmap') are "
                              f"two final norms; llamavit's plain VisionLLaMA has one")
    if model.cls_token is not None:
        raise CheckpointError("mmpretrain's VisionLLaMA runs its blocks without a class token (MAE appends "
                              f"{PREFIX}cls_token after them): build the model with class_token=False, "
                              "global_pool='avg'")


@lru_cache(maxsize=None)
def _pattern(template: str) -> "re.Pattern[str]":
    parts = re.split(r"(\{[ij]\})", template)
    return re.compile("".join(f"(?P<{p[1]}>\\d+)" if p in ("{i}", "{j}") else re.escape(p) for p in parts))


def _rename(key: str, rules: Rules, back: bool = False) -> Optional[str]:
    """`key` under the first rule whose prefix it starts with (official -> ours, or back); None if none."""
    for official, ours in rules:
        src, dst = (ours, official) if back else (official, ours)
        m = _pattern(src).match(key)
        if m:
            return dst.format(**m.groupdict()) + key[m.end():]
    return None


def _plain_tensors(name: str, value: torch.Tensor) -> Tuple[Tuple[str, torch.Tensor], ...]:
    """mmpretrain's fused w12 rows [gate; up] -> our fc1_g (gate) and fc1_x (up); other tensors as they are."""
    if ".mlp.fc1_g." not in name:
        return ((name, value),)
    gate, up = value.chunk(2, dim=0)
    return (name, gate), (name.replace(".fc1_g.", ".fc1_x."), up)


def _check(model: nn.Module, ours: Dict[str, torch.Tensor], source: Dict[str, str], unexpected: list,
           rules: Rules, family: str) -> None:
    """Raise CheckpointError naming (official names first) what is missing, unexpected or wrongly shaped."""
    expected = model.state_dict()
    head = model.get_classifier()
    optional = {f"{n}.{p}" for n, m in model.named_modules() if m is head for p, _ in m.named_parameters()}
    if not any(k.startswith("norm.") for k in ours):
        optional |= {k for k in expected if k.startswith("norm.")}
    missing = [k for k in expected if k not in ours and k not in optional]
    unexpected = unexpected + [PREFIX + source[k] for k in ours if k not in expected]
    wrong = {source[k]: f"{PREFIX}{source[k]} as {k} {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
             for k, v in ours.items() if k in expected and v.shape != expected[k].shape}
    problems = []
    if missing:
        named = [f"{PREFIX}{_rename(k, rules, back=True) or '?'} ({k})" for k in missing]
        problems.append(f"missing keys: {keys_report(named)}")
    if unexpected:
        problems.append(f"unexpected keys: {keys_report(set(unexpected))}")
    if wrong:
        problems.append(f"shape mismatch: {keys_report(wrong.values(), 4)}")
    if problems:
        hint = " (mmpretrain's VisionLLaMA needs create_model(..., **MMPRETRAIN_KWARGS))" if family == "plain" else ""
        raise CheckpointError(f"{PREFIX}* does not fit {type(model).__name__}{hint} — " + "; ".join(problems))
