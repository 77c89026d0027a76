"""Building blocks shared by every llamavit model; no model knowledge here."""
from .attention import (MASK_MODES, Attention, attend, attention_weights, naive_soft_mask_attention, prefix_causal_mask,
                        rotate_qk, soft_mask_attention, soft_mask_bias)
from .block import Block, iter_blocks, run_blocks
from .grouped_attention import SubsampledAttention, WindowAttention
from .heads import AttentivePoolingHead, LinearProbeHead, MeanTokenHead
from .mlp import SwiGLU, swiglu_hidden_dim
from .norm import RMSNorm
from .patch_embed import PatchEmbed
from .rope import Rope2D, RotaryEmbedding, apply_rope, grid_positions, rope_2d_angles, rope_inverse_frequencies

__all__ = [
    "MASK_MODES", "Attention", "attend", "attention_weights", "rotate_qk", "naive_soft_mask_attention",
    "prefix_causal_mask", "soft_mask_attention", "soft_mask_bias", "Block", "iter_blocks", "run_blocks",
    "SubsampledAttention", "WindowAttention", "AttentivePoolingHead", "LinearProbeHead", "MeanTokenHead", "SwiGLU",
    "swiglu_hidden_dim", "RMSNorm", "PatchEmbed", "RotaryEmbedding", "apply_rope", "rope_inverse_frequencies",
    "Rope2D", "grid_positions", "rope_2d_angles",
]
