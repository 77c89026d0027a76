"""Object detection and instance segmentation (`llamavit detect train`): a torchvision detector (FCOS, RetinaNet,
Faster / Mask R-CNN) on a dense backbone, trained on the step loop on COCO-layout data, validated by COCO box
(and mask) mAP every epoch."""
from dataclasses import dataclass, field
from typing import Any, Dict, Tuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

from ..data.dense import CocoDetection, build_dense_transform, collate_detection, detect_layout
from ..dense import create_backbone, trunk_group_matcher
from ..dense.detection import DETECTORS, batch_targets, build_detector, detect, detection_losses
from ..errors import DatasetError
from ..eval.detection import DetectionEvaluator
from .dense import HELP as DENSE_HELP
from .dense import DenseConfig, DenseTrainer, load_dense_model, subsets

HELP = {
    **DENSE_HELP,
    "data": "COCO-layout directory (annotations/instances_{train,val}.json, images in train/ and val/), e.g. from "
            "`llamavit scenes build`",
    "detector": "torchvision detector: " + " | ".join(DETECTORS),
    "detector_kwargs": "the torchvision detector's own options as KEY=VALUE (e.g. score_thresh=0.1)",
    "fpn_channels": "width of the detector's FPN",
}


@dataclass
class DetectConfig(DenseConfig):
    """Object detection / instance segmentation (`llamavit detect train`)."""
    output: str = "runs/detect"
    detector: str = "fcos"
    detector_kwargs: Dict[str, Any] = field(default_factory=dict)
    fpn_channels: int = 256
    photometric: bool = True
    scale_range: Tuple[float, float] = (0.8, 1.25)   # detection crops keep most of each object
    drop_path: float = 0.0
    clip_grad: float = 10.0

    _ranges = {**DenseConfig._ranges, "fpn_channels": (">", 0)}
    _task = "detection"

    def __post_init__(self):
        super().__post_init__()
        if self.detector not in DETECTORS:
            raise ValueError(f"detector must be one of {', '.join(DETECTORS)}, got {self.detector!r}")

    @property
    def masks(self) -> bool:
        """Whether the detector predicts instance masks (trained on them, scored by mask mAP too)."""
        return self.detector == "mask_rcnn"


def detection_sets(cfg: DetectConfig):
    """(train, val) COCO-layout datasets of cfg.data with the dense transforms, and the category names."""
    if detect_layout(cfg.data, "detect") != "coco":
        raise DatasetError(f"{cfg.data} has the ADE20K layout only; detection reads the COCO layout "
                           f"(annotations/instances_train.json + train/*.jpg)")
    tcfg = cfg.transform_config()
    train = CocoDetection(cfg.data, "train", build_dense_transform(tcfg, True, "detect"))
    val = CocoDetection(cfg.data, "val", build_dense_transform(tcfg, False, "detect"))
    return (*subsets(cfg, train, val), list(train.classes))


def build_from_meta(backbone, detector: Dict[str, Any]) -> nn.Module:
    """A detector from a backbone config and the meta's detector entry (arch, num_classes, options)."""
    return build_detector(create_backbone(backbone), detector["num_classes"], detector["arch"],
                          fpn_channels=detector["fpn_channels"], **detector["options"])


class DetectTrainer(DenseTrainer):
    """The step loop with torchvision's detection losses; validation mAP every `eval_every` epochs."""
    progress_desc = "detect"
    collate_fn = staticmethod(collate_detection)

    def __init__(self, cfg: DetectConfig):
        super().__init__()
        self.init_loop(cfg)
        train_set, self.val_set, self.classes = detection_sets(cfg)
        self.init_data(train_set)
        self.detector_meta = {"arch": cfg.detector, "num_classes": len(self.classes) + 1,
                              "fpn_channels": cfg.fpn_channels, "options": dict(cfg.detector_kwargs)}
        self.detector = build_detector(create_backbone(cfg.backbone_config(), cfg.backbone_checkpoint),
                                       len(self.classes) + 1, cfg.detector, fpn_channels=cfg.fpn_channels,
                                       **cfg.detector_kwargs)
        if cfg.layer_decay:
            self.detector.group_matcher = trunk_group_matcher(self.detector)
        self.init_training(self.detector, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas,
                           warmup_steps=cfg.warmup_steps, warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr,
                           schedule=cfg.schedule, ema_decay=cfg.ema_decay, layer_decay=cfg.layer_decay)

    def meta(self) -> Dict[str, Any]:
        return self.dense_meta("detect", detector=self.detector_meta, classes=self.classes)

    def loss(self, images, boxes, labels, masks) -> Dict[str, torch.Tensor]:
        terms = detection_losses(self.train_module, images, boxes, labels, masks if self.cfg.masks else None)
        return {"loss": terms.pop("loss"), **terms}

    def evaluate(self) -> Dict[str, Any]:
        """COCO box mAP (and mask mAP for Mask R-CNN) over the validation set, of the EMA too when there is one;
        each rank scores every world_size-th image and torchmetrics gathers them."""
        env, cfg = self.env, self.cfg
        shard = Subset(self.val_set, range(env.rank, len(self.val_set), env.world_size))
        models = {"": self.detector, **({"ema_": self.ema.module} if self.ema is not None else {})}
        result = {}
        for prefix, model in models.items():
            metrics = evaluate_detection(model, shard, self.classes, masks=cfg.masks, device=env.device,
                                         batch_size=cfg.eval_batch_size or cfg.batch_size)
            if prefix:
                result.update({prefix + k: metrics[k] for k in ("map", "map_50")})
            else:
                result.update(metrics)
        return result


@torch.no_grad()
def evaluate_detection(detector: nn.Module, dataset, class_names, masks: bool = False, device="cpu",
                       batch_size: int = 1) -> Dict[str, object]:
    """COCO mAP of `detector` over a dataset of (image, target) (see DetectionEvaluator): 'map', 'map_50', ...,
    per-class AP by name, and 'mask_map', ... when `masks`. Fractions in [0, 1]."""
    evaluator = DetectionEvaluator(("bbox", "segm") if masks else ("bbox",), class_names)
    for images, boxes, labels, instance_masks in DataLoader(dataset, batch_size=batch_size,
                                                            collate_fn=collate_detection):
        predictions = detect(detector, images.to(device))
        evaluator.update([{k: v.cpu() for k, v in p.items()} for p in predictions],
                         batch_targets(boxes, labels, instance_masks if masks else None))
    return evaluator.compute()


def train_detector(cfg: DetectConfig) -> Dict[str, Any]:
    """Train a detector according to cfg; -> the summary (final loss, map, map_50, per-class AP)."""
    return DetectTrainer(cfg).fit()


def load_detector(path: str, use_ema: bool = False) -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild a detector from a `llamavit detect train` checkpoint; -> (detector in eval mode, meta)."""
    return load_dense_model(path, "detect", lambda backbone, meta: build_from_meta(backbone, meta["detector"]),
                            use_ema)

