"""Checkpoint loading: our safetensors files and training checkpoints, and the official release
files of every family. The format is detected; official key names are converted by the family's
filter; any mismatch is reported by key name. Nothing is unpickled beyond tensors and plain
containers (`torch.load(weights_only=True)`)."""
import argparse
import os
import pickle
import re
from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn as nn
from safetensors.torch import load_file
from timm.models import adapt_input_conv

from ..errors import CheckpointError, DamagedCheckpointError

WEIGHTS_NAME = "model.safetensors"   # inside a llamavit training checkpoint directory
LATEST = "latest"                     # <run>/checkpoints/latest names the newest complete checkpoint
_SHOW = 8


def resolve_checkpoint(path: str) -> str:
    """A run directory, a checkpoint directory or a weights file -> the checkpoint path to read (a run
    directory: its newest complete checkpoint)."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    latest = os.path.join(path, "checkpoints", LATEST)
    if os.path.isfile(latest):
        with open(latest) as f:
            return os.path.join(path, "checkpoints", f.read().strip())
    if os.path.isdir(os.path.join(path, "checkpoints")):
        raise CheckpointError(f"{path} is a run directory without a complete checkpoint yet")
    return path


def read_state_dict(path: str, state_keys: Sequence[str] = ("model", "state_dict", "model_state")
                    ) -> Dict[str, torch.Tensor]:
    """The raw state dict of a checkpoint file or llamavit checkpoint directory (no key conversion);
    a wrapped file gives its first entry among `state_keys`. A run directory reads its newest checkpoint."""
    path = resolve_checkpoint(path)
    if os.path.isdir(path):
        weights = os.path.join(path, WEIGHTS_NAME)
        if not os.path.isfile(weights):
            raise CheckpointError(f"{path} is a directory without {WEIGHTS_NAME}: not a llamavit checkpoint")
        path = weights
    if path.endswith(".safetensors"):
        try:
            return load_file(path)
        except Exception as e:
            raise DamagedCheckpointError(f"cannot read safetensors file {path}: {e}") from e
    obj = _load_tensors(path)
    if isinstance(obj, dict):
        for key in state_keys:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors (plain, or under 'model')")
    return obj


class MMEngineRecord:
    """Stands in for an mmengine object of a training checkpoint's bookkeeping (its log buffers): keeps the pickled
    state, runs none of mmengine's code."""

    def __setstate__(self, state) -> None:
        self.state = state


# what official checkpoints carry beside their tensors, allowed by name (never arbitrary classes): the
# argparse.Namespace of the arguments (DeiT-style releases), and mmengine's log buffers with the numpy values
# in them (OpenMMLab releases: mmseg, mmdet, mmpretrain)
MMENGINE_RECORDS = ("mmengine.logging.history_buffer.HistoryBuffer",)


def _checkpoint_globals() -> list:
    import numpy as np
    try:
        from numpy._core import multiarray   # numpy 2
    except ImportError:
        from numpy.core import multiarray
    # files written under numpy 1 and 2 name the same two functions differently
    numpy_globals = [(fn, f"{pkg}.multiarray.{fn.__name__}") for fn in (multiarray._reconstruct, multiarray.scalar)
                     for pkg in ("numpy.core", "numpy._core")]
    dtypes = [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]   # their BUILD step
    return [argparse.Namespace, np.ndarray, np.dtype, *dtypes, *numpy_globals,
            *[(MMEngineRecord, name) for name in MMENGINE_RECORDS]]


def _load_tensors(path: str):
    """torch.load(weights_only=True), with the official checkpoints' bookkeeping classes (_checkpoint_globals)
    allowed; anything else is refused."""
    try:
        with torch.serialization.safe_globals(_checkpoint_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path} holds Python objects other than tensors; llamavit loads checkpoints with "
                              f"weights_only=True and will not unpickle them ({_refused(str(e))})") from e
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from e


def _refused(message: str) -> str:
    """What torch's weights-only unpickler refused, from its long message."""
    found = re.search(r"Unsupported global: GLOBAL (\S+)", message)
    if found:
        return f"it holds {found.group(1)}"
    reason = message.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
    return reason[0] if reason else message.splitlines()[0]


def keys_report(names, limit: int = _SHOW) -> str:
    """Sorted key names joined for a message, the first `limit` and a count of the rest."""
    names = sorted(names)
    more = f" … (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor], source: str = "checkpoint",
                     only: Optional[Sequence[str]] = None) -> None:
    """Raise CheckpointError naming the missing, unexpected and wrongly shaped keys, if any (of the model's
    entries named in `only`, when given)."""
    expected = model.state_dict()
    if only is not None:
        expected = {k: expected[k] for k in only}
    missing = set(expected) - set(state_dict)
    unexpected = set(state_dict) - set(expected)
    wrong = [f"{k} {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in sorted(set(expected) & set(state_dict)) if state_dict[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {keys_report(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {keys_report(unexpected)}")
    if wrong:
        problems.append(f"shape mismatch: {keys_report(wrong, 4)}")
    if problems:
        raise CheckpointError(f"{source} does not fit {type(model).__name__} — " + "; ".join(problems))


