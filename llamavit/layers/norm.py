"""Normalisation layers."""
import torch
import torch.nn as nn


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale, computed in float32 (as LLaMA and iLLaMA do).

    x: (..., dim) -> (..., dim). The statistics are taken in float32 so that bf16 activations do not lose
    precision in the mean of squares; the result is cast back to x's dtype and then scaled by the weight
    (so the output has x's dtype when the weight has it too, as with autocast or a bf16 model).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        # x * rsqrt(mean(x^2) + eps) through one reduction kernel: F.rms_norm is not fused on CPU and
        # takes 2.5x longer at ViT shapes
        mean_sq = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square() / x.shape[-1]
        normed = (xf * torch.rsqrt(mean_sq + self.eps)).type_as(x)
        if normed.dtype == self.weight.dtype and not (torch.is_grad_enabled() and self.weight.requires_grad):
            return normed.mul_(self.weight)   # inference: scale the fresh buffer instead of allocating another
        return normed * self.weight

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
