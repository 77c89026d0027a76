"""Semantic segmentation (`llamavit segment train`): a Segmenter (dense backbone + UperNet / FPN / linear head,
optional auxiliary FCN head) trained on the step loop with per-pixel cross-entropy (ignore index 255) on
ADE20K-layout data, validated by mIoU every epoch. The defaults follow mmseg's UperNet recipes (AdamW,
weight decay 0.05, linear warm-up then poly decay, auxiliary weight 0.4); configs/ holds the official ones.
"""
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
from torch.utils.data import Subset

from ..data.dense import ADE20KSegmentation, DenseTransformConfig, build_dense_transform, detect_layout
from ..dense import BackboneConfig, SegmenterConfig, create_segmenter
from ..dense.segmenter import Segmenter
from ..errors import CheckpointError, DatasetError
from ..eval.segmentation import evaluate_segmentation
from ..models import load_checkpoint
from ..objectives import SegmentationObjective
from .checkpoint import EMA_NAME, has_ema, read_meta, resolve_checkpoint
from .config import LoopConfig
from .distributed import all_reduce_sum
from .plots import plot_curves
from .step_loop import StepLoop

HELP = {
    "data": "ADE20K-layout directory (images/{training,validation}/*.jpg, annotations/.../*.png), e.g. from "
            "`llamavit scenes build`",
    "backbone": "any llamavit or timm model name (see `llamavit models`)",
    "backbone_kwargs": "backbone options as KEY=VALUE (e.g. depth=6 embed_dim=256)",
    "backbone_checkpoint": "initial trunk weights: a llamavit run (classification, AIM, MAE), an official release "
                           "or an OpenMMLab segmentation / detection / MAE file",
    "pyramid": "auto | native (hierarchical trunks) | simple (ViTDet, plain trunks) | multilevel (intermediate blocks)",
    "block_indices": "multilevel: the four blocks tapped (default a third, half, two thirds, last)",
    "pyramid_channels": "width of the simple pyramid's levels",
    "feature_norm": "apply the trunk's final norm to the tapped block maps",
    "head": "segmentation head: upernet | fpn | linear",
    "head_channels": "head width (0 = the head's default: upernet 256, fpn 128)",
    "aux_head": "mmseg's auxiliary FCN head on the stride-16 level (training only)",
    "aux_weight": "weight of the auxiliary loss",
    "img_size": "training crop and evaluation short side (pixels; a multiple of the patch)",
    "scale_range": "random resize of the short side, as ratios of img_size (two numbers)",
    "photometric": "photometric distortion (brightness, contrast, saturation, hue)",
    "reduce_zero_label": "ADE20K convention: label 0 is ignored and labels 1..K become classes 0..K-1",
    "schedule": "learning-rate schedule: poly (mmseg) | cosine | constant",
    "warmup_steps": "linear warm-up steps",
    "eval_mode": "validation inference: whole | slide",
    "eval_stride": "slide inference stride (0 = 2/3 of img_size)",
    "eval_batch_size": "validation batch (0 = --batch-size; 1 when the validation images differ in size)",
    "lr": "peak learning rate (AdamW)", "min_lr": "final learning rate",
}


