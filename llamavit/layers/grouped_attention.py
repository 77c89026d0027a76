"""The two attentions of Twins-SVT style pyramids, with 2D RoPE on queries and keys.

- WindowAttention (locally-grouped, LSA): self-attention inside non-overlapping ws x ws windows, i.e.
  `Attention` applied to each window as a sequence. The map is zero-padded to a multiple of ws (no
  mask: padded tokens take part, as in Twins).
- SubsampledAttention (global sub-sampled, GSA): every query attends to keys/values computed from
  the map sub-sampled by a strided conv (kernel = stride = sr) and a LayerNorm.
Both use the attention core of attention.py (RoPE on q/k, then SDPA); the RoPE tables come from the caller.
"""
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import Attention, RopeTables, attend, rotate_qk


class WindowAttention(Attention):
    """Multi-head attention within ws x ws windows. x: (B, H*W, C) raster order -> (B, H*W, C).

    rope: (cos, sin) tables (ws*ws, head_dim // 2) over window-local positions, shared by all windows.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, proj_bias=True, attn_drop=attn_drop, proj_drop=proj_drop)
        self.window_size = window_size

    def forward(self, x: torch.Tensor, grid: Tuple[int, int], rope: RopeTables = None) -> torch.Tensor:
        b, n, c = x.shape
        h, w = grid
        ws = self.window_size
        x = x.view(b, h, w, c)
        pad_b, pad_r = (-h) % ws, (-w) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        nh, nw = hp // ws, wp // ws
        windows = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        out = super().forward(windows, rope)
        out = out.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, hp, wp, c)
        return out[:, :h, :w].reshape(b, n, c)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, window_size={self.window_size}"


class SubsampledAttention(nn.Module):
    """Queries from every token, keys/values from the map sub-sampled by `sr_ratio`.

    x: (B, H*W, C) -> (B, H*W, C). rope: query tables (H*W, head_dim // 2); key_rope: tables
    (M, head_dim // 2) for the M = (H // sr) * (W // sr) sub-sampled tokens.
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, norm_eps: float = 1e-5):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.sr_ratio = sr_ratio
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=norm_eps)

    def reduced_grid(self, grid: Tuple[int, int]) -> Tuple[int, int]:
        """The token grid of the sub-sampled keys: (H // sr, W // sr)."""
        return grid[0] // self.sr_ratio, grid[1] // self.sr_ratio

    def forward(self, x: torch.Tensor, grid: Tuple[int, int], rope: RopeTables = None,
                key_rope: RopeTables = None) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        if self.sr_ratio > 1:
            x = self.norm(self.sr(x.transpose(1, 2).reshape(b, c, *grid)).flatten(2).transpose(1, 2))
        k, v = self.kv(x).view(b, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = rotate_qk(q, k, rope, key_rope)
        out = attend(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, sr_ratio={self.sr_ratio}"
