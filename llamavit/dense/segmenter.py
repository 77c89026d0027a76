"""The segmenter: a dense backbone, a head and an optional auxiliary head; whole-image and sliding-window inference."""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .heads import FCNHead, create_head
from .pyramid import BackboneConfig, DenseBackbone, create_backbone


@dataclass
class SegmenterConfig:
    """A segmenter's architecture (recorded in its checkpoints)."""
    num_classes: int = 150
    head: str = "upernet"       # upernet | fpn | linear
    head_channels: int = 0      # 0 = the head's default width
    aux_head: bool = True       # mmseg's auxiliary FCN head on the stride-16 level (training only)


class Segmenter(nn.Module):
    """images (B, C, H, W) -> per-pixel class logits (B, K, H, W).

    Inputs of any size are zero-padded (after normalisation) to the backbone's size_divisor and the logits
    cropped back, so every level of the pyramid is an exact halving of the one before.
    """

    def __init__(self, backbone: DenseBackbone, cfg: SegmenterConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.head = create_head(cfg.head, backbone.out_channels, cfg.num_classes, cfg.head_channels)
        self.aux_head = FCNHead(backbone.out_channels, cfg.num_classes) if cfg.aux_head else None

    def forward_with_aux(self, images: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(B, C, H, W) -> (logits (B, K, H, W), auxiliary logits (B, K, H, W) or None without an aux head)."""
        maps, padded, size = self._pyramid(images)
        logits = self._to_image(self.head(maps), padded, size)
        aux = self._to_image(self.aux_head(maps), padded, size) if self.aux_head is not None else None
        return logits, aux

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> logits (B, K, H, W)."""
        maps, padded, size = self._pyramid(images)
        return self._to_image(self.head(maps), padded, size)

    def _pyramid(self, images: torch.Tensor):
        """-> (the backbone's maps of the padded images, padded size, original size)."""
        h, w = images.shape[-2:]
        d = self.backbone.size_divisor
        padded = F.pad(images, (0, -w % d, 0, -h % d))
        return self.backbone(padded), padded.shape[-2:], (h, w)

    @staticmethod
    def _to_image(logits: torch.Tensor, padded: Tuple[int, int], size: Tuple[int, int]) -> torch.Tensor:
        """Logits of the padded input at any resolution -> (B, K, *size) over the unpadded image."""
        logits = F.interpolate(logits, size=tuple(padded), mode="bilinear", align_corners=False)
        return logits[..., :size[0], :size[1]]


def create_segmenter(backbone: BackboneConfig, cfg: SegmenterConfig, checkpoint: Optional[str] = None) -> Segmenter:
    """A segmenter on the backbone of `backbone`, its trunk initialised from `checkpoint` (see create_backbone)."""
    return Segmenter(create_backbone(backbone, checkpoint), cfg)


@torch.no_grad()
def slide_logits(model: nn.Module, image: torch.Tensor, crop: int, stride: int, num_classes: int) -> torch.Tensor:
    """Sliding-window inference as mmseg's 'slide' mode: crops of `crop` px every `stride` px (the last ones
    flush with the border), logits averaged where crops overlap. image (B, C, H, W) -> logits (B, K, H, W)."""
    if not 0 < stride <= crop:
        raise ValueError(f"the slide stride must be in (0, crop={crop}], got {stride}")
    b, _, h, w = image.shape
    logits = image.new_zeros((b, num_classes, h, w))
    count = image.new_zeros((1, 1, h, w))
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    for r in range(rows):
        for c in range(cols):
            y1 = max(min(r * stride + crop, h) - crop, 0)
            x1 = max(min(c * stride + crop, w) - crop, 0)
            y2, x2 = min(y1 + crop, h), min(x1 + crop, w)
            logits[..., y1:y2, x1:x2] += model(image[..., y1:y2, x1:x2])
            count[..., y1:y2, x1:x2] += 1
    return logits / count


@torch.no_grad()
def predict_logits(model: nn.Module, image: torch.Tensor, num_classes: int, mode: str = "whole", crop: int = 0,
                   stride: int = 0) -> torch.Tensor:
    """Inference by `mode`: 'whole' (the image at once) or 'slide' (crop, stride; stride default 2/3 crop as
    mmseg's 512/341). image (B, C, H, W) -> logits (B, K, H, W)."""
    if mode == "whole":
        return model(image)
    if mode == "slide":
        if crop <= 0:
            raise ValueError("slide inference needs a crop size > 0 (the training crop)")
        return slide_logits(model, image, crop, stride or max(1, crop * 2 // 3), num_classes)
    raise ValueError(f"inference mode must be 'whole' or 'slide', got {mode!r}")