@dataclass
class SegmentConfig(LoopConfig):
    """Semantic segmentation (`llamavit segment train`)."""
    output: str = "runs/segment"
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
    # head
    head: str = "upernet"
    head_channels: int = 0
    aux_head: bool = True
    aux_weight: float = 0.4
    # data
    data: str = ""
    img_size: int = 96
    scale_range: Tuple[float, float] = (0.5, 2.0)
    hflip: float = 0.5
    photometric: bool = True
    reduce_zero_label: bool = True
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None
    train_subset: int = 0
    val_subset: int = 0
    # optimisation
    lr: float = 1e-4
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: Tuple[float, float] = (0.9, 0.999)
    schedule: str = "poly"
    warmup_steps: int = 0
    warmup_lr: float = 1e-6
    # validation
    eval_every: int = 1
    eval_mode: str = "whole"
    eval_stride: int = 0
    eval_batch_size: int = 0               # 0 = batch_size; 1 for validation images of several sizes

    _ranges = {"lr": (">=", 0), "min_lr": (">=", 0), "weight_decay": (">=", 0), "warmup_steps": (">=", 0),
               "warmup_lr": (">=", 0), "betas": ("each in", (0, 1)), "drop_path": ("in", (0, 1)),
               "aux_weight": (">=", 0), "img_size": (">", 0), "hflip": ("in", (0, 1.001)),
               "scale_range": ("increasing", None), "eval_every": (">", 0), "eval_stride": (">=", 0),
               "eval_batch_size": (">=", 0), "train_subset": (">=", 0), "val_subset": (">=", 0),
               "head_channels": (">=", 0), "pyramid_channels": (">", 0)}

    def __post_init__(self):
        super().__post_init__()
        if not self.data:
            raise ValueError("segmentation needs --data: an ADE20K-layout directory (see `llamavit scenes build`)")
        for name, value, allowed in (("schedule", self.schedule, ("poly", "cosine", "constant")),
                                     ("eval_mode", self.eval_mode, ("whole", "slide"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")

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


def segmentation_sets(cfg: SegmentConfig):
    """(train, val) ADE20K-layout datasets of cfg.data with the dense transforms, and the class names."""
    layout = detect_layout(cfg.data, "segment")
    if layout != "ade20k":
        raise DatasetError(f"{cfg.data} has the COCO layout only; segmentation reads the ADE20K layout "
                           f"(images/training/*.jpg + annotations/training/*.png)")
    tcfg = cfg.transform_config()
    train = ADE20KSegmentation(cfg.data, "training", build_dense_transform(tcfg, True, "segment"),
                               reduce_zero_label=cfg.reduce_zero_label)
    val = ADE20KSegmentation(cfg.data, "validation", build_dense_transform(tcfg, False, "segment"),
                             reduce_zero_label=cfg.reduce_zero_label)
    classes = list(train.classes)
    if cfg.train_subset:
        train = Subset(train, range(min(cfg.train_subset, len(train))))
    if cfg.val_subset:
        val = Subset(val, range(min(cfg.val_subset, len(val))))
    return train, val, classes


class SegmentTrainer(StepLoop):
    """The step loop with the segmentation objective; validation mIoU every `eval_every` epochs."""
    progress_desc = "segment"

    def __init__(self, cfg: SegmentConfig):
        self.init_loop(cfg)
        train_set, self.val_set, self.classes = segmentation_sets(cfg)
        self.init_data(train_set)
        self.segmenter_cfg = SegmenterConfig(num_classes=len(self.classes), head=cfg.head,
                                             head_channels=cfg.head_channels, aux_head=cfg.aux_head)
        self.segmenter = create_segmenter(cfg.backbone_config(), self.segmenter_cfg, cfg.backbone_checkpoint)
        objective = SegmentationObjective(self.segmenter, cfg.aux_weight if cfg.aux_head else 0.0)
        self.init_training(objective, model=self.segmenter, lr=cfg.lr, weight_decay=cfg.weight_decay,
                           betas=cfg.betas, warmup_steps=cfg.warmup_steps, warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr,
                           schedule=cfg.schedule, ema_decay=cfg.ema_decay)
        self.last_eval: Dict[str, Any] = {}

    def meta(self) -> Dict[str, Any]:
        """What rebuilds the segmenter: its backbone and head configs, the classes and the eval transform."""
        return {"task": "segment", "backbone": dataclasses.asdict(self.cfg.backbone_config()),
                "segmenter": dataclasses.asdict(self.segmenter_cfg), "classes": self.classes,
                "transform": dataclasses.asdict(self.cfg.transform_config()), "data": self.cfg.data}

    def loss(self, images: torch.Tensor, masks: torch.Tensor) -> Dict[str, torch.Tensor]:
        loss, main, aux = self.train_module(images, masks)
        return {"loss": loss, "ce": main, "aux_ce": aux}

    def after_step(self) -> None:
        epoch, rest = divmod(self.step, self.steps_per_epoch)
        if rest == 0 and (epoch % self.cfg.eval_every == 0 or self.step == self.total_steps):
            self.last_eval = self.evaluate()
            scalars = {k: v for k, v in self.last_eval.items() if not isinstance(v, dict)}
            self.log({"step": self.step, "epoch": self.step / self.steps_per_epoch, **scalars})
            if self.is_main:
                self.bar.write(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in scalars.items()))
            self.module.train()

    def after_fit(self) -> None:
        if self.step == self.total_steps and not self.last_eval:
            self.last_eval = self.evaluate()
        if self.is_main:
            plot_curves(self.history, os.path.join(self.cfg.output, "curves.png"))

    def summary_extras(self) -> Dict[str, Any]:
        return dict(self.last_eval)

    def evaluate(self) -> Dict[str, Any]:
        """mIoU, mAcc, aAcc and per-class IoU over the validation set (each rank takes every world_size-th image;
        the confusion matrices are summed); the EMA's mIoU too when there is one."""
        env, cfg = self.env, self.cfg
        shard = Subset(self.val_set, range(env.rank, len(self.val_set), env.world_size))
        models = {"": self.segmenter, **({"ema_": self.ema.module} if self.ema is not None else {})}
        result = {}
        for prefix, model in models.items():
            metrics = evaluate_segmentation(model, shard, len(self.classes), self.classes, mode=cfg.eval_mode,
                                            crop=cfg.img_size, stride=cfg.eval_stride, device=env.device,
                                            batch_size=cfg.eval_batch_size or cfg.batch_size,
                                            reduce=lambda m: all_reduce_sum(m.double(), env))
            if prefix:
                result[prefix + "miou"] = metrics["miou"]
            else:
                result.update(metrics)
        return result


def segment(cfg: SegmentConfig) -> Dict[str, Any]:
    """Train a segmenter according to cfg; -> the summary (final loss, mIoU, per-class IoU)."""
    return SegmentTrainer(cfg).fit()


def load_segmenter(path: str, use_ema: bool = False) -> Tuple[Segmenter, Dict[str, Any]]:
    """Rebuild a segmenter from a `llamavit segment train` checkpoint (run or checkpoint directory);
    -> (segmenter in eval mode, the checkpoint's meta)."""
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    if meta.get("task") != "segment":
        raise CheckpointError(f"{path} is not a segmentation checkpoint (made by `llamavit segment train`)")
    backbone = BackboneConfig(**meta["backbone"])
    model = create_segmenter(backbone, SegmenterConfig(**meta["segmenter"]))
    weights = ckpt
    if use_ema:
        if not has_ema(ckpt):
            raise CheckpointError(f"{path} has no EMA weights (the run was trained without --ema-decay): drop --ema")
        weights = os.path.join(ckpt, EMA_NAME)
    load_checkpoint(model, weights)
    return model.eval(), meta
