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
        ctx.x_dtype = x.dtype
        normed = (x * scale).type_as(x)
        return normed.mul_(weight) if normed.dtype == weight.dtype else normed * weight

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight, scale = ctx.saved_tensors
        wide = scale.dtype                      # float32 at least
        x, grad = x.to(wide), grad.to(wide)
        # LayerNorm's fused backward kernel with mean 0 and rstd = scale computes
        #   scale * (g w - mean(g w) - x_hat * mean(g w x_hat))   and   sum(g * x_hat);
        # RMSNorm's gradient is the same without the mean(g w) term, which is added back: one fused kernel and
        # two light passes where the unfused formula takes seven
        grad_x, grad_weight, _ = torch.ops.aten.native_layer_norm_backward(
            grad, x, [x.shape[-1]], torch.zeros_like(scale), scale, weight.to(wide), None,
            [True, ctx.needs_input_grad[1], False])
        mean_gw = torch.matmul(grad, weight.to(wide)).unsqueeze(-1).div_(x.shape[-1])
        grad_x = grad_x.add_(mean_gw.mul_(scale))
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_x.to(ctx.x_dtype), grad_weight, None


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
