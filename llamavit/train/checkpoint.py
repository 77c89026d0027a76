"""Checkpoints of a training run, written atomically, read with weights_only=True.

Layout of a run directory:
    <run>/checkpoints/step-00001234/model.safetensors   weights + metadata (model name, kwargs, classes, eval transform)
    <run>/checkpoints/step-00001234/ema.safetensors     EMA weights, when EMA is on
    <run>/checkpoints/step-00001234/state.pt            optimiser state, step, config (tensors and plain types only)
    <run>/checkpoints/latest                            name of the newest complete checkpoint
A checkpoint directory is written under a temporary name and renamed when complete, and `latest`
is replaced atomically, so a run killed at any moment leaves the previous checkpoint intact.
"""
import errno
import json
import os
import shutil
import warnings
from typing import Any, Dict, List, Optional, Union

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError, DamagedCheckpointError
from ..models import create_model
from ..models.convert import LATEST, WEIGHTS_NAME, load_checkpoint, resolve_checkpoint
from ..models.timm_folder import is_timm_folder, read_timm_folder

STATE_NAME = "state.pt"
EMA_NAME = "ema.safetensors"


def atomic_write_text(path: str, text: str) -> None:
    """Write text to path through a temporary file and a rename: never half-written."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _tensors(module: Union[nn.Module, Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    state = module.state_dict() if isinstance(module, nn.Module) else module
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_checkpoint(run_dir: str, step: int, model: nn.Module, meta: Dict[str, Any], state: Dict[str, Any],
                    ema: Optional[nn.Module] = None, keep: int = 2,
                    model_state: Optional[Dict[str, torch.Tensor]] = None) -> str:
    """Write checkpoint `step-<step>` under run_dir/checkpoints and point `latest` at it.

    meta: JSON-able facts needed to rebuild the model (model, model_kwargs, classes, transform).
    state: training state (optimizer state_dict, step, config...) — tensors and plain types only.
    """
    root = os.path.join(run_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    name = f"step-{step:08d}"
    final, tmp = os.path.join(root, name), os.path.join(root, f".tmp-{name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        save_weights(tmp, model, meta, model_state)
        if ema is not None:
            save_weights(tmp, ema, meta, name=EMA_NAME)
        torch.save(state, os.path.join(tmp, STATE_NAME))
    except (OSError, RuntimeError) as e:   # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)   # a partial checkpoint must not keep the disk full
        full = getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e) or "file write failed" in str(e)
        why = f"no space left on {root}" if full else f"cannot write {tmp}: {getattr(e, 'strerror', None) or e}"
        raise CheckpointError(f"{why} while writing checkpoint {name}; the previous checkpoint is intact: free the "
                              f"space and --resume") from e
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    atomic_write_text(os.path.join(root, LATEST), name)
    _prune(root, keep, name)
    return final


def save_weights(directory: str, model: nn.Module, meta: Dict[str, Any],
                 state: Optional[Dict[str, torch.Tensor]] = None, name: str = WEIGHTS_NAME) -> str:
    """Write directory/name: the model's tensors (or `state`) as safetensors with the llamavit metadata (meta;
    a ViT + frozen LLM adds where its unsaved block comes from), which `create_model(checkpoint_path=...)`,
    `model_from_checkpoint` and `llamavit eval` read; -> the file's path."""
    if getattr(model, "llm_source", None):
        meta = {**meta, "llm": model.llm_source}
    metadata = {"format": "llamavit", **{k: json.dumps(v) for k, v in meta.items()}}
    path = os.path.join(directory, name)
    save_file(_tensors(model if state is None else state), path, metadata=metadata)
    return path


def remove_stale_temporaries(run_dir: str) -> List[str]:
    """Delete the partial checkpoints (.tmp-step-*) a killed run left in run_dir/checkpoints; -> their names.
    Only safe while holding the run directory's lock (no other writer)."""
    root = os.path.join(run_dir, "checkpoints")
    stale = sorted(d for d in os.listdir(root) if d.startswith(".tmp-")) if os.path.isdir(root) else []
    for d in stale:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    return stale


