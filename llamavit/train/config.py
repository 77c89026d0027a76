"""Training configuration: one dataclass, filled from defaults, a YAML file, then command-line flags."""
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import yaml


class Options:
    """What every run configuration dataclass shares: building from a dict or YAML with unknown names
    refused by name, back to a dict, and the usual value checks. `_kind` names it in messages."""
    _kind = "training"

    @classmethod
    def from_dict(cls, values: Dict[str, Any]):
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(f"unknown {cls._kind} option(s) {unknown}; valid: {sorted(valid)}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str, **overrides):
        try:
            with open(path) as f:
                values = yaml.safe_load(f) or {}
        except FileNotFoundError as e:
            raise ValueError(f"config file not found: {path}") from e
        if not isinstance(values, dict):
            raise ValueError(f"config file {path} must hold a mapping of option: value")
        return cls.from_dict({**values, **overrides})

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def _require_positive(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def _lists_to_tuples(self, *names: str) -> None:
        """YAML and JSON give lists; the configs hold tuples."""
        for name in names:
            if isinstance(getattr(self, name), list):
                setattr(self, name, tuple(getattr(self, name)))


@dataclass
class TrainConfig(Options):
    # model
    model: str = "illama_tiny_patch16_224"
    model_kwargs: Dict[str, Any] = field(default_factory=dict)   # extra create_model options
    checkpoint_path: Optional[str] = None                          # initial weights (official or ours)
    img_size: int = 224
    in_chans: int = 3
    drop_path: float = 0.0
    # data
    data: str = "fashion_mnist"            # 'fashion_mnist', 'synthetic' or an ImageFolder path
    train_subset: int = 0                  # >0: use only the first N training images (smoke runs)
    val_subset: int = 0
    num_workers: int = 0
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None
    scale: Tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    auto_augment: Optional[str] = None
    re_prob: float = 0.0
    crop_pct: float = 0.875
    # optimisation
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_epochs: float = 1.0
    warmup_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: Tuple[float, float] = (0.9, 0.999)
    clip_grad: Optional[float] = None
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    ema_decay: float = 0.0                 # 0 = no EMA
    amp: bool = False                      # bf16 autocast
    # scale: torchrun sets the world size; batch_size stays the GLOBAL batch (split over ranks and
    # accumulation steps), so the loss curve does not depend on how many processes run it
    grad_accum_steps: int = 1
    grad_checkpointing: bool = False       # activation checkpointing in the model's blocks
    compile: bool = False                  # torch.compile the model for training
    fsdp: bool = False                     # FSDP2 (fully_shard) instead of DDP under torchrun
    device: str = "auto"                   # 'auto' (this rank's GPU if any, else CPU) | 'cpu' | 'cuda'
    # iLLaMA soft mask: 'none' keeps the model's rate; 'constant' holds r=1 for soft_mask_epochs then 0;
    # 'linear' decays r from 1 to 0 over soft_mask_epochs (updated every step), then 0
    soft_mask: str = "none"
    soft_mask_epochs: float = 0.0
    # bookkeeping
    output: str = "runs/train"
    seed: int = 0
    resume: bool = False
    max_steps: int = 0                     # >0: stop after this many steps (the schedule still spans `epochs`)
    log_every: int = 20
    ckpt_every: int = 0                    # >0: also checkpoint every N steps (always at each epoch end)
    eval_every: int = 1                    # evaluate every N epochs (and at the end)
    keep_checkpoints: int = 2
    progress: bool = True

    def __post_init__(self):
        if self.soft_mask not in ("none", "constant", "linear"):
            raise ValueError(f"soft_mask must be 'none', 'constant' or 'linear', got {self.soft_mask!r}")
        self._require_positive("epochs", "batch_size", "grad_accum_steps")
        self._lists_to_tuples("scale", "betas", "mean", "std")
