"""VisionLLaMA, plain form (Chu et al., "VisionLLaMA: A Unified LLaMA Backbone for Vision Tasks").

Conv patch embed -> class token FIRST (optional) -> blocks (LayerNorm, attention with 2D RoPE on q/k,
layer scale, LayerNorm, bias-free SwiGLU, layer scale) -> final LayerNorm -> class token -> head.
There is no absolute position embedding: position enters only through the 2D RoPE, so any input size
runs without touching the weights. With `rope_auto_scale` (AS2DRoPE) positions are multiplied by
rope_ref_img_size / H_pixels, mapping every resolution onto the positions of the anchor resolution.
Matches Meituan-AutoML/VisionLLaMA deit/my_models.py (VisionLLaMA + LAMABlock) numerically.
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import DropPath, LayerScale, trunc_normal_
from torch.utils.checkpoint import checkpoint

from ..layers import Attention, PatchEmbed, Rope2D, SwiGLU, swiglu_hidden_dim
from .common import ClassifierContract, init_linear

RopeTables = Tuple[torch.Tensor, torch.Tensor]


@dataclass
class VisionLLaMAConfig:
    img_size: Union[int, Tuple[int, int]] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0          # SwiGLU width = 2/3 * mlp_ratio * D rounded up to mlp_multiple_of
    mlp_multiple_of: int = 256
    mlp_bias: bool = False
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    init_values: Optional[float] = 1e-4   # layer scale init; None = no layer scale
    class_token: bool = True
    global_pool: str = "token"      # 'token' | 'avg' (mean of patch tokens; through the final norm without class token)
    rope_theta: float = 10000.0
    rope_auto_scale: bool = False   # AS2DRoPE: positions * rope_ref_img_size / input height in pixels
    rope_ref_img_size: int = 224
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    drop_path_decay: bool = False   # official plain models use the same drop path in every block


def visionllama_checkpoint_keys(key: str) -> str:
    """One official VisionLLaMA key -> ours (SwiGLU and layer-scale names as timm's)."""
    key = key.removeprefix("module.")
    return (key.replace("mlp.c_fc1.", "mlp.fc1_g.").replace("mlp.c_fc2.", "mlp.fc1_x.")
            .replace("mlp.c_proj.", "mlp.fc2.").replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma"))


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """Official VisionLLaMA state dict -> ours; already-converted keys pass through unchanged."""
    return {visionllama_checkpoint_keys(k): v for k, v in state_dict.items() if k != "freqs_cis"}


class Block(nn.Module):
    """VisionLLaMA block: x + ls1(attn(ln(x), rope)), x + ls2(swiglu(ln(x))). (B, N, D) -> (B, N, D)."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, qkv_bias: bool = True, mlp_bias: bool = False,
                 norm_eps: float = 1e-6, init_values: Optional[float] = 1e-4, proj_drop: float = 0.0,
                 drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=True, proj_drop=proj_drop)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = SwiGLU(dim, mlp_hidden, bias=mlp_bias, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, rope: RopeTables, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x), rope, attn_mask)))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


class VisionLLaMA(ClassifierContract, nn.Module):
    """Plain VisionLLaMA classifier. forward: (B, C, H, W) -> (B, num_classes), any H, W multiple of the patch."""

    def __init__(self, cfg: Optional[VisionLLaMAConfig] = None, **kwargs):
        super().__init__()
        cfg = cfg or VisionLLaMAConfig(**kwargs)
        _check_pool(cfg.global_pool, cfg.class_token)
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.global_pool = cfg.global_pool
        self.num_features = self.embed_dim = cfg.embed_dim
        self.num_prefix_tokens = 1 if cfg.class_token else 0
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim)) if cfg.class_token else None
        self.rope = Rope2D(cfg.embed_dim // cfg.num_heads, cfg.rope_theta)
        hidden = swiglu_hidden_dim(cfg.embed_dim, cfg.mlp_ratio, cfg.mlp_multiple_of)
        dpr = [cfg.drop_path_rate * (i / max(cfg.depth - 1, 1) if cfg.drop_path_decay else 1.0)
               for i in range(cfg.depth)]
        self.blocks = nn.ModuleList([
            Block(cfg.embed_dim, cfg.num_heads, hidden, cfg.qkv_bias, cfg.mlp_bias, cfg.norm_eps, cfg.init_values,
                  cfg.drop_rate, dpr[i]) for i in range(cfg.depth)])
        # final norm over all tokens with a class token; over the pooled vector (timm's fc_norm) without
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.feature_info = [{"num_chs": cfg.embed_dim, "reduction": cfg.patch_size, "module": f"blocks.{i}"}
                             for i in range(cfg.depth)]

        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_linear)

    # --- timm contract (the rest in ClassifierContract) -----------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"cls_token"}

    def check_global_pool(self, global_pool: str) -> None:
        _check_pool(global_pool, self.cls_token is not None)

    # --- forward -------------------------------------------------------------------------------
    def rope_tables(self, img_hw: Tuple[int, int]) -> RopeTables:
        """(cos, sin) (N, head_dim // 2) for an input of img_hw pixels, class token row first."""
        gh, gw = img_hw[0] // self.patch_embed.patch_size[0], img_hw[1] // self.patch_embed.patch_size[1]
        scale = self.cfg.rope_ref_img_size / img_hw[0] if self.cfg.rope_auto_scale else 1.0
        return self.rope(gh * gw, gw, scale, class_token=self.cls_token is not None)

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, C, H, W) -> tokens (B, N, D), class token first: after the final norm with a class token,
        the last block's output without (the norm then acts on the pooled vector, as the official head)."""
        rope = self.rope_tables(x.shape[-2:])
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x = checkpoint(blk, x, rope, attn_mask, use_reentrant=False)
            else:
                x = blk(x, rope, attn_mask)
        return self.norm(x) if self.cls_token is not None else x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, N, D) -> logits (B, num_classes), or the pooled (B, D) with pre_logits."""
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.cls_token is not None:
            x = x[:, 1:].mean(dim=1)
        else:
            x = self.norm(x.mean(dim=1))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, attn_mask))

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """timm's feature API: block outputs as (B, D, H/p, W/p) maps (class token dropped).

        indices: the last n blocks if an int, all if None, else the listed block indices.
        Returns the list, or (final tokens, list) unless intermediates_only.
        """
        from timm.models._features import feature_take_indices
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = feature_take_indices(len(self.blocks), indices)
        b, _, h, w = x.shape
        gh, gw = h // self.patch_embed.patch_size[0], w // self.patch_embed.patch_size[1]
        rope = self.rope_tables((h, w))
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)
        blocks = self.blocks[:max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, blk in enumerate(blocks):
            x = blk(x, rope)
            if i in take:
                y = self.norm(x) if norm else x
                y = y[:, self.num_prefix_tokens:]
                intermediates.append(y.transpose(1, 2).reshape(b, -1, gh, gw) if output_fmt == "NCHW" else y)
        if intermediates_only:
            return intermediates
        return (self.norm(x) if self.cls_token is not None else x), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        from timm.models._features import feature_take_indices
        take, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "avg" if self.cls_token is not None else None)
        return take


def _check_pool(global_pool: str, class_token: bool) -> None:
    if global_pool not in ("token", "avg"):
        raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
    if global_pool == "token" and not class_token:
        raise ValueError("global_pool='token' needs class_token=True; use global_pool='avg' without a class token")