def _prune(root: str, keep: int, newest: str) -> None:
    """Keep `newest` and the keep - 1 checkpoints before it. Later steps (left by an earlier run in the
    same directory) are never pruned: sorting them in would delete the checkpoint just written."""
    steps = sorted(d for d in os.listdir(root) if d.startswith("step-") and d <= newest)
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def complete_checkpoints(run_dir: str) -> List[str]:
    """The run's checkpoint directories, newest first."""
    root = os.path.join(run_dir, "checkpoints")
    names = sorted((d for d in os.listdir(root) if d.startswith("step-")), reverse=True) if os.path.isdir(root) else []
    return [os.path.join(root, d) for d in names]


def latest_checkpoint(run_dir: str) -> Optional[str]:
    """The newest complete checkpoint of a run directory, or None."""
    latest = os.path.join(run_dir, "checkpoints", LATEST)
    if not os.path.isfile(latest):
        return None
    return resolve_checkpoint(run_dir)


def read_meta(path: str) -> Dict[str, Any]:
    """Metadata of a llamavit checkpoint (directory or model.safetensors) or of a timm folder (from its config.json,
    docs/export.md); {} for other files."""
    path = resolve_checkpoint(path)
    if is_timm_folder(path):
        return read_timm_folder(path)
    weights = os.path.join(path, WEIGHTS_NAME) if os.path.isdir(path) else path
    if not weights.endswith(".safetensors") or not os.path.isfile(weights):
        return {}
    try:
        with safe_open(weights, framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as e:   # safetensors raises its own error type for a truncated or foreign file
        raise DamagedCheckpointError(f"cannot read safetensors file {weights}: {e}") from e
    return {k: json.loads(v) for k, v in raw.items() if k != "format"}


def load_training_state(ckpt_dir: str) -> Dict[str, Any]:
    """state.pt of a checkpoint (step, optimiser, config), read with weights_only=True."""
    path = os.path.join(ckpt_dir, STATE_NAME)
    if not os.path.isfile(path):
        raise CheckpointError(f"{ckpt_dir} has no {STATE_NAME}: it is not a resumable training checkpoint")
    try:
        with warnings.catch_warnings():   # torch warns about the protocol of damaged bytes before it fails on them
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # damaged bytes, or objects other than tensors: never unpickled
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DamagedCheckpointError(f"{path} is damaged or holds objects other than tensors ({first[:120]})") from e


def model_from_checkpoint(path: str, use_ema: bool = False, **overrides) -> nn.Module:
    """Rebuild a model from a llamavit checkpoint (run dir, checkpoint dir or model.safetensors) or a timm folder."""
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    if meta.get("task") in ("segment", "detect"):
        raise CheckpointError(f"{path} is a {meta['task']} run: rebuild it with llamavit.train.{meta['task']}."
                              f"load_{'segmenter' if meta['task'] == 'segment' else 'detector'} or `llamavit "
                              f"{meta['task']} eval`")
    if "model" not in meta:
        raise CheckpointError(f"{path} is not a llamavit checkpoint (no model metadata); use create_model(name, "
                              f"checkpoint_path=...) for official or plain weight files")
    model = create_model(meta["model"], **{**meta.get("model_kwargs", {}), **overrides})
    weights = ckpt
    if use_ema:
        if not has_ema(ckpt):
            raise CheckpointError(f"{path} has no EMA weights (the run was trained without --ema-decay): drop --ema")
        weights = os.path.join(ckpt, EMA_NAME)
    if "lora" in meta:   # adapters and head over the base checkpoint it names (checked by sha256)
        from .adapt import load_lora_run
        model = load_lora_run(model, meta["lora"], os.path.join(weights, WEIGHTS_NAME) if os.path.isdir(weights)
                              else weights)
    else:
        model = load_checkpoint(model, weights)
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"{weights} holds NaN or infinite weights ({', '.join(bad[:3])}"
                              f"{' …' if len(bad) > 3 else ''}): the run diverged; use an earlier checkpoint")
    return model


def has_ema(path: str) -> bool:
    """Whether a llamavit checkpoint (run or checkpoint directory) holds EMA weights."""
    ckpt = resolve_checkpoint(path)
    return os.path.isdir(ckpt) and os.path.isfile(os.path.join(ckpt, EMA_NAME))
