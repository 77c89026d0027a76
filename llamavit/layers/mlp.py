"""Feed-forward layers: the SwiGLU used by LLaMA-style blocks.

We use timm's `SwiGLU` (fc1_g = gate through SiLU, fc1_x = up, fc2 = down) and only add the LLaMA
rule that picks the hidden width.
"""
import math

from timm.layers import SwiGLU

__all__ = ["SwiGLU", "swiglu_hidden_dim"]


def swiglu_hidden_dim(dim: int, mlp_ratio: float = 4.0, multiple_of: int = 256) -> int:
    """LLaMA's SwiGLU width: two thirds of `dim * mlp_ratio`, rounded up to `multiple_of`.

    iLLaMA: int(2 * int(dim * mlp_ratio) / 3) rounded up to 256 -> tiny 512, small 1024, base 2048,
    large 2816. `multiple_of=1` keeps the exact two-thirds width.
    """
    hidden = int(2 * int(dim * mlp_ratio) / 3)
    return multiple_of * math.ceil(hidden / multiple_of)
