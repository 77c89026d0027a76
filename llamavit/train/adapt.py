"""What a training run adapts of its model: which parameters train (name globs), LoRA adapters (peft), the
drop-path schedule of iLLaMA's `drop_mode`, and the report of trainable parameters.

- Freezing: `trainable` globs keep only the parameters they name trainable, then `freeze` globs freeze what
  they name. A parameter its model builds frozen (the frozen LLM block) stays frozen.
- LoRA: `add_lora` injects peft's LoRA layers into the trunk's linear layers named by the targets `qkv`
  (attn.qkv, or the pyramid's attn.q / attn.kv), `proj` (attn.proj) and `mlp` (the MLP's linear layers);
  only the adapters and the classifier stay trainable. `merge_lora` folds them back into plain nn.Linear.
"""
import fnmatch
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch.nn as nn
from timm.layers import DropPath

from ..errors import CheckpointError
from ..llm import file_sha256
from ..models import load_backbone, load_checkpoint, load_partial, read_state_dict
from ..models.convert import WEIGHTS_NAME, resolve_checkpoint

# LoRA target name -> the module-name suffixes it adapts inside the trunk's blocks
LORA_TARGETS = {"qkv": r"attn\.(qkv|q|kv)", "proj": r"attn\.proj", "mlp": r"mlp\.(fc1|fc1_g|fc1_x|fc2)"}
# trunk blocks: 'blocks.3', the pyramid's 'blocks.2.5', AIM's 'trunk.blocks.3'
_BLOCK = r"(.*\.)?blocks\.\d+(\.\d+)?\."


@dataclass(frozen=True)
class LoraSettings:
    """peft LoRA on the trunk: rank r, alpha (the update is scaled by alpha / r), dropout on the adapter's
    input, and the targets (keys of LORA_TARGETS)."""
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: Tuple[str, ...] = ("qkv", "proj")

    def to_dict(self) -> Dict[str, object]:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, record: Dict[str, Any]) -> "LoraSettings":
        """The settings of a run's 'lora' record (to_dict's keys; others, such as 'base', ignored)."""
        return cls(record["rank"], record["alpha"], record["dropout"], tuple(record["targets"]))


def check_lora_targets(targets: Sequence[str]) -> None:
    """Raise ValueError for an empty list or a target name that is not a key of LORA_TARGETS."""
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        raise ValueError(f"lora_targets must name some of {sorted(LORA_TARGETS)}, got {list(targets)}")


def lora_pattern(targets: Sequence[str]) -> str:
    """The regex (fully matched against module names, as peft does) of the linear layers LoRA adapts."""
    check_lora_targets(targets)
    return _BLOCK + "(" + "|".join(LORA_TARGETS[t] for t in targets) + ")"


def _peft():
    try:
        import peft
    except ImportError:
        raise ValueError("LoRA needs Hugging Face peft: pip install 'llamavit[lora]'") from None
    return peft


def add_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Inject LoRA adapters (peft) into `model` in place; afterwards only the adapters and the classifier
    (`get_classifier()`) are trainable. Returns the model."""
    peft = _peft()
    config = peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                             target_modules=lora_pattern(settings.targets), bias="none")
    try:
        peft.inject_adapter_in_model(config, model)
    except ValueError as e:   # peft: no module matched
        raise ValueError(f"LoRA targets {list(settings.targets)} match no linear layer of {type(model).__name__}'s "
                         f"blocks ({str(e).splitlines()[0][:120]})") from None
    for p in classifier_parameters(model):
        p.requires_grad_(True)
    return model


def is_lora_model(model: nn.Module) -> bool:
    """Whether peft LoRA layers are injected in `model`."""
    return any(".lora_A." in name for name, _ in model.named_parameters())


def base_record(checkpoint_path: str, backbone_only: bool) -> Dict[str, Any]:
    """What a LoRA run records of the checkpoint it adapts: the weights file's absolute path, its sha256 and
    how it was loaded ('backbone': trunk only, a fresh classifier; 'checkpoint': strictly, all of it)."""
    resolved = resolve_checkpoint(checkpoint_path)
    weights = os.path.join(resolved, WEIGHTS_NAME) if os.path.isdir(resolved) else resolved
    weights = os.path.abspath(weights)
    return {"path": weights, "sha256": file_sha256(weights), "load": "backbone" if backbone_only else "checkpoint"}


def load_base(model: nn.Module, base: Dict[str, Any]) -> nn.Module:
    """Load the base checkpoint a LoRA run recorded (base_record) into `model`, refusing a file that is missing
    or whose sha256 differs from the recorded one."""
    path = base["path"]
    if not os.path.isfile(path):
        raise CheckpointError(f"the LoRA run's base checkpoint {path} is gone: its adapters need that exact file")
    digest = file_sha256(path)
    if digest != base["sha256"]:
        raise CheckpointError(f"the LoRA run was trained on {path} with sha256 {base['sha256'][:16]}…, but the file "
                              f"now has sha256 {digest[:16]}…: restore the base checkpoint the adapters belong to")
    if base.get("load") == "backbone":
        return load_backbone(model, path, read_state_dict(path))
    return load_checkpoint(model, path)


def load_lora_run(model: nn.Module, lora: Dict[str, Any], weights: str) -> nn.Module:
    """A LoRA run's model: `model` (built from the run's meta) gets the base checkpoint, the adapters
    (settings from the meta's 'lora' record) and the saved adapters and head from `weights`."""
    load_base(model, lora["base"])
    add_lora(model, LoraSettings.from_dict(lora))
    saved = read_state_dict(weights)
    adapters = [name for name, _ in model.named_parameters() if ".lora_" in name]
    missing = sorted(set(adapters) - set(saved))
    if missing:
        raise CheckpointError(f"{weights} lacks LoRA adapters of its own settings: {missing[:3]}")
    return load_partial(model, weights, list(saved), raw=saved)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base layer and put the plain layer back (in place): the model then
    has its original parameter names and computes what the adapted model computed. Returns the model."""
    from peft.tuners.lora import LoraLayer
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]:
        module.merge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    return model


def classifier_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The parameters of the model's head: all of `model.head` (AIM: the whole attentive probe), else of
    `get_classifier()`; none when it has neither."""
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Module) and hasattr(model, "get_classifier"):
        head = model.get_classifier()
    return list(head.parameters()) if isinstance(head, nn.Module) else []


