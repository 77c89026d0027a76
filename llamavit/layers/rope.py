"""Rotary position embedding (RoPE).

The tables are cos/sin of `position * frequency` for every (position, channel pair). Two layouts of
the channel pairs are common and both are supported:
- 'interleaved': pairs (2i, 2i+1), as Meta's LLaMA, iLLaMA and VisionLLaMA (complex-number form);
- 'half': pairs (i, i + d/2), as Hugging Face and GPT-NeoX ("rotate half").
The two differ only by a fixed permutation of the q/k channels, which is what llama.cpp and HF
converters apply to q/k weight rows.
"""
from typing import Tuple

import torch
import torch.nn as nn

ROPE_LAYOUTS = ("interleaved", "half")


def rope_inverse_frequencies(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """(head_dim // 2,) float32 frequencies theta^(-2i / head_dim)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dim, got {head_dim}")
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str = "interleaved") -> torch.Tensor:
    """Rotate channel pairs of x.

    x: (B, heads, N, head_dim); cos, sin: (N, head_dim // 2) float32. Returns x's shape and dtype;
    the rotation itself runs in float32 at least, as the reference implementations do.
    """
    dtype = x.dtype
    x = x.float() if dtype in (torch.float16, torch.bfloat16) else x
    if layout == "interleaved":
        # pairs as complex numbers times e^{i angle}: one fused kernel, ~10x faster than four real products
        # q and k are strided views into the qkv projection: the complex view needs no copy for even head_dim
        out = torch.view_as_real(_complex_pairs(x) * torch.complex(cos, sin)).flatten(-2)
    elif layout == "half":
        x1, x2 = x.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    else:
        raise ValueError(f"unknown RoPE layout {layout!r}; expected one of {ROPE_LAYOUTS}")
    return out.to(dtype)


def _complex_pairs(x: torch.Tensor) -> torch.Tensor:
    """(..., d) float -> (..., d // 2) complex view of its interleaved channel pairs (a copy only when the strides
    do not allow a view)."""
    pairs = x.unflatten(-1, (-1, 2))
    if pairs.stride(-1) != 1 or pairs.storage_offset() % 2 or any(st % 2 for st in pairs.stride()[:-1]):
        pairs = pairs.contiguous()
    return torch.view_as_complex(pairs)


def _rotate_into(dst: torch.Tensor, src: torch.Tensor, rotation: torch.Tensor) -> None:
    """dst (..., d) = src (..., d) with its interleaved pairs times `rotation` (..., d // 2), in one pass when dst
    is float32 / float64 (written through a complex view), else through a float32 temporary."""
    product_dtype = torch.promote_types(torch.promote_types(src.dtype, torch.float32), rotation.real.dtype)
    source = _complex_pairs(src.to(product_dtype))
    if dst.dtype == product_dtype:
        torch.mul(source, rotation, out=torch.view_as_complex(dst.unflatten(-1, (-1, 2))))
    else:
        dst.copy_(torch.view_as_real(source * rotation).flatten(-2))


class _RotateQKV(torch.autograd.Function):
    """The qkv projection's output (B, N, (H + 2 Hkv) d) -> rotated q (B, H, N, d), rotated k and v (B, Hkv, N, d),
    each contiguous.

    Autograd through split + RoPE would assemble the input gradient in two copies (a concatenation of the three
    head groups, then a reshape out of the transposed layout); the backward here writes the un-rotated q and k
    gradients and v's straight into one (B, N, H + 2 Hkv, d) buffer."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, num_heads, num_kv_heads, head_dim):
        b, n, _ = qkv.shape
        heads = qkv.view(b, n, -1, head_dim).transpose(1, 2)           # (B, H + 2 Hkv, N, d), a view
        rotation = torch.complex(cos, sin)
        q = torch.empty(b, num_heads, n, head_dim, dtype=qkv.dtype, device=qkv.device)
        k = torch.empty(b, num_kv_heads, n, head_dim, dtype=qkv.dtype, device=qkv.device)
        _rotate_into(q, heads[:, :num_heads], rotation)
        _rotate_into(k, heads[:, num_heads:num_heads + num_kv_heads], rotation)
        ctx.save_for_backward(rotation)   # not the tables: cached ones may be inference tensors, which cannot be saved
        ctx.shape = (num_heads, num_kv_heads, head_dim)
        # v too gets a buffer of its own: batched matmuls need it contiguous, and what attention saves for backward
        # then no longer holds the whole projection output alive
        return q, k, heads[:, num_heads + num_kv_heads:].contiguous()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_q, grad_k, grad_v):
        rotation, = ctx.saved_tensors
        num_heads, num_kv_heads, head_dim = ctx.shape
        like = next(g for g in (grad_q, grad_k, grad_v) if g is not None)
        b, n = like.shape[0], like.shape[2]
        grad_qkv = torch.empty(b, n, num_heads + 2 * num_kv_heads, head_dim, dtype=like.dtype, device=like.device)
        heads = grad_qkv.transpose(1, 2)
        unrotation = rotation.conj()
        groups = ((grad_q, 0, num_heads), (grad_k, num_heads, num_kv_heads),
                  (grad_v, num_heads + num_kv_heads, num_kv_heads))
        for index, (grad, start, count) in enumerate(groups):
            dst = heads[:, start:start + count]
            if grad is None:
                dst.zero_()
            elif index < 2:
                _rotate_into(dst, grad, unrotation)
            else:
                dst.copy_(grad)
        return grad_qkv.flatten(2), None, None, None, None, None


def rotate_qkv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, cos: torch.Tensor,
               sin: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a qkv projection's output (B, N, (H + 2 Hkv) * d) into heads and apply interleaved RoPE (tables
    (N, d // 2)) to q and k: -> q (B, H, N, d), k and v (B, Hkv, N, d), each contiguous; the same numbers as
    `apply_rope` on the split heads."""
    return _RotateQKV.apply(qkv, cos, sin, num_heads, num_kv_heads, head_dim)


class RotaryEmbedding(nn.Module):
    """1D RoPE tables for token indices 0..N-1.

    `forward(num_tokens)` -> (cos, sin), each (num_tokens, head_dim // 2) float32. The tables for the
    construction-time length are non-persistent buffers (they follow `.to(device)` and are never
    saved in checkpoints); any other length is computed on the fly, so any input resolution works.
    """

    def __init__(self, head_dim: int, num_tokens: int, theta: float = 10000.0, layout: str = "interleaved"):
        super().__init__()
        if layout not in ROPE_LAYOUTS:
            raise ValueError(f"unknown RoPE layout {layout!r}; expected one of {ROPE_LAYOUTS}")
        self.head_dim = head_dim
        self.theta = theta
        self.layout = layout
        self.register_buffer("inv_freq", rope_inverse_frequencies(head_dim, theta), persistent=False)
        cos, sin = self._tables(num_tokens, self.inv_freq)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @staticmethod
    def _tables(num_tokens: int, inv_freq: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(num_tokens, device=inv_freq.device, dtype=torch.float32)
        angles = torch.outer(positions, inv_freq)
        return angles.cos(), angles.sin()

    def forward(self, num_tokens: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if num_tokens == self.cos.shape[0]:
            return self.cos, self.sin
        return self._tables(num_tokens, self.inv_freq)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}, layout={self.layout}"


# --- 2D RoPE over a grid of patches (VisionLLaMA) ------------------------------------------------------------------

def grid_positions(num_tokens: int, row_width: int, step: float = 1.0, offset: float = 0.0,
                   class_token: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x, y) float32 positions of tokens laid out row by row, `row_width` per row.

    Token p (0..num_tokens-1) sits at x = offset + step * (p mod row_width), y = offset + step * (p div
    row_width). With `class_token`, one more token with p = -1 comes first, i.e. (row_width - 1, -1)
    for step 1: the position VisionLLaMA gives its class token.
    """
    p = torch.arange(-1 if class_token else 0, num_tokens)
    x = offset + step * torch.remainder(p, row_width).float()
    y = offset + step * torch.div(p, row_width, rounding_mode="floor").float()
    return x, y


def rope_2d_angles(x: torch.Tensor, y: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles (N, head_dim // 2) of 2D RoPE for positions x, y (N,).

    Complex channel pair 2k turns by x * w_k and pair 2k + 1 by y * w_k, w_k = theta^(-4k / head_dim),
    k < head_dim / 4: the x and y frequencies alternate along the head dim (interleaved layout).
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 4, dtype=torch.float32) / head_dim))
    return torch.stack((torch.outer(x, freqs), torch.outer(y, freqs)), dim=-1).flatten(1)


class Rope2D(nn.Module):
    """2D RoPE tables (cos, sin), each (N, head_dim // 2) float32, cached per layout of positions.

    `forward(num_tokens, row_width, scale, step, offset, class_token)` returns the tables of
    `grid_positions(...) * scale`. AS2DRoPE is the `scale` argument: the caller passes
    anchor / current size, so positions at any resolution are mapped onto the anchor's range.
    Tables are computed once per (arguments, device) and kept in memory, never in checkpoints.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, max_cached: int = 32):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2D RoPE needs a head dim divisible by 4, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta
        self.max_cached = max_cached
        self._cache: dict = {}
        # a non-persistent buffer only to know the module's device after .to()
        self.register_buffer("_device_probe", torch.zeros(0), persistent=False)

    def forward(self, num_tokens: int, row_width: int, scale: float = 1.0, step: float = 1.0, offset: float = 0.0,
                class_token: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        device = self._device_probe.device
        key = (num_tokens, row_width, float(scale), float(step), float(offset), class_token, device)
        tables = self._cache.get(key)
        if tables is None:
            x, y = grid_positions(num_tokens, row_width, step, offset, class_token)
            angles = rope_2d_angles(x * scale, y * scale, self.head_dim, self.theta).to(device)
            tables = (angles.cos(), angles.sin())
            if len(self._cache) >= self.max_cached:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = tables
        return tables

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.theta}"
