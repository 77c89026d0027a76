"""What the reconstruction objectives share: pixel targets (patches in raster order, each standardised on
its own) and the freezing of trunk parts an objective never reaches."""
from typing import Callable, List, Tuple

import torch
import torch.nn as nn

TARGET_EPS = 1e-6


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, p * p * C); patches in raster order, pixels ordered (py, px, c)."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: Tuple[int, int], channels: int) -> torch.Tensor:
    """Inverse of patchify: (B, gh * gw, p * p * C) -> (B, C, gh * p, gw * p)."""
    b, p = patches.shape[0], patch_size
    x = patches.reshape(b, grid[0], grid[1], p, p, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(b, channels, grid[0] * p, grid[1] * p)


def normalized_targets(patches: torch.Tensor, eps: float = TARGET_EPS) -> torch.Tensor:
    """Standardise every patch by its own mean and UNBIASED variance: (x - mean) / sqrt(var + eps)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)   # unbiased, as the official loss
    return (patches - mean) / (var + eps) ** 0.5


def unnormalize_like(preds: torch.Tensor, patches: torch.Tensor, eps: float = TARGET_EPS) -> torch.Tensor:
    """Predictions of normalised patches (B, M, K) back to pixels with the true patches' (B, M, K) own mean and
    std (as MAE's figures show them), float32."""
    mean, var = patches.float().mean(dim=-1, keepdim=True), patches.float().var(dim=-1, keepdim=True)
    return preds.float() * (var + eps).sqrt() + mean


def freeze_unreached(model: nn.Module, forward: Callable[[], torch.Tensor]) -> List[str]:
    """Run `forward()` (a small probe through `model`) with autograd and freeze the trainable parameters it
    does not reach (a classifier's head, AIM's attentive probe): the optimiser then leaves them out and DDP
    does not wait for their gradients. -> the names frozen."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    saved = [p.grad for _, p in trainable]
    for _, p in trainable:
        p.grad = None
    forward().float().sum().backward()
    frozen = [n for n, p in trainable if p.grad is None]
    for (_, p), grad in zip(trainable, saved):
        if p.grad is None:
            p.requires_grad_(False)
        p.grad = grad
    return frozen