def apply_freezing(model: nn.Module, freeze: Sequence[str] = (), trainable: Sequence[str] = ()) -> None:
    """Set requires_grad by parameter-name globs (fnmatch, e.g. 'blocks.*', '*norm*'): with `trainable`, only
    the parameters it names (and LoRA adapters, when present) train; then `freeze` freezes what it names.
    Parameters already frozen (by the model, e.g. the frozen LLM block) are never unfrozen. A pattern that
    matches no parameter is a ValueError naming it."""
    named = dict(model.named_parameters())
    for flag, patterns in (("--trainable", trainable), ("--freeze", freeze)):
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in named):
                examples = ", ".join(list(named)[:2] + list(named)[-1:])
                raise ValueError(f"{flag} pattern {pattern!r} matches no parameter of {type(model).__name__} "
                                 f"(names look like {examples})")
    if trainable:
        for name, p in named.items():
            keep = any(fnmatch.fnmatchcase(name, g) for g in trainable) or ".lora_" in name
            p.requires_grad_(p.requires_grad and keep)
    for name, p in named.items():
        if any(fnmatch.fnmatchcase(name, g) for g in freeze):
            p.requires_grad_(False)
    if not any(p.requires_grad for p in named.values()):
        raise ValueError("the freeze / trainable patterns leave no parameter to train")


def parameter_report(model: nn.Module) -> Dict[str, object]:
    """{'trainable': count, 'total': count, 'fraction': trainable / total} of the model's parameters."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": trainable, "total": total, "fraction": trainable / max(1, total)}


def trainable_state_keys(model: nn.Module) -> List[str]:
    """Names of the trainable parameters (what a LoRA checkpoint stores)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


# --- iLLaMA's drop_mode: stochastic depth scheduled early or late in training -------------------------
DROP_MODES = ("standard", "early", "late")
DROP_SCHEDULES = ("constant", "linear")


def drop_path_factor(step: int, steps_per_epoch: int, mode: str, schedule: str, cutoff_epochs: float) -> float:
    """The fraction of the model's drop-path rates in force at an optimiser step (the official
    drop_scheduler, evaluated lazily): 'standard' 1 throughout; 'early' 1 (constant) or 1 -> 0 (linear,
    endpoints included) over the first cutoff epochs, then 0; 'late' 0 before the cutoff, then 1."""
    cutoff = int(cutoff_epochs * steps_per_epoch)
    if mode == "standard":
        return 1.0
    if mode == "late":
        return 0.0 if step < cutoff else 1.0
    if step >= cutoff:
        return 0.0
    return 1.0 - step / (cutoff - 1) if schedule == "linear" and cutoff > 1 else 1.0


class DropPathSchedule:
    """Scales every DropPath of a model by a factor, keeping the model's own per-block rates (a linear ramp
    over depth in every llamavit family) as the factor-1 rates."""

    def __init__(self, model: nn.Module):
        self.modules = [m for m in model.modules() if isinstance(m, DropPath)]
        self.base = [m.drop_prob for m in self.modules]
        if not self.modules:
            raise ValueError("drop_mode early / late schedules stochastic depth, but the model has none: "
                             "set --drop-path to the rate to schedule")

    def set_factor(self, factor: float) -> None:
        for module, base in zip(self.modules, self.base):
            module.drop_prob = base * factor

    @property
    def rate(self) -> Optional[float]:
        """The deepest block's rate now."""
        return max(m.drop_prob for m in self.modules)
