"""What the dense trainers (segment.py, detect.py) share: the backbone, data and optimisation options, the
validation cadence, and rebuilding a trained model from its checkpoint's metadata."""
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple

import torch.nn as nn
from torch.utils.data import Subset

from ..data.dense import DenseTransformConfig
from ..dense import BackboneConfig
from ..errors import CheckpointError
from ..models import load_checkpoint
from .checkpoint import EMA_NAME, has_ema, read_meta, resolve_checkpoint
from .config import LoopConfig
from .plots import plot_curves
from .step_loop import StepLoop

HELP = {
    "backbone": "any llamavit or timm model name (see `llamavit models`)",
    "backbone_kwargs": "backbone options as KEY=VALUE (e.g. depth=6 embed_dim=256)",
    "backbone_checkpoint": "initial trunk weights: a llamavit run (classification, AIM, MAE), an official release "
                           "or an OpenMMLab segmentation / detection / MAE file",
    "pyramid": "auto | native (hierarchical trunks) | simple (ViTDet, plain trunks) | multilevel (intermediate blocks)",
    "block_indices": "multilevel: the four blocks tapped (default a third, half, two thirds, last)",
    "pyramid_channels": "width of the simple pyramid's levels",
    "feature_norm": "apply the trunk's final norm to the tapped block maps",
    "img_size": "training crop and evaluation short side (pixels; a multiple of the patch)",
    "scale_range": "random resize of the short side, as ratios of img_size (two numbers)",
    "photometric": "photometric distortion (brightness, contrast, saturation, hue)",
    "schedule": "learning-rate schedule: poly (mmseg) | cosine | constant",
    "warmup_steps": "linear warm-up steps",
    "eval_batch_size": "validation batch (0 = --batch-size; 1 when the validation images differ in size)",
    "lr": "peak learning rate (AdamW)", "min_lr": "final learning rate",
    "max_minutes": "stop (with a checkpoint) after this many minutes of training; 0 = no limit",
}

DENSE_RANGES = {"lr": (">=", 0), "min_lr": (">=", 0), "weight_decay": (">=", 0), "warmup_steps": (">=", 0),
                "warmup_lr": (">=", 0), "betas": ("each in", (0, 1)), "drop_path": ("in", (0, 1)),
                "img_size": (">", 0), "hflip": ("in", (0, 1.001)), "scale_range": ("increasing", None),
                "eval_every": (">", 0), "eval_batch_size": (">=", 0), "train_subset": (">=", 0),
                "val_subset": (">=", 0), "pyramid_channels": (">", 0), "max_minutes": (">=", 0),
                "layer_decay": ("fraction", None)}


@dataclass
class DenseConfig(LoopConfig):
    """The options every dense task has: backbone, data, optimisation (mmseg's defaults), validation."""
    epochs: int = 20
    batch_size: int = 16
    # backbone
    backbone: str = "visionllama_pyramid_small_224"
    backbone_kwargs: Dict[str, Any] = field(default_factory=dict)
    backbone_checkpoint: Optional[str] = None
    pyramid: str = "auto"
    block_indices: Optional[Tuple[int, ...]] = None
    pyramid_channels: int = 256
    feature_norm: bool = False
    drop_path: float = 0.1
    # data
    data: str = ""
    img_size: int = 96
    scale_range: Tuple[float, float] = (0.5, 2.0)
    hflip: float = 0.5
    photometric: bool = True
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None
    train_subset: int = 0
    val_subset: int = 0
    # optimisation
    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.05
    layer_decay: Optional[float] = None    # timm's layer-wise lr decay over the trunk's blocks (mmseg: 0.65)
    betas: Tuple[float, float] = (0.9, 0.999)
    schedule: str = "poly"
    warmup_steps: int = 0
    warmup_lr: float = 1e-6
    max_minutes: float = 0.0
    # validation
    eval_every: int = 1
    eval_batch_size: int = 0

    _ranges = DENSE_RANGES
    _task = "a dense task"

    def __post_init__(self):
        super().__post_init__()
        if not self.data:
            raise ValueError(f"{self._task} needs --data (see `llamavit scenes build` for a small set)")
        if self.schedule not in ("poly", "cosine", "constant"):
            raise ValueError(f"schedule must be one of poly, cosine, constant, got {self.schedule!r}")

    def backbone_config(self) -> BackboneConfig:
        kwargs = dict(self.backbone_kwargs)
        if self.drop_path:
            kwargs.setdefault("drop_path_rate", self.drop_path)
        return BackboneConfig(name=self.backbone, pyramid=self.pyramid, img_size=self.img_size, kwargs=kwargs,
                              out_channels=self.pyramid_channels, block_indices=self.block_indices,
                              norm=self.feature_norm)

    def transform_config(self) -> DenseTransformConfig:
        return DenseTransformConfig(img_size=self.img_size, scale_range=self.scale_range, hflip=self.hflip,
                                    photometric=self.photometric, mean=self.mean, std=self.std)


