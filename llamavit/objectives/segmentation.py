"""The segmentation objective: per-pixel cross-entropy with an ignore index, plus mmseg's auxiliary-head term."""
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = 255


class SegmentationObjective(nn.Module):
    """Wraps a Segmenter for training: forward(images (B, C, H, W), masks (B, H, W) int64, IGNORE_INDEX for
    unlabelled pixels) -> (loss, main cross-entropy, auxiliary cross-entropy), scalars; loss = main +
    aux_weight * aux (mmseg's UperNet configs: 0.4; 0 without an auxiliary head)."""

    def __init__(self, segmenter: nn.Module, aux_weight: float = 0.4, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.segmenter, self.aux_weight, self.ignore_index = segmenter, aux_weight, ignore_index

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, aux = self.segmenter.forward_with_aux(images)
        main = self.cross_entropy(logits, masks)
        if aux is None or self.aux_weight == 0:
            return main, main, torch.zeros_like(main)
        aux_ce = self.cross_entropy(aux, masks)
        return main + self.aux_weight * aux_ce, main, aux_ce

    def cross_entropy(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Mean over labelled pixels (0 when a batch has none, so that a crop of padding cannot give NaN)."""
        if not (masks != self.ignore_index).any():
            return logits.sum() * 0.0
        return F.cross_entropy(logits.float(), masks, ignore_index=self.ignore_index)
