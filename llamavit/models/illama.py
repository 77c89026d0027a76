"""iLLaMA: a decoder-only ViT (Wang et al., "Adapting LLaMA Decoder to Vision Transformer").

Conv patch embed -> patch tokens, class token appended LAST -> learned absolute pos_embed ->
blocks (RMSNorm, attention with 1D RoPE and the soft mask, RMSNorm, SwiGLU) -> final RMSNorm ->
last token -> Linear head. Matches techmonsterwang/iLLaMA models/illama.py numerically; unlike the
official code it accepts any input resolution (pos_embed interpolated, RoPE recomputed).
"""
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import DropPath, resample_abs_pos_embed, trunc_normal_
from torch.utils.checkpoint import checkpoint

from ..layers import Attention, PatchEmbed, RMSNorm, RotaryEmbedding, SwiGLU, swiglu_hidden_dim
from .common import ClassifierContract, SoftMaskRate, init_linear


@dataclass
class ILLaMAConfig:
    img_size: Union[int, Tuple[int, int]] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    mlp_multiple_of: int = 256   # SwiGLU width rounding of the official code
    qkv_bias: bool = True
    proj_bias: bool = True
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    mask_mode: str = "soft"       # 'soft' (official post-softmax mask) | 'causal' (renormalised) | 'bidirectional'
    soft_mask_rate: float = 0.0   # 0 = causal end state of training, 1 = bidirectional
    global_pool: str = "token"    # 'token' (the post-sequence class token) | 'avg' (mean of all tokens)
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0


class Block(nn.Module):
    """Pre-norm LLaMA block: x + attn(rms(x)), x + swiglu(rms(x)). (B, N, D) -> (B, N, D)."""

    def __init__(self, cfg: ILLaMAConfig, drop_path: float = 0.0):
        super().__init__()
        dim = cfg.embed_dim
        self.norm1 = RMSNorm(dim, eps=cfg.norm_eps)
        self.attn = Attention(dim, cfg.num_heads, qkv_bias=cfg.qkv_bias, proj_bias=cfg.proj_bias,
                              mask_mode=cfg.mask_mode)
        self.norm2 = RMSNorm(dim, eps=cfg.norm_eps)
        hidden = swiglu_hidden_dim(dim, cfg.mlp_ratio, cfg.mlp_multiple_of)
        self.mlp = SwiGLU(dim, hidden, bias=False)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, rope: Tuple[torch.Tensor, torch.Tensor],
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), rope, attn_mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ILLaMA(ClassifierContract, SoftMaskRate, nn.Module):
    """iLLaMA classifier. forward: (B, C, H, W) -> (B, num_classes)."""

    def __init__(self, cfg: Optional[ILLaMAConfig] = None, **kwargs):
        super().__init__()
        cfg = cfg or ILLaMAConfig(**kwargs)
        self.check_global_pool(cfg.global_pool)
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.global_pool = cfg.global_pool
        self.num_features = self.embed_dim = cfg.embed_dim
        self.num_prefix_tokens = 0  # the class token is a suffix here; timm helpers must not treat it as prefix
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, cfg.embed_dim))
        self.rope = RotaryEmbedding(cfg.embed_dim // cfg.num_heads, num_patches + 1, theta=cfg.rope_theta)
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList([Block(cfg, dpr[i]) for i in range(cfg.depth)])
        self.norm = RMSNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()

        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_linear)
        self.set_soft_mask_rate(cfg.soft_mask_rate)

    # --- timm contract (the rest in ClassifierContract) -----------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"pos_embed", "cls_token"}

    # --- forward -------------------------------------------------------------------------------
    def _pos_embed(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """Add the class token (last) and the absolute positions, resampled if the grid differs."""
        pos = self.pos_embed
        if grid != self.patch_embed.grid_size:
            patch_pos = resample_abs_pos_embed(pos[:, :-1], list(grid), list(self.patch_embed.grid_size),
                                               num_prefix_tokens=0)
            pos = torch.cat((patch_pos, pos[:, -1:]), dim=1)
        x = torch.cat((x, self.cls_token.expand(x.shape[0], -1, -1)), dim=1)
        return x + pos

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, C, H, W) -> final-norm tokens (B, P + 1, D): patches in raster order, class token last."""
        self.patch_embed.check_input(x)
        grid = (x.shape[-2] // self.patch_embed.patch_size[0], x.shape[-1] // self.patch_embed.patch_size[1])
        x = self._pos_embed(self.patch_embed(x), grid)
        rope = self.rope(x.shape[1])
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x = checkpoint(blk, x, rope, attn_mask, use_reentrant=False)
            else:
                x = blk(x, rope, attn_mask)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, N, D) -> logits (B, num_classes), or the pooled (B, D) with pre_logits."""
        x = x[:, -1] if self.global_pool == "token" else x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, attn_mask))


def checkpoint_filter_fn(state_dict: dict, model: ILLaMA) -> dict:
    """Official iLLaMA keys -> ours: SwiGLU fc1 (gate) / fc3 (up) / fc2 (down) -> fc1_g / fc1_x / fc2,
    pos_embed resampled to the model's grid. Already-converted keys pass through unchanged."""
    out = {}
    for k, v in state_dict.items():
        k = k.removeprefix("module.")
        if k == "freqs_cis":
            continue
        k = k.replace("mlp.fc1.", "mlp.fc1_g.").replace("mlp.fc3.", "mlp.fc1_x.")
        if k == "pos_embed" and v.shape != model.pos_embed.shape:
            old = _square_grid(v.shape[1] - 1)
            if old is not None:
                patch_pos = resample_abs_pos_embed(v[:, :-1], list(model.patch_embed.grid_size), list(old),
                                                   num_prefix_tokens=0)
                v = torch.cat((patch_pos, v[:, -1:]), dim=1)
        out[k] = v
    return out


def _square_grid(num_patches: int) -> Optional[Tuple[int, int]]:
    side = int(round(num_patches ** 0.5))
    return (side, side) if side * side == num_patches else None
