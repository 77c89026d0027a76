"""VisionLLaMA, plain form (Chu et al., "VisionLLaMA: A Unified LLaMA Backbone for Vision Tasks").

Conv patch embed -> class token FIRST (optional) -> blocks (LayerNorm, attention with 2D RoPE on q/k,
layer scale, LayerNorm, bias-free SwiGLU, layer scale) -> final LayerNorm -> class token -> head.
There is no absolute position embedding: position enters only through the 2D RoPE, so any input size
runs without touching the weights. With `rope_auto_scale` (AS2DRoPE) positions are multiplied by
rope_ref_img_size / H_pixels, mapping every resolution onto the positions of the anchor resolution.
Matches Meituan-AutoML/VisionLLaMA deit/my_models.py (VisionLLaMA + LAMABlock) numerically.
"""
from dataclasses import dataclass
from functools import partial
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from ..layers import Attention, Block, PatchEmbed, Rope2D, SwiGLU, run_blocks, swiglu_hidden_dim
from .common import ClassifierContract, TokenTrunk, init_linear

RopeTables = Tuple[torch.Tensor, torch.Tensor]


@dataclass
class VisionLLaMAConfig:
    """Plain VisionLLaMA hyper-parameters (timm names); the official sizes are registered by name."""
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


def convert_official(state_dict: dict) -> dict:
    """Official VisionLLaMA (plain or pyramid) state dict -> ours; already-converted keys pass through unchanged."""
    return {visionllama_checkpoint_keys(k): v for k, v in state_dict.items() if k != "freqs_cis"}


def build_block(dim: int, attn: nn.Module, mlp_hidden: int, mlp_bias: bool = False, norm_eps: float = 1e-6,
                init_values: Optional[float] = 1e-4, proj_drop: float = 0.0, drop_path: float = 0.0) -> Block:
    """A VisionLLaMA block around `attn`: LayerNorm, layer scale, bias-free SwiGLU (the pyramid shares it)."""
    mlp = SwiGLU(dim, mlp_hidden, bias=mlp_bias, drop=proj_drop)
    return Block(dim, attn, mlp, norm_layer=partial(nn.LayerNorm, eps=norm_eps), init_values=init_values,
                 drop_path=drop_path)


class VisionLLaMA(TokenTrunk, ClassifierContract, nn.Module):
    """Plain VisionLLaMA classifier. forward: (B, C, H, W) -> (B, num_classes), any H, W multiple of the patch.

    forward_features: tokens (B, N, D), class token first: after the final norm with a class token, the
    last block's output without (the norm then acts on the pooled vector, as the official head).
    """

    def __init__(self, cfg: Optional[VisionLLaMAConfig] = None, **kwargs):
        super().__init__()
        cfg = cfg or VisionLLaMAConfig(**kwargs)
        _check_pool(cfg.global_pool, cfg.class_token)
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.global_pool = cfg.global_pool
        self.num_features = self.embed_dim = cfg.embed_dim
        self.in_chans = cfg.in_chans
        self.num_prefix_tokens = 1 if cfg.class_token else 0
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim)) if cfg.class_token else None
        self.rope = Rope2D(cfg.embed_dim // cfg.num_heads, cfg.rope_theta)
        hidden = swiglu_hidden_dim(cfg.embed_dim, cfg.mlp_ratio, cfg.mlp_multiple_of)
        dpr = [cfg.drop_path_rate * (i / max(cfg.depth - 1, 1) if cfg.drop_path_decay else 1.0)
               for i in range(cfg.depth)]
        self.blocks = nn.ModuleList([
            build_block(cfg.embed_dim, Attention(cfg.embed_dim, cfg.num_heads, qkv_bias=cfg.qkv_bias, proj_bias=True,
                                                 proj_drop=cfg.drop_rate),
                        hidden, cfg.mlp_bias, cfg.norm_eps, cfg.init_values, cfg.drop_rate, dpr[i])
            for i in range(cfg.depth)])
        # final norm over all tokens with a class token; over the pooled vector (timm's fc_norm) without
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.feature_info = self.feature_info_of(self.blocks, cfg.patch_size)

        if self.cls_token is not None:
            trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_linear)

    # --- timm contract (the rest in ClassifierContract) -----------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"cls_token"}

    def check_global_pool(self, global_pool: str) -> None:
        _check_pool(global_pool, self.cls_token is not None)

    def checkpoint_filter(self, state_dict: dict) -> dict:
        return convert_official(state_dict)

    # --- forward -------------------------------------------------------------------------------
    def rope_tables(self, img_hw: Tuple[int, int]) -> RopeTables:
        """(cos, sin) (N, head_dim // 2) for an input of img_hw pixels, class token row first."""
        gh, gw = img_hw[0] // self.patch_embed.patch_size[0], img_hw[1] // self.patch_embed.patch_size[1]
        scale = self.cfg.rope_ref_img_size / img_hw[0] if self.cfg.rope_auto_scale else 1.0
        return self.rope(gh * gw, gw, scale, class_token=self.cls_token is not None)

    def embed(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
              keep: Optional[torch.Tensor] = None):
        """Images (B, C, H, W) -> (tokens (B, N, D), block arguments, patch grid).

        keep: (B, K) indices of the patches to keep (MAE's encoder sees only those): the tokens are the
        class token (if any) and the kept patches, each rotated by its TRUE grid position.
        """
        grid = self.patch_grid(x)
        rope = self.rope_tables(x.shape[-2:])   # rows: [class token,] patches in raster order
        tokens = self.patch_embed(x)
        if keep is not None:
            tokens = torch.gather(tokens, 1, keep[..., None].expand(-1, -1, tokens.shape[-1]))
            rows = keep + self.num_prefix_tokens
            if self.cls_token is not None:
                rows = torch.cat((torch.zeros_like(rows[:, :1]), rows), dim=1)
            rope = tuple(t[rows][:, None] for t in rope)   # per-sample tables (B, 1, K', d) broadcast over heads
        if self.cls_token is not None:
            tokens = torch.cat((self.cls_token.expand(tokens.shape[0], -1, -1), tokens), dim=1)
        return tokens, {"rope": rope, "attn_mask": attn_mask}, grid

    def finish(self, outputs: Dict[int, torch.Tensor], attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        last = outputs[max(outputs)]
        return self.norm(last) if self.cls_token is not None else last

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                         keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, C, H, W) -> tokens (B, N, D), see the class docstring.

        keep: (B, K) indices of the patches the trunk sees (MAE's encoder): then (B, [1 +] K, D) tokens,
        final-normed with or without a class token, as mmpretrain's MAE backbone returns them.
        """
        if keep is None:
            return super().forward_features(x, attn_mask)
        tokens, args, _ = self.embed(x, attn_mask, keep)
        checkpointing = self.grad_checkpointing and self.training
        return self.norm(run_blocks(self.blocks, tokens, checkpointing, **args))

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

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take = super().prune_intermediate_layers(indices, prune_norm, prune_head=False)
        if prune_head:
            self.reset_classifier(0, "avg" if self.cls_token is not None else None)
        return take


def _check_pool(global_pool: str, class_token: bool) -> None:
    if global_pool not in ("token", "avg"):
        raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
    if global_pool == "token" and not class_token:
        raise ValueError("global_pool='token' needs class_token=True; use global_pool='avg' without a class token")
