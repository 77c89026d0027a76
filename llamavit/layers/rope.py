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
        out = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous()) * rotation).flatten(-2)
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
