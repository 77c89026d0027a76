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
    the rotation itself runs in float32, as the reference implementations do.
    """
    dtype = x.dtype
    x = x.float()
    if layout == "interleaved":
        # pairs as complex numbers times e^{i angle}: one fused kernel, ~10x faster than four real products
        rotation = torch.complex(cos, sin)
        pairs = x.unflatten(-1, (-1, 2))
        # q and k are strided views into the qkv projection: the complex view needs no copy when every
        # stride but the last (1) and the offset are even, as they are for even head_dim
        if pairs.stride(-1) != 1 or pairs.storage_offset() % 2 or any(st % 2 for st in pairs.stride()[:-1]):
            pairs = pairs.contiguous()
        out = torch.view_as_real(torch.view_as_complex(pairs) * rotation).flatten(-2)
    elif layout == "half":
        x1, x2 = x.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    else:
        raise ValueError(f"unknown RoPE layout {layout!r}; expected one of {ROPE_LAYOUTS}")
    return out.to(dtype)


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
