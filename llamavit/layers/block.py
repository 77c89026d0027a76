"""ONE pre-norm transformer block, built from injected parts, and the helper that runs a stack of them.

    x = x + drop_path(ls1(attn(norm1(x), **attn_args)))
    x = x + drop_path(ls2(mlp(norm2(x))))

The parts decide the family (as dinov2's `attn_class` / `ffn_layer` and apple/ml-aim's `attn_target` /
`ffn_target` do): iLLaMA = RMSNorm + RoPE attention with the soft mask + SwiGLU; VisionLLaMA = LayerNorm +
2D-RoPE attention + SwiGLU + layer scale; the pyramid injects window or sub-sampled attention; AIM and
DeiT = LayerNorm + attention + GELU MLP. `attn_args` (RoPE tables, an attention mask, a grid) pass through
to the attention untouched. `attn=None` gives an MLP-only block; `nn.Identity()` as attention gives
`x + norm1(x)`, the official AIM decoder's block (its attention is an identity).
"""
from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.nn as nn
from timm.layers import DropPath, LayerScale
from torch.utils.checkpoint import checkpoint


class Block(nn.Module):
    """Pre-norm residual block around an injected attention and MLP. x: (B, N, dim) -> (B, N, dim).

    norm_layer: called with `dim` for each of the two norms; init_values: layer-scale init (None = no
    layer scale); drop_path: stochastic depth rate of both branches.
    """

    def __init__(self, dim: int, attn: Optional[nn.Module], mlp: nn.Module,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm, init_values: Optional[float] = None,
                 drop_path: float = 0.0):
        super().__init__()
        self.norm1 = norm_layer(dim) if attn is not None else None
        self.attn = attn
        self.ls1 = LayerScale(dim, init_values) if init_values and attn is not None else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = mlp
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, **attn_args) -> torch.Tensor:
        if self.attn is not None:
            x = x + self.drop_path(self.ls1(self.attn(self.norm1(x), **attn_args)))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


def iter_blocks(blocks: Iterable[nn.Module], x: torch.Tensor, checkpointing: bool = False,
                **attn_args) -> Iterator[torch.Tensor]:
    """Run x (B, N, D) through `blocks` in order, yielding every block's output.

    checkpointing: recompute each block's activations in the backward pass instead of keeping them
    (activation checkpointing; the caller passes it only in training). attn_args go to every block.
    """
    for blk in blocks:
        x = run_block(blk, x, checkpointing, **attn_args)
        yield x


def run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor, checkpointing: bool = False,
               **attn_args) -> torch.Tensor:
    """The last output of `iter_blocks` (x itself for no blocks). (B, N, D) -> (B, N, D)."""
    for blk in blocks:
        x = run_block(blk, x, checkpointing, **attn_args)
    return x


def run_block(blk: nn.Module, x: torch.Tensor, checkpointing: bool, **attn_args) -> torch.Tensor:
    """One block on x (B, N, D), through activation checkpointing when asked."""
    return checkpoint(blk, x, use_reentrant=False, **attn_args) if checkpointing else blk(x, **attn_args)
