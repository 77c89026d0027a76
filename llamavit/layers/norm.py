"""Normalisation layers."""
import torch
import torch.nn as nn
import torch.nn.functional as F


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
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)
        return normed * self.weight

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