def read_state_dicts(paths: Sequence[str], **kwargs) -> Dict[str, torch.Tensor]:
    """The merged raw state dicts of several files (e.g. a backbone file and a head file); keys may not overlap."""
    merged: Dict[str, torch.Tensor] = {}
    for path in paths:
        state_dict = read_state_dict(path, **kwargs)
        overlap = set(merged) & set(state_dict)
        if overlap:
            raise CheckpointError(f"{path} repeats keys of the files before it: {keys_report(overlap)}")
        merged.update(state_dict)
    return merged


def convert_state_dict(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Official (or DDP-prefixed) key names -> the model's, by the model's own `checkpoint_filter`; models
    without one (timm baselines) only lose a DDP `module.` prefix."""
    own = getattr(model, "checkpoint_filter", None)
    if own is not None:
        return own(state_dict)
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def load_checkpoint(model: nn.Module, path: Union[str, Sequence[str]], assign: bool = False) -> nn.Module:
    """Load weights from `path` (a file, a llamavit checkpoint directory, or a list of files to merge)
    into `model` (format detected, official keys converted), strictly.

    assign=True keeps the loaded tensors instead of copying them into the model's, as needed for a
    model built on the 'meta' device; every parameter and buffer must then come from the checkpoint.
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    # a family may prefer another entry of wrapped files (DiT: the EMA weights of {'model', 'ema', ...})
    keys = getattr(model, "checkpoint_state_keys", None)
    raw = read_state_dicts(paths, **({"state_keys": keys} if keys else {}))
    source = f"checkpoint {paths[0] if len(paths) == 1 else paths}"
    state_dict = convert_state_dict(model, raw)
    check_state_dict(model, state_dict, source=source)
    model.load_state_dict(state_dict, strict=True, assign=assign)
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{source} left tensors unset on the meta device: {keys_report(left)}")
    return model


def load_partial(model: nn.Module, path: str, keys: Sequence[str],
                 raw: Optional[Dict[str, torch.Tensor]] = None) -> nn.Module:
    """Load the entries `keys` of the model's state dict from `path`, which must hold exactly those (a LoRA
    run's adapters and head); the model's other tensors stay as they are. raw: the file's state dict when it
    was read already."""
    state_dict = raw if raw is not None else read_state_dict(path)
    check_state_dict(model, state_dict, source=f"checkpoint {path}", only=keys)
    model.load_state_dict(state_dict, strict=False)
    return model


def load_backbone(model: nn.Module, path: str, raw: Optional[Dict[str, torch.Tensor]] = None) -> nn.Module:
    """Load every trunk weight of `path` (a checkpoint file or directory) into `model`; the classifier's
    weights are taken where they fit and left as initialised where they do not (another number of classes).
    raw: the file's state dict when it was read already."""
    state = convert_state_dict(model, raw if raw is not None else read_state_dict(path))
    own = model.state_dict()
    image_chans = getattr(model, "in_chans", None)   # only the stem takes the image's channels
    state = {k: _adapt_input_channels(v, own[k]) if k in own and own[k].ndim == 4 and own[k].shape[1] == image_chans
             else v for k, v in state.items()}
    fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = set(own) - set(fits)
    classifier = {k for k in own if _is_classifier(model, k)}
    if missing - classifier:
        raise CheckpointError(f"{path} lacks trunk weights of {type(model).__name__}: "
                              f"{keys_report(missing - classifier)}")
    model.load_state_dict(fits, strict=False)
    return model


def _adapt_input_channels(weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A convolution's (out, C, k, k) weight for `target`'s number of input channels, as timm adapts pretrained
    stems (adapt_input_conv: a grayscale stem repeated over RGB and scaled, RGB summed for grayscale); any
    other tensor as it is."""
    if (weight.ndim == 4 and target.ndim == 4 and weight.shape[1] != target.shape[1]
            and weight.shape[:1] + weight.shape[2:] == target.shape[:1] + target.shape[2:]):
        return adapt_input_conv(target.shape[1], weight, base_chans=weight.shape[1])
    return weight


def _is_classifier(model: nn.Module, key: str) -> bool:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    names = {f"{n}.{p}" for n, m in model.named_modules() if m is head for p, _ in m.named_parameters()}
    return key in names
