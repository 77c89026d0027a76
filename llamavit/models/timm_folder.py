"""timm model folders: `config.json` in timm's layout + `model.safetensors`, what `huggingface_hub.upload_folder`
publishes and what `timm.create_model("local-dir:DIR", pretrained=True)` (or `hf-hub:` once uploaded) reads.

Both files are written by timm's own `save_for_hf`. config.json: `architecture` (the registered llamavit name),
`num_classes`, `label_names`, `model_args` (the construction kwargs: timm passes them back to the entrypoint, so
the exact architecture is rebuilt), `pretrained_cfg` (input_size, mean, std, crop_pct, interpolation) and our own
`llamavit` section (the dataset the model was trained on, where it came from). `read_timm_folder` turns the config
back into a llamavit checkpoint's metadata, so every loader that takes a checkpoint takes the folder.
"""
import json
import os
from typing import Any, Dict, Optional, Sequence

import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..errors import CheckpointError
from .convert import WEIGHTS_NAME
from .frozen_llm import make_standalone

CONFIG_NAME = "config.json"
OWN_SECTION = "llamavit"
# construction kwargs that do not change what a trained model computes (timm leaves them out too)
_TRAINING_ONLY = ("drop_rate", "drop_path_rate", "attn_drop_rate", "proj_drop_rate")


def _per_channel(values: Optional[Sequence[float]], default: Sequence[float], in_chans: int) -> list:
    """Normalisation values with one entry per input channel (None: ImageNet's, averaged for one channel)."""
    values = list(values if values is not None else default)
    if len(values) == in_chans:
        return values
    if len(values) == 1:
        return values * in_chans
    if in_chans == 1:
        return [sum(values) / len(values)]
    raise ValueError(f"normalisation has {len(values)} values but the model takes {in_chans} channels")


def save_timm_folder(model: nn.Module, directory: str, model_args: Dict[str, Any], classes: Sequence[str],
                     transform: Dict[str, Any], extra: Optional[Dict[str, Any]] = None) -> str:
    """Write `directory` as a timm folder of `model` (built by name through timm, with `model_args`):
    model.safetensors (every weight: a frozen LLM block read from a file is made part of the model, in place) and
    config.json. transform: the evaluation
    transform (img_size, in_chans, mean, std, crop_pct, interpolation; mean / std None: ImageNet's). extra: JSON-able
    facts for config.json's `llamavit` section. -> directory."""
    from timm.models import save_for_hf
    args = make_standalone(model, {k: v for k, v in model_args.items() if k not in _TRAINING_ONLY})
    in_chans, size = int(transform.get("in_chans", 3)), int(transform["img_size"])
    data_config = {"input_size": (in_chans, size, size),
                   "mean": _per_channel(transform.get("mean"), IMAGENET_DEFAULT_MEAN, in_chans),
                   "std": _per_channel(transform.get("std"), IMAGENET_DEFAULT_STD, in_chans),
                   "crop_pct": float(transform.get("crop_pct", 0.875)),
                   "interpolation": transform.get("interpolation", "bicubic")}
    save_for_hf(model, directory, model_args=args, data_config=data_config, safe_serialization=True,
                model_config={"label_names": list(classes), OWN_SECTION: dict(extra or {})})
    return directory


def is_timm_folder(path: str) -> bool:
    """Whether `path` is a directory holding a timm config.json beside model.safetensors."""
    config = os.path.join(path, CONFIG_NAME)
    if not (os.path.isdir(path) and os.path.isfile(config) and os.path.isfile(os.path.join(path, WEIGHTS_NAME))):
        return False
    try:
        with open(config) as f:
            return "architecture" in json.load(f)
    except (OSError, ValueError):
        return False


def read_timm_folder(path: str) -> Dict[str, Any]:
    """A timm folder's config.json as llamavit checkpoint metadata: model, model_kwargs, classes, the evaluation
    transform (from pretrained_cfg) and the dataset it was trained on (`data`, when config.json records it)."""
    try:
        with open(os.path.join(path, CONFIG_NAME)) as f:
            config = json.load(f)
        architecture, cfg = config["architecture"], config["pretrained_cfg"]
        in_chans, height, width = cfg["input_size"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}/{CONFIG_NAME} is not a timm model config (architecture, pretrained_cfg with "
                              f"input_size): {type(e).__name__}: {e}") from e
    if height != width:
        raise CheckpointError(f"{path}/{CONFIG_NAME}: input_size {height}x{width} is not square; llamavit's "
                              f"transforms take square images")
    own = config.get(OWN_SECTION, {})
    transform = {"img_size": int(height), "in_chans": int(in_chans),
                 "mean": list(cfg.get("mean", IMAGENET_DEFAULT_MEAN)),
                 "std": list(cfg.get("std", IMAGENET_DEFAULT_STD)),
                 "crop_pct": float(cfg.get("crop_pct", 0.875)), "interpolation": cfg.get("interpolation", "bicubic")}
    num_classes = config.get("num_classes", cfg.get("num_classes"))
    classes = config.get("label_names") or cfg.get("label_names") or [str(i) for i in range(num_classes or 0)]
    meta = {"model": architecture, "model_kwargs": dict(config.get("model_args", {})),
            "classes": list(classes.values()) if isinstance(classes, dict) else list(classes), "transform": transform}
    if "data" in own:
        meta["data"] = own["data"]
    return meta

