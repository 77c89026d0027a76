"""Running trained checkpoints on image files: classes (classifiers), per-pixel classes (segmenters), objects
(detectors)."""
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torchvision import tv_tensors
from torchvision.transforms.functional import pil_to_tensor

from .data import TransformConfig, build_transform
from .data.dense import DenseTransformConfig, build_dense_transform
from .dense import predict_logits
from .dense.detection import detect
from .errors import ImageReadError


def load_image(path: str) -> Image.Image:
    """Open an image file fully into memory; ImageReadError naming the file otherwise."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except FileNotFoundError as e:
        raise ImageReadError(f"image not found: {path}") from e
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageReadError(f"cannot read image {path}: not a readable image file ({e})") from e


@torch.no_grad()
def predict_images(model: nn.Module, paths: Sequence[str], transform_cfg: TransformConfig, classes: Sequence[str],
                   topk: int = 5) -> List[List[Tuple[str, float]]]:
    """Top-k (class name, probability) for each image file, in the order given."""
    if topk < 1:
        raise ValueError(f"topk must be at least 1, got {topk}")
    tf = build_transform(transform_cfg, is_training=False)
    batch = torch.stack([tf(load_image(p)) for p in paths])
    model.eval()
    probs = model(batch).softmax(dim=-1)
    k = min(topk, probs.shape[-1])
    values, indices = probs.topk(k, dim=-1)
    return [[(classes[i] if i < len(classes) else str(i), v) for v, i in zip(vs.tolist(), ids.tolist())]
            for vs, ids in zip(values, indices)]


@torch.no_grad()
def segment_images(model: nn.Module, paths: Sequence[str], transform_cfg: DenseTransformConfig, num_classes: int,
                   mode: str = "whole", crop: int = 0, stride: int = 0) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """For each image file: (the image uint8 (3, H, W), predicted class per pixel int64 (H, W)) at the file's
    own size (the model sees it resized as in validation; the labels are resized back, nearest)."""
    tf = build_dense_transform(transform_cfg, train=False, task="segment")
    model.eval()
    results = []
    for path in paths:
        image = pil_to_tensor(load_image(path).convert("RGB"))
        logits = predict_logits(model, tf(tv_tensors.Image(image)).as_subclass(torch.Tensor)[None], num_classes,
                                mode, crop, stride)
        labels = F.interpolate(logits.argmax(1, keepdim=True).float(), size=image.shape[-2:], mode="nearest")
        results.append((image, labels[0, 0].long()))
    return results


@torch.no_grad()
def detect_images(detector: nn.Module, paths: Sequence[str], transform_cfg: DenseTransformConfig
                  ) -> List[Tuple[torch.Tensor, Dict[str, torch.Tensor]]]:
    """For each image file: (the image uint8 (3, H, W), its detections {'boxes' (N, 4) xyxy, 'scores', 'labels'
    1..C[, 'masks' (N, 1, H, W)]}) in the file's own pixels (the detector sees it resized as in validation)."""
    tf = build_dense_transform(transform_cfg, train=False, task="segment")
    results = []
    for path in paths:
        image = pil_to_tensor(load_image(path).convert("RGB"))
        resized = tf(tv_tensors.Image(image)).as_subclass(torch.Tensor)
        found = {k: v.cpu() for k, v in detect(detector, resized[None])[0].items()}
        sy, sx = image.shape[-2] / resized.shape[-2], image.shape[-1] / resized.shape[-1]
        found["boxes"] = found["boxes"] * torch.tensor([sx, sy, sx, sy])
        if "masks" in found:
            found["masks"] = F.interpolate(found["masks"], size=image.shape[-2:], mode="bilinear", align_corners=False)
        results.append((image, found))
    return results
