"""Classifying image files with a trained checkpoint."""
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
from PIL import Image, UnidentifiedImageError

from .data import TransformConfig, build_transform
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
