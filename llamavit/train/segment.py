"""Semantic segmentation (`llamavit segment train`): a Segmenter (dense backbone + UperNet / FPN / linear head,
optional auxiliary FCN head) trained on the step loop with per-pixel cross-entropy (ignore index 255) on
ADE20K-layout data, validated by mIoU every epoch. The defaults follow mmseg's UperNet recipes (AdamW,
weight decay 0.05, linear warm-up then poly decay, auxiliary weight 0.4); configs/ holds the official ones.
"""
import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Tuple

import torch
from torch.utils.data import Subset

from ..data.dense import ADE20KSegmentation, CocoSemantic, build_dense_transform, detect_layout
from ..dense import SegmenterConfig, create_segmenter, trunk_group_matcher
from ..dense.segmenter import Segmenter
from ..eval.segmentation import evaluate_segmentation
from ..objectives import SegmentationObjective
from .dense import HELP as DENSE_HELP
from .dense import DenseConfig, DenseTrainer, load_dense_model, subsets
from .distributed import all_reduce_sum

HELP = {
    **DENSE_HELP,
    "data": "ADE20K-layout directory (images/{training,validation}/*.jpg, annotations/.../*.png) or a COCO-layout "
            "one (its instances as label maps), e.g. from `llamavit scenes build`",
    "head": "segmentation head: upernet | fpn | linear",
    "head_channels": "head width (0 = the head's default: upernet 256, fpn 128)",
    "aux_head": "mmseg's auxiliary FCN head on the stride-16 level (training only)",
    "aux_weight": "weight of the auxiliary loss",
    "reduce_zero_label": "ADE20K convention: label 0 is ignored and labels 1..K become classes 0..K-1",
    "eval_mode": "validation inference: whole | slide",
    "eval_stride": "slide inference stride (0 = 2/3 of img_size)",
}


@dataclass
class SegmentConfig(DenseConfig):
    """Semantic segmentation (`llamavit segment train`)."""
    output: str = "runs/segment"
    head: str = "upernet"
    head_channels: int = 0
    aux_head: bool = True
    aux_weight: float = 0.4
    reduce_zero_label: bool = True
    eval_mode: str = "whole"
    eval_stride: int = 0

    _ranges = {**DenseConfig._ranges, "aux_weight": (">=", 0), "eval_stride": (">=", 0), "head_channels": (">=", 0)}
    _task = "segmentation"

    def __post_init__(self):
        super().__post_init__()
        if self.eval_mode not in ("whole", "slide"):
            raise ValueError(f"eval_mode must be one of whole, slide, got {self.eval_mode!r}")


def segmentation_dataset(data: str, split: str, transform=None, reduce_zero_label: bool = True):
    """The `split` ('train' / 'val') of `data`: the ADE20K layout, or the COCO layout's instances as label maps
    (background + categories) when the directory holds only that."""
    if detect_layout(data, "segment") == "ade20k":
        return ADE20KSegmentation(data, split, transform, reduce_zero_label=reduce_zero_label)
    return CocoSemantic(data, split, transform)


def segmentation_sets(cfg: SegmentConfig):
    """(train, val) datasets of cfg.data with the dense transforms, and the class names."""
    tcfg = cfg.transform_config()
    train = segmentation_dataset(cfg.data, "train", build_dense_transform(tcfg, True, "segment"),
                                 cfg.reduce_zero_label)
    val = segmentation_dataset(cfg.data, "val", build_dense_transform(tcfg, False, "segment"), cfg.reduce_zero_label)
    return (*subsets(cfg, train, val), list(train.classes))


class SegmentTrainer(DenseTrainer):
    """The step loop with the segmentation objective; validation mIoU every `eval_every` epochs."""
    progress_desc = "segment"

    def __init__(self, cfg: SegmentConfig):
        super().__init__()
        self.init_loop(cfg)
        train_set, self.val_set, self.classes = segmentation_sets(cfg)
        self.init_data(train_set)
        self.segmenter_cfg = SegmenterConfig(num_classes=len(self.classes), head=cfg.head,
                                             head_channels=cfg.head_channels, aux_head=cfg.aux_head)
        self.segmenter = create_segmenter(cfg.backbone_config(), self.segmenter_cfg, cfg.backbone_checkpoint)
        objective = SegmentationObjective(self.segmenter, cfg.aux_weight if cfg.aux_head else 0.0)
        if cfg.layer_decay:
            objective.group_matcher = trunk_group_matcher(objective)
        self.init_training(objective, model=self.segmenter, lr=cfg.lr, weight_decay=cfg.weight_decay,
                           betas=cfg.betas, warmup_steps=cfg.warmup_steps, warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr,
                           schedule=cfg.schedule, ema_decay=cfg.ema_decay, layer_decay=cfg.layer_decay)

    def meta(self) -> Dict[str, Any]:
        return self.dense_meta("segment", segmenter=dataclasses.asdict(self.segmenter_cfg), classes=self.classes,
                               reduce_zero_label=self.cfg.reduce_zero_label)

    def loss(self, images: torch.Tensor, masks: torch.Tensor) -> Dict[str, torch.Tensor]:
        loss, main, aux = self.train_module(images, masks)
        return {"loss": loss, "ce": main, "aux_ce": aux}

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
    return load_dense_model(path, "segment", lambda backbone, meta: create_segmenter(
        backbone, SegmenterConfig(**meta["segmenter"])), use_ema)