def subsets(cfg: DenseConfig, train, val):
    """The first train_subset / val_subset items of each set (0 = all)."""
    if cfg.train_subset:
        train = Subset(train, range(min(cfg.train_subset, len(train))))
    if cfg.val_subset:
        val = Subset(val, range(min(cfg.val_subset, len(val))))
    return train, val


class DenseTrainer(StepLoop):
    """A dense task on the step loop: `evaluate()` (to implement) every `eval_every` epochs and at the end; its
    scalars are logged, all of it goes to summary.json."""

    def __init__(self):
        self.last_eval: Dict[str, Any] = {}

    def evaluate(self) -> Dict[str, Any]:
        raise NotImplementedError

    def time_limit_s(self) -> float:
        return self.cfg.max_minutes * 60.0

    def after_step(self) -> None:
        epoch, rest = divmod(self.step, self.steps_per_epoch)
        if (rest == 0 and epoch % self.cfg.eval_every == 0) or self.step == self.total_steps:
            self.last_eval = self.evaluate()
            scalars = {k: v for k, v in self.last_eval.items() if not isinstance(v, dict)}
            self.log({"step": self.step, "epoch": self.step / self.steps_per_epoch, **scalars})
            if self.is_main:
                self.bar.write(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in scalars.items()))
            self.module.train()

    def after_fit(self) -> None:
        last = self.history[-1] if self.history else {}
        if last.get("step") != self.step or "loss" in last:   # not evaluated as it ends (a stop between epochs)
            self.last_eval = self.evaluate()
            scalars = {k: v for k, v in self.last_eval.items() if not isinstance(v, dict)}
            self.log({"step": self.step, "epoch": self.step / self.steps_per_epoch, **scalars})
        if self.is_main:
            plot_curves(self.history, os.path.join(self.cfg.output, "curves.png"))

    def summary_extras(self) -> Dict[str, Any]:
        return dict(self.last_eval)

    def dense_meta(self, task: str, **parts) -> Dict[str, Any]:
        """The metadata that rebuilds the model: task, backbone config, `parts` (the head's config, classes), the
        evaluation transform and the training data."""
        return {"task": task, "backbone": dataclasses.asdict(self.cfg.backbone_config()), **parts,
                "transform": dataclasses.asdict(self.cfg.transform_config()), "data": self.cfg.data}


def load_dense_model(path: str, task: str, build: Callable[[BackboneConfig, Dict[str, Any]], nn.Module],
                     use_ema: bool = False) -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild a `llamavit <task> train` model from its checkpoint: build(backbone config, meta) then the weights
    (the EMA's with use_ema); -> (model in eval mode, meta)."""
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    if meta.get("task") != task:
        made = f"a {meta['task']} checkpoint" if "task" in meta else "not a dense checkpoint"
        raise CheckpointError(f"{path} is {made}; expected one made by `llamavit {task} train`")
    model = build(BackboneConfig(**meta["backbone"]), meta)
    weights = ckpt
    if use_ema:
        if not has_ema(ckpt):
            raise CheckpointError(f"{path} has no EMA weights (the run was trained without --ema-decay): drop --ema")
        weights = os.path.join(ckpt, EMA_NAME)
    load_checkpoint(model, weights)
    return model.eval(), meta
