"""ViT + frozen LLM block (Pang et al., "Frozen Transformers in Language Models Are Effective Visual
Encoder Layers"; ziqipang/LM4VisualEncoding image_classification/models/vit_llama.py).

DeiT ViT (timm's VisionTransformer: class token first, learned pos_embed, LayerNorm eps 1e-6) ->
llama_dim_mapper1 Linear(D -> Dllm) -> frozen LLaMA decoder layer(s) (no mask, no RoPE) -> llama.norm
(an extra frozen RMSNorm, ones, never read from the LLM) -> llama_dim_mapper2 Linear(Dllm -> D) ->
the ViT's final norm -> class token, or global_pool='avg' (mean of patch tokens through fc_norm) ->
head. There is no residual around the LLM path.

Where the frozen block comes from (`llm_path`: a file, 'random' or None) and how our checkpoints reference it:
frozen_llm.py.
"""
from dataclasses import dataclass
from functools import partial
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from ..layers import Attention, Block
from .common import TokenTrunk
from .frozen_llm import FrozenLLMOptions, FrozenLLMPath, adapt_llm_state


@dataclass
class ViTLLMConfig(FrozenLLMOptions):
    """The ViT's hyper-parameters (timm names); where its frozen LLM block comes from (FrozenLLMOptions)."""
    img_size: Union[int, Tuple[int, int]] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    class_token: bool = True
    global_pool: str = "token"        # 'token' | 'avg' (mean of patch tokens, then fc_norm)
    norm_eps: float = 1e-6
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0


def vit_block(dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, proj_bias: bool,
              init_values: Optional[float], proj_drop: float, attn_drop: float, drop_path: float,
              norm_layer, act_layer, mlp_layer, qk_norm: bool = False, scale_attn_norm: bool = False,
              scale_mlp_norm: bool = False, **_placement) -> Block:
    """timm VisionTransformer's `block_fn`: our Block with a DeiT block's parts and timm's key names
    (norm1, attn.qkv, attn.proj, ls1, norm2, mlp.fc1, mlp.fc2, ls2). Placement (device, dtype, depth) is
    set by the caller's device context."""
    if qk_norm or scale_attn_norm or scale_mlp_norm:
        raise ValueError("the ViT of a frozen-LLM model has no q/k or scale norms")
    attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, attn_drop=attn_drop, proj_drop=proj_drop)
    mlp = mlp_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, bias=proj_bias,
                    drop=proj_drop)
    return Block(dim, attn, mlp, norm_layer=norm_layer, init_values=init_values, drop_path=drop_path)


class ViTLLM(FrozenLLMPath, TokenTrunk, VisionTransformer):
    """ViT with a frozen LLM block between its last block and its final norm.
    forward: (B, C, H, W) -> (B, num_classes); forward_features -> final-norm tokens (B, 1 + P, D)."""

    def __init__(self, cfg: Optional[ViTLLMConfig] = None, **kwargs):
        cfg = cfg or ViTLLMConfig(**kwargs)
        if cfg.global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {cfg.global_pool!r}")
        super().__init__(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                         num_classes=cfg.num_classes, global_pool=cfg.global_pool, embed_dim=cfg.embed_dim,
                         depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
                         class_token=cfg.class_token, drop_rate=cfg.drop_rate, attn_drop_rate=cfg.attn_drop_rate,
                         drop_path_rate=cfg.drop_path_rate, dynamic_img_size=True,
                         norm_layer=partial(nn.LayerNorm, eps=cfg.norm_eps), block_fn=vit_block)
        self.cfg = cfg
        self.init_frozen_llm(cfg.embed_dim, cfg)

    # --- forward (TokenTrunk) ------------------------------------------------------------------
    def embed(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None):
        """Images (B, C, H, W) -> (tokens (B, 1 + P, D) with positions, block arguments, patch grid)."""
        grid = self.patch_grid(x)
        tokens = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        return tokens, {"attn_mask": attn_mask}, grid

    def finish(self, outputs: Dict[int, torch.Tensor], attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The last ViT block's tokens through the frozen LLM path and the ViT's final norm (the same mask)."""
        return self.norm(self.forward_llm(outputs[max(outputs)], attn_mask))

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, attn_mask))

    def checkpoint_filter(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Official ViT-LLaMA / our checkpoints -> our state dict: 'module.' stripped, pos_embed resampled to
        the model's grid, frozen-LLM entries checked against the model's LLM (see adapt_llm_state)."""
        out = {}
        for k, v in state_dict.items():
            k = k.removeprefix("module.")
            if k == "pos_embed" and v.shape != self.pos_embed.shape:
                prefix = self.num_prefix_tokens
                side = int(round((v.shape[1] - prefix) ** 0.5))
                if side * side == v.shape[1] - prefix:
                    v = resample_abs_pos_embed(v, list(self.patch_embed.grid_size), [side, side],
                                               num_prefix_tokens=prefix)
            out[k] = v
        return adapt_llm_state(self.llama, out, "llama.")
