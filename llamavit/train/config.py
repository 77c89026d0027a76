"""Run configurations: dataclasses filled from defaults, a YAML file, then command-line flags.

`LoopConfig` holds what the one step loop reads (batch, precision, accumulation, clipping, EMA, compile,
DDP/FSDP, checkpoints, resume, log); every trainer's config extends it with its own options, so every
trainer takes the same loop flags.
"""
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

import yaml

from ..options import check_ranges, check_types


class Options:
    """What every run configuration dataclass shares: building from a dict or YAML with unknown names
    refused by name, back to a dict, and the usual value checks. `_kind` names it in messages."""
    _kind = "training"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]):
        """The config from a mapping; unknown names are refused by name."""
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(f"unknown {cls._kind} option(s) {unknown}; valid: {sorted(valid)}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: Optional[str], defaults: Optional[Mapping[str, Any]] = None, **overrides):
        """defaults < the YAML mapping at `path` (None: no file) < overrides (the command-line flags)."""
        return cls.from_dict({**(defaults or {}), **yaml_values(path), **overrides})

    def to_dict(self) -> Dict[str, Any]:
        """The config as a plain dict (JSON-able)."""
        return dataclasses.asdict(self)

    def _check(self, **rules) -> None:
        """Types from the annotations (YAML's lists become tuples, '1e-3' a float), then value ranges (see
        llamavit.options.check_ranges); one ValueError line naming the option."""
        check_types(self, self._kind)
        check_ranges(dataclasses.asdict(self), rules, self._kind)


def yaml_values(path: Optional[str]) -> Dict[str, Any]:
    """The option: value mapping of a YAML file ({} for None), with one-line errors."""
    if path is None:
        return {}
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except FileNotFoundError as e:
        raise ValueError(f"config file not found: {path}") from e
    except IsADirectoryError as e:
        raise ValueError(f"config file {path} is a directory; expected a YAML file") from e
    except (PermissionError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read config file {path}: {e}") from e
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of option: value")
    return values


# value ranges of the loop's options (the trainers add theirs in `_ranges`)
LOOP_RANGES = {"epochs": (">", 0), "batch_size": (">", 0), "grad_accum_steps": (">", 0), "log_every": (">", 0),
               "num_workers": (">=", 0), "clip_grad": (">=", 0), "ema_decay": ("in", (0, 1)), "max_steps": (">=", 0),
               "ckpt_every": (">=", 0), "keep_checkpoints": (">", 0)}


@dataclass
class LoopConfig(Options):
    """The options of the step loop, shared by every trainer."""
    epochs: float = 10                     # fractions allowed: the schedule then ends inside an epoch
    # the GLOBAL batch: torchrun sets the world size and each rank trains on its slice, split again into
    # grad_accum_steps micro-batches, so the loss curve does not depend on how many processes run it
    batch_size: int = 128
    num_workers: int = 0
    grad_accum_steps: int = 1
    clip_grad: Optional[float] = None
    amp: bool = False                      # bf16 autocast
    ema_decay: float = 0.0                 # 0 = no EMA of the weights
    grad_checkpointing: bool = False       # activation checkpointing in the model's blocks
    compile: bool = False                  # torch.compile the trained module
    fsdp: bool = False                     # FSDP2 (fully_shard) instead of DDP under torchrun
    device: str = "auto"                   # 'auto' (this rank's GPU if any, else CPU) | 'cpu' | 'cuda'
    output: str = "runs/train"
    seed: int = 0
    resume: bool = False
    allow_config_change: bool = False      # --resume with other options than the run's (logged); else refused
    max_steps: int = 0                     # >0: stop after this many steps (the schedule still spans `epochs`)
    log_every: int = 20
    ckpt_every: int = 0                    # >0: also checkpoint every N steps (always at each epoch end)
    keep_checkpoints: int = 2
    progress: bool = True
    tensorboard: bool = False              # also write <output>/tensorboard: the log's numbers, the run's PNGs
    _ranges = {}   # a trainer's own ranges (ClassVar: not a field)

    def __post_init__(self):
        self._check(**{**LOOP_RANGES, **self._ranges})
        if self.epochs == int(self.epochs):   # whole epochs stay an int: in messages, JSON and earlier runs' configs
            self.epochs = int(self.epochs)
        if self.fsdp and self.ema_decay > 0:
            raise ValueError("EMA of an FSDP-sharded model is not supported: use ema_decay=0 with --fsdp")


@dataclass
class TrainConfig(LoopConfig):
    """Supervised training (`llamavit train`, `llamavit finetune`)."""
    # model
    model: str = "illama_tiny_patch16_224"
    model_kwargs: Dict[str, Any] = field(default_factory=dict)   # extra create_model options
    checkpoint_path: Optional[str] = None                          # initial weights (official or ours)
    init_from_llm: Optional[str] = None    # 'smollm2' or an LLM path: iLLaMA / VisionLLaMA blocks by weight selection
    img_size: int = 224
    in_chans: int = 3
    drop_path: float = 0.0
    # data
    task: str = "image"                    # the inputs: image | points (clouds) | video (clips); docs/modalities.md
    data: str = "fashion_mnist"            # 'fashion_mnist', 'digits', 'synthetic' or a path (ImageFolder, ...)
    num_points: int = 1024                 # points: points per cloud (sampled from each file)
    num_frames: int = 8                    # video: frames per clip
    train_subset: int = 0                  # >0: use only the first N training images (smoke runs)
    val_subset: int = 0
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None
    scale: Tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    auto_augment: Optional[str] = None
    re_prob: float = 0.0
    crop_pct: float = 0.875
    shift: int = 0                         # >0: random shift by up to N px instead of the random-resized crop
    # optimisation
    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_epochs: float = 1.0
    warmup_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: Tuple[float, float] = (0.9, 0.999)
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    # iLLaMA soft mask: 'none' keeps the model's rate; 'constant' holds r=1 for soft_mask_epochs then 0;
    # 'linear' decays r from 1 to 0 over soft_mask_epochs (updated every step), then 0
    soft_mask: str = "none"
    soft_mask_epochs: float = 0.0
    # iLLaMA's drop_mode: stochastic depth (drop_path) in force throughout ('standard'), only for the first
    # drop_cutoff_epochs ('early'; 'linear' decays it to 0 over them) or only after them ('late')
    drop_mode: str = "standard"
    drop_schedule: str = "constant"
    drop_cutoff_epochs: float = 0.0
    eval_every: int = 1                    # evaluate every N epochs (and at the end)
    # adaptation (docs/adaptation.md)
    layer_decay: Optional[float] = None    # timm's layer-wise learning-rate decay, e.g. 0.75 (None: off)
    freeze: Tuple[str, ...] = ()           # parameter-name globs to freeze
    trainable: Tuple[str, ...] = ()        # parameter-name globs: only these train (plus LoRA adapters)
    lora_rank: int = 0                     # >0: LoRA adapters (peft) on the trunk; only they and the head train
    lora_alpha: Optional[float] = None     # the update is scaled by alpha / rank (None: alpha = rank)
    lora_dropout: float = 0.0
    lora_targets: Tuple[str, ...] = ("qkv", "proj")   # of qkv, proj, mlp
    merge: bool = False                    # with LoRA: also write <output>/merged, a plain checkpoint
    teacher: Optional[str] = None          # distillation teacher: a llamavit run / checkpoint, or timm:NAME
    distill: str = "none"                  # none | soft | hard (DeiT's)
    distill_alpha: float = 0.5
    distill_tau: float = 1.0

    _ranges = {"lr": (">=", 0), "min_lr": (">=", 0), "warmup_epochs": (">=", 0), "warmup_lr": (">=", 0),
               "weight_decay": (">=", 0), "label_smoothing": ("in", (0, 1)), "mixup": (">=", 0),
               "cutmix": (">=", 0), "drop_path": ("in", (0, 1)), "hflip": ("in", (0, 1.001)),
               "re_prob": ("in", (0, 1.001)), "crop_pct": ("in", (0.001, 1.001)), "shift": (">=", 0),
               "scale": ("sorted", None), "betas": ("each in", (0, 1)), "soft_mask_epochs": (">=", 0),
               "eval_every": (">", 0),
               "train_subset": (">=", 0), "val_subset": (">=", 0), "img_size": (">", 0), "in_chans": (">", 0),
               "num_points": (">", 0), "num_frames": (">", 0),
               "drop_cutoff_epochs": (">=", 0), "layer_decay": ("fraction", None), "lora_rank": (">=", 0),
               "lora_alpha": (">", 0), "lora_dropout": ("in", (0, 1)), "distill_alpha": ("in", (0, 1.001)),
               "distill_tau": (">", 0)}

    def __post_init__(self):
        super().__post_init__()
        choices = {"soft_mask": ("none", "constant", "linear"), "drop_mode": ("standard", "early", "late"),
                   "drop_schedule": ("constant", "linear"), "distill": ("none", "soft", "hard"),
                   "task": ("image", "points", "video")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.drop_mode != "standard" and not self.drop_path:
            raise ValueError(f"drop_mode {self.drop_mode!r} schedules stochastic depth: give --drop-path, the rate "
                             f"it schedules")
        if self.drop_mode != "standard" and self.drop_cutoff_epochs <= 0:
            raise ValueError(f"drop_mode {self.drop_mode!r} needs --drop-cutoff-epochs > 0")
        if (self.teacher is None) != (self.distill == "none"):
            raise ValueError("distillation needs both --teacher RUN_OR_NAME and --distill soft|hard")
        # '--lora-targets qkv,proj' as well as '--lora-targets qkv proj'
        self.lora_targets = tuple(t.strip() for item in self.lora_targets for t in item.split(",") if t.strip())
        if self.init_from_llm and self.checkpoint_path:
            raise ValueError("give --checkpoint-path or --init-from-llm, not both")
        if self.lora_rank:
            if not self.checkpoint_path:
                raise ValueError("LoRA adapts a pre-trained model: give --checkpoint-path (llamavit finetune)")
            if self.ema_decay > 0 or self.fsdp:
                raise ValueError("LoRA runs support neither --ema-decay nor --fsdp")
            from .adapt import check_lora_targets
            check_lora_targets(self.lora_targets)
        else:
            given = [name for name, default in (("lora_alpha", None), ("lora_dropout", 0.0),
                                                 ("lora_targets", ("qkv", "proj")), ("merge", False))
                     if getattr(self, name) != default]
            if given:
                raise ValueError(f"{', '.join(given)} configure LoRA adapters: give --lora-rank >= 1 as well")
