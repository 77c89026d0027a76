"""Normalisation layers."""
import torch
import torch.nn as nn


def _rms_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x^2) + eps) over the last dim, in float32 at least: (..., 1)."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    # one reduction kernel: F.rms_norm is not fused on CPU and takes 2.5x longer at ViT shapes
    mean_sq = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square() / x.shape[-1]
    return torch.rsqrt(mean_sq + eps)


class _RMSNorm(torch.autograd.Function):
    """RMSNorm saving x and its (..., 1) scale: the normalised x is recomputed in backward, not kept."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        scale = _rms_scale(x, eps)
        ctx.save_for_backward(x, weight, scale)
        return (x * scale).type_as(x) * weight

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight, scale = ctx.saved_tensors
        normed = x * scale                      # float32 at least, as scale
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed).flatten(0, -2).sum(0).to(weight.dtype)
        grad_normed = grad * weight.to(normed.dtype)
        # d/dx of x * s(x), s = rsqrt(mean(x^2) + eps): s * (g - x_hat * mean(g * x_hat))
        dot = (grad_normed * normed).mean(dim=-1, keepdim=True)
        grad_x = torch.addcmul(grad_normed, normed, dot, value=-1).mul_(scale)
        return grad_x.to(x.dtype), grad_weight, None


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
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return _RMSNorm.apply(x, self.weight, self.eps)
        normed = (x * _rms_scale(x, self.eps)).type_as(x)
        if normed.dtype == self.weight.dtype:
            return normed.mul_(self.weight)   # inference: scale the fresh buffer instead of allocating another
        return normed * self.weight

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
