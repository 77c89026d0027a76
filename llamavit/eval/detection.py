"""Detection and instance-segmentation metrics: COCO's mAP (pycocotools, through torchmetrics).

    map          AP averaged over IoU 0.50:0.05:0.95 and over the classes with ground truth
    map_50/75    AP at IoU 0.50 / 0.75; map_small/medium/large by object area (< 32², < 96², more)
    mar_1/10/100 recall at 1 / 10 / 100 detections per image
    map_per_class, mar_100_per_class   {class name: value} over the classes in targets or predictions

Segmentation (iou_type 'segm') gives the same keys with the prefix `mask_` (mask_map, mask_map_50, ...).
Values are plain floats, fractions in [0, 1]; NaN where COCO's is -1 (undefined: no ground truth of that
kind, e.g. a class only predicted, or no large objects). Labels are 1..C; class_names[l - 1] names label l.
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torchmetrics.detection import MeanAveragePrecision

IOU_TYPES = ("bbox", "segm")
_PREFIX = {"bbox": "", "segm": "mask_"}


def _iou_types(iou_type: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    types = (iou_type,) if isinstance(iou_type, str) else tuple(iou_type)
    if not types or any(t not in IOU_TYPES for t in types) or len(set(types)) != len(types):
        raise ValueError(f"iou_type must be 'bbox', 'segm' or both, got {iou_type!r}")
    return types


def _masks(masks: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) probabilities (detect's) or (N, H, W) 0/1 -> (N, H, W) bool, as torchmetrics needs."""
    masks = masks[:, 0] if masks.dim() == 4 else masks
    return masks > 0.5 if masks.is_floating_point() else masks.bool()


def _convert(item: Dict[str, torch.Tensor], keys: Sequence[str], segm: bool, what: str) -> Dict[str, torch.Tensor]:
    missing = [k for k in keys if k not in item] + (["masks"] if segm and "masks" not in item else [])
    if missing:
        raise ValueError(f"every {what} needs {', '.join(missing)}" + (" for iou_type 'segm'" if segm else ""))
    out = {k: item[k].detach().cpu() for k in keys}
    out["labels"] = out["labels"].long()
    if segm:
        out["masks"] = _masks(item["masks"].detach().cpu())
    if "iscrowd" in item:
        out["iscrowd"] = item["iscrowd"].detach().cpu()
    return out


def _value(v: float) -> float:
    return float("nan") if v == -1 else float(v)


class DetectionEvaluator:
    """COCO mAP accumulated over batches: update(predictions, targets) per batch, compute() at the end.

    predictions: per image {'boxes' (N, 4) xyxy pixels, 'scores' (N,), 'labels' (N,)[, 'masks' (N, 1, H, W) in
    [0, 1] (> 0.5 is the mask) or (N, H, W) bool]}, as `detect` gives them; targets: per image {'boxes' (M, 4),
    'labels' (M,)[, 'masks' (M, H, W)][, 'iscrowd' (M,)]}. torchmetrics gathers the states of every process in
    compute() when torch.distributed is initialised."""

    def __init__(self, iou_types: Union[str, Sequence[str]] = ("bbox",), class_names: Optional[Sequence[str]] = None):
        self.iou_types = _iou_types(iou_types)
        self.class_names = list(class_names) if class_names is not None else None
        self.metric = MeanAveragePrecision(box_format="xyxy", iou_type=self.iou_types, class_metrics=True,
                                           backend="pycocotools")

    def update(self, predictions: List[Dict[str, torch.Tensor]], targets: List[Dict[str, torch.Tensor]]) -> None:
        if len(predictions) != len(targets):
            raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets: give one of each per image")
        segm = "segm" in self.iou_types
        self.metric.update([_convert(p, ("boxes", "scores", "labels"), segm, "prediction") for p in predictions],
                           [_convert(t, ("boxes", "labels"), segm, "target") for t in targets])

    def reset(self) -> None:
        self.metric.reset()

    def compute(self) -> Dict[str, object]:
        """-> {'map', 'map_50', ..., 'map_per_class': {name: AP}, ...} (see the module doc), plain floats."""
        result = dict(self.metric.compute())   # torchmetrics caches (and would hand back) this dict
        classes = result.pop("classes").reshape(-1).tolist()
        if self.class_names is not None and any(not 1 <= c <= len(self.class_names) for c in classes):
            raise ValueError(f"labels {classes} outside 1..{len(self.class_names)} (the {len(self.class_names)} "
                             f"class names)")
        names = [self.class_names[c - 1] if self.class_names is not None else str(c) for c in classes]
        out: Dict[str, object] = {}
        for key, value in result.items():
            iou_type = key[:4] if key[:5] in ("bbox_", "segm_") else self.iou_types[0]
            name = _PREFIX[iou_type] + (key[5:] if key[:5] in ("bbox_", "segm_") else key)
            if name.endswith("_per_class"):
                out[name] = dict(zip(names, (_value(v) for v in value.reshape(-1).tolist())))
            else:
                out[name] = _value(value.item())
        return out


def detection_metrics(predictions: List[Dict[str, torch.Tensor]], targets: List[Dict[str, torch.Tensor]],
                      iou_type: Union[str, Sequence[str]] = ("bbox",),
                      class_names: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """COCO mAP of per-image predictions against targets (formats as DetectionEvaluator's) -> the module doc's
    keys: 'map', 'map_50', 'map_75', 'map_per_class' {name: AP}, ... and for 'segm' 'mask_map', 'mask_map_50', ..."""
    evaluator = DetectionEvaluator(iou_type, class_names)
    evaluator.update(predictions, targets)
    return evaluator.compute()

