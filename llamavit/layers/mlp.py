"""Feed-forward layers: the SwiGLU used by LLaMA-style blocks.

We use timm's `SwiGLU` (fc1_g = gate through SiLU, fc1_x = up, fc2 = down), add the LLaMA rule that
picks the hidden width, let inference reuse the gate's buffer, and let training keep two hidden-width tensors
for backward instead of four (the SiLU and the product that enters fc2 are recomputed in backward).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import SwiGLU as TimmSwiGLU

__all__ = ["SwiGLU", "silu_mul", "swiglu_hidden_dim"]


class _SiluMul(torch.autograd.Function):
    """silu(gate) * up, saving gate and up only: backward recomputes silu(gate)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)


class _SiluMulLinear(torch.autograd.Function):
    """linear(silu(gate) * up, weight, bias), saving gate and up only: backward recomputes the product, the
    down projection's input, instead of keeping a third hidden-width tensor."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias):
        out = F.linear(F.silu(gate) * up, weight, bias)   # autocast, when on, picks the matmul's dtype
        ctx.compute_dtype = out.dtype
        ctx.save_for_backward(gate, up, weight)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        gate, up, weight = ctx.saved_tensors
        dtype = ctx.compute_dtype
        silu = F.silu(gate)
        grad = grad.to(dtype).flatten(0, -2)
        hidden = (silu * up).to(dtype)
        grad_weight = (grad.t() @ hidden.flatten(0, -2)).to(weight.dtype)
        grad_bias = grad.sum(0).to(weight.dtype) if ctx.has_bias else None
        grad_hidden = (grad @ weight.to(dtype)).to(gate.dtype).view_as(gate)
        grad_gate = torch.ops.aten.silu_backward(grad_hidden * up, gate)
        return grad_gate, grad_hidden.mul_(silu), grad_weight, grad_bias


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for tensors of one shape; with autograd it saves gate and up, not silu(gate) too."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SiluMul.apply(gate, up)
    return F.silu(gate) * up


class SwiGLU(TimmSwiGLU):
    """timm's SwiGLU, (B, N, in) -> (B, N, out). Without autograd the SiLU and the product run in place
    on the gate's output: two hidden-width buffers fewer per call (a batch of 32 iLLaMA-T tokens at 224:
    26 MB per block), which keeps eval off the allocator's slow paths."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc1_g(x), self.fc1_x(x)
        if not isinstance(self.act, nn.SiLU):
            hidden = self.act(gate) * up
        elif torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
            if self._fusable():   # the LLaMA MLP: fc2 takes the product
                return self.drop2(_SiluMulLinear.apply(gate, up, self.fc2.weight, self.fc2.bias))
            hidden = silu_mul(gate, up)
        else:
            hidden = F.silu(gate, inplace=True).mul_(up)
        return self.drop2(self.fc2(self.norm(self.drop1(hidden))))

    def _fusable(self) -> bool:
        """fc2 can run inside _SiluMulLinear: no inner norm or dropout, and fc2 a plain Linear (a LoRA- or
        quantisation-wrapped fc2 must run through its own forward, or its adapter would be bypassed)."""
        return isinstance(self.norm, nn.Identity) and self.drop1.p == 0 and type(self.fc2) is nn.Linear


def swiglu_hidden_dim(dim: int, mlp_ratio: float = 4.0, multiple_of: int = 256) -> int:
    """LLaMA's SwiGLU width: two thirds of `dim * mlp_ratio`, rounded up to `multiple_of`.

    iLLaMA: int(2 * int(dim * mlp_ratio) / 3) rounded up to 256 -> tiny 512, small 1024, base 2048,
    large 2816. `multiple_of=1` keeps the exact two-thirds width.
    """
    hidden = int(2 * int(dim * mlp_ratio) / 3)
    return multiple_of * math.ceil(hidden / multiple_of)
