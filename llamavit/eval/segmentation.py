"""Semantic-segmentation metrics from a confusion matrix (torchmetrics), as mmseg reports them.

    IoU_k  = TP_k / (TP_k + FP_k + FN_k)        per class; mIoU = their mean over classes present (in the
                                                ground truth or the prediction), classes absent from both are NaN
    Acc_k  = TP_k / (TP_k + FN_k)               per-class pixel accuracy; mAcc = their mean over present classes
    aAcc   = sum_k TP_k / labelled pixels       overall pixel accuracy

Pixels labelled `ignore_index` (255) count nowhere. Values are fractions in [0, 1].
"""
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassConfusionMatrix

from ..data.dense import collate_segmentation
from ..dense.segmenter import predict_logits


def metrics_from_confusion(confusion: torch.Tensor, class_names: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """confusion (K, K), rows = ground truth, columns = prediction -> {'miou', 'macc', 'aacc', 'iou': {name: v},
    'acc': {name: v}} (a class never seen in either is NaN in 'iou' and left out of the means)."""
    confusion = confusion.double()
    tp = confusion.diag()
    gt, pred = confusion.sum(1), confusion.sum(0)
    union = gt + pred - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))
    total = confusion.sum()
    names = list(class_names) if class_names is not None else [str(k) for k in range(len(tp))]
    if len(names) != len(tp):
        raise ValueError(f"{len(names)} class names for a {len(tp)}-class confusion matrix")
    return {"miou": _nanmean(iou), "macc": _nanmean(acc), "aacc": (tp.sum() / total).item() if total else float("nan"),
            "iou": dict(zip(names, iou.tolist())), "acc": dict(zip(names, acc.tolist()))}


def _nanmean(values: torch.Tensor) -> float:
    present = values[~values.isnan()]
    return present.mean().item() if len(present) else float("nan")


class SegmentationEvaluator:
    """Accumulates a confusion matrix over batches: update(logits (B, K, H, W) or labels (B, H, W), target
    (B, H, W)), then compute() -> metrics_from_confusion. `confusion` (K, K) may be summed across processes."""

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: Optional[Sequence[str]] = None):
        self.num_classes, self.class_names = num_classes, class_names
        self.matrix = MulticlassConfusionMatrix(num_classes, ignore_index=ignore_index, validate_args=False)

    def update(self, prediction: torch.Tensor, target: torch.Tensor) -> None:
        if prediction.dim() == target.dim() + 1:
            prediction = prediction.argmax(1)
        if prediction.shape != target.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in size")
        self.matrix.update(prediction.detach().cpu(), target.detach().cpu())

    @property
    def confusion(self) -> torch.Tensor:
        """(K, K) pixel counts, rows = ground truth, columns = prediction."""
        return self.matrix.confmat

    def compute(self, confusion: Optional[torch.Tensor] = None) -> Dict[str, object]:
        """The metrics of the accumulated matrix (or of `confusion`, e.g. summed over processes)."""
        return metrics_from_confusion(self.confusion if confusion is None else confusion, self.class_names)


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, dataset, num_classes: int, class_names: Optional[Sequence[str]] = None,
                          mode: str = "whole", crop: int = 0, stride: int = 0, batch_size: int = 1,
                          device="cpu", reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                          ) -> Dict[str, object]:
    """metrics_from_confusion of `model` over a dataset of (image (3, H, W), mask (H, W)) by whole-image or
    sliding-window inference; `reduce` sums the confusion matrix across processes (identity when None).
    Images of one batch must share a size (batch_size 1 for data of several sizes)."""
    was_training = model.training
    model.eval()
    evaluator = SegmentationEvaluator(num_classes, class_names=class_names)
    for images, masks in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_segmentation):
        logits = predict_logits(model, images.to(device), num_classes, mode, crop, stride)
        evaluator.update(logits, masks)
    model.train(was_training)
    confusion = evaluator.confusion
    if reduce is not None:
        confusion = reduce(confusion)
    if confusion.sum() == 0:
        raise ValueError("the evaluation set has no labelled pixels")
    return evaluator.compute(confusion)
