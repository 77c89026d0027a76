"""Classification metrics."""
from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import accuracy


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: str = "cpu") -> Dict[str, float]:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy of `model` over `loader`'s (images, labels)."""
    was_training = model.training
    model.eval()
    n, loss_sum, top1_sum, top5_sum = 0, 0.0, 0.0, 0.0
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        logits = model(images)
        k = min(5, logits.shape[-1])
        top1, topk = accuracy(logits, targets, topk=(1, k))
        b = targets.shape[0]
        n += b
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        top1_sum += top1.item() * b
        top5_sum += topk.item() * b
    model.train(was_training)
    if n == 0:
        raise ValueError("evaluation set is empty")
    return {"top1": top1_sum / n, "top5": top5_sum / n, "loss": loss_sum / n}
