"""Overlays of dense predictions on images (torchvision's drawing utilities)."""
from typing import List, Sequence, Tuple

import torch
from torchvision.utils import draw_segmentation_masks


def palette(num_classes: int) -> List[Tuple[int, int, int]]:
    """A fixed, well-spread RGB colour per class (the same for every image and run)."""
    g = torch.Generator().manual_seed(1234)
    colours = torch.randint(40, 256, (num_classes, 3), generator=g)
    return [tuple(int(c) for c in row) for row in colours]


def segmentation_overlay(image: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
                         alpha: float = 0.5) -> torch.Tensor:
    """image uint8 (3, H, W), labels int (H, W) class indices (255 = none) -> uint8 (3, H, W), each class's
    pixels tinted with its palette colour."""
    num_classes = len(class_names)
    present = [k for k in labels.unique().tolist() if 0 <= k < num_classes]
    if not present:
        return image.clone()
    masks = torch.stack([labels == k for k in present])
    colours = palette(num_classes)
    return draw_segmentation_masks(image, masks, alpha=alpha, colors=[colours[k] for k in present])
