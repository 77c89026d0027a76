"""Accuracy at input resolutions other than the training one, without retraining."""
import dataclasses
from typing import Dict, List, Sequence

import torch.nn as nn
from torch.utils.data import DataLoader, Subset

from ..data import TransformConfig, build_dataset, build_transform
from .metrics import evaluate


def accuracy_by_resolution(model: nn.Module, data: str, sizes: Sequence[int], transform: TransformConfig,
                           batch_size: int = 256, subset: int = 0, device: str = "cpu") -> List[Dict]:
    """Evaluate `model` on the 'val' split of `data` resized to each size in `sizes`.

    transform: the model's evaluation transform (normalisation, crop_pct, channels); only its
    img_size changes. Returns one {'img_size', 'top1', 'top5', 'loss'} per size, or
    {'img_size', 'error'} where the model refuses that size (the error message, e.g. not a multiple
    of the patch size).
    """
    results = []
    for size in sizes:
        tf = build_transform(dataclasses.replace(transform, img_size=size), is_training=False)
        dataset = build_dataset(data, "val", tf, img_size=size, in_chans=transform.in_chans)
        if subset:
            dataset = Subset(dataset, range(min(subset, len(dataset))))
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        try:
            results.append({"img_size": size, **evaluate(model, loader, device)})
        except ValueError as e:
            results.append({"img_size": size, "error": str(e)})
    return results
