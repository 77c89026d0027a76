"""A configurable plain-ViT-to-iLLaMA model for ablation ladders.

Every switch between a DeiT-style ViT and iLLaMA is one config field, so a ladder rung is a set of
options, not a code path:

    norm                 'layernorm' (affine, ViT) | 'rmsnorm' (weight only, float32 statistics, iLLaMA)
    mlp                  'gelu' (Linear-GELU-Linear, hidden D*mlp_ratio) | 'swiglu' (LLaMA width rounding)
    qkv_bias, proj_bias, mlp_bias   the biases of the attention and MLP Linears
    mask_mode            'bidirectional' | 'causal' (renormalised) | 'soft' (iLLaMA post-softmax mask, rate r)
    class_token_position 'first' (ViT) | 'last' (iLLaMA's post-sequence class token)
    pos_embed            'learned' (absolute, one row per token) | 'none'
    rope                 1D RoPE on q and k over token indices 0..N-1, as iLLaMA

With norm='rmsnorm', mlp='swiglu', mlp_bias=False, mask_mode='soft', class_token_position='last',
pos_embed='learned', rope=True it computes exactly what `ILLaMA` computes, with the same state-dict
keys. Tokens: (B, P + 1, D) with the class token at index 0 or P.
"""
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp, resample_abs_pos_embed, trunc_normal_
from torch.utils.checkpoint import checkpoint

from ..layers import Attention, PatchEmbed, RMSNorm, RotaryEmbedding, SwiGLU, swiglu_hidden_dim
from .common import ClassifierContract, SoftMaskRate, init_linear

NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")
CLASS_TOKEN_POSITIONS = ("first", "last")
POS_EMBEDS = ("learned", "none")


@dataclass
class LadderViTConfig:
    img_size: Union[int, Tuple[int, int]] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    mlp_multiple_of: int = 256        # SwiGLU width rounding (iLLaMA's); unused by the GELU MLP
    norm: str = "layernorm"
    norm_eps: float = 1e-6
    mlp: str = "gelu"
    qkv_bias: bool = True
    proj_bias: bool = True
    mlp_bias: bool = True
    mask_mode: str = "bidirectional"
    soft_mask_rate: float = 0.0       # used by mask_mode='soft' only: 1 = bidirectional, 0 = causal
    class_token_position: str = "first"
    pos_embed: str = "learned"
    rope: bool = False
    rope_theta: float = 10000.0
    global_pool: str = "token"        # 'token' (the class token) | 'avg' (mean of all tokens)
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    def __post_init__(self):
        for name, allowed in (("norm", NORMS), ("mlp", MLPS), ("class_token_position", CLASS_TOKEN_POSITIONS),
                              ("pos_embed", POS_EMBEDS), ("global_pool", ("token", "avg")),
                              ("mask_mode", ("bidirectional", "causal", "soft"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")


def build_norm(cfg: LadderViTConfig) -> nn.Module:
    return RMSNorm(cfg.embed_dim, eps=cfg.norm_eps) if cfg.norm == "rmsnorm" else nn.LayerNorm(cfg.embed_dim,
                                                                                                 eps=cfg.norm_eps)


def build_mlp(cfg: LadderViTConfig) -> nn.Module:
    if cfg.mlp == "swiglu":
        return SwiGLU(cfg.embed_dim, swiglu_hidden_dim(cfg.embed_dim, cfg.mlp_ratio, cfg.mlp_multiple_of),
                      bias=cfg.mlp_bias)
    return Mlp(cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio), act_layer=nn.GELU, bias=cfg.mlp_bias)


class Block(nn.Module):
    """Pre-norm block: x + attn(norm1 x), x + mlp(norm2 x). (B, N, D) -> (B, N, D)."""

    def __init__(self, cfg: LadderViTConfig, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = build_norm(cfg)
        self.attn = Attention(cfg.embed_dim, cfg.num_heads, qkv_bias=cfg.qkv_bias, proj_bias=cfg.proj_bias,
                              mask_mode=cfg.mask_mode)
        self.norm2 = build_norm(cfg)
        self.mlp = build_mlp(cfg)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, rope: Optional[Tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), rope))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class LadderViT(ClassifierContract, SoftMaskRate, nn.Module):
    """ViT with every ViT-vs-iLLaMA ingredient switchable. forward: (B, C, H, W) -> (B, num_classes)."""

    def __init__(self, cfg: Optional[LadderViTConfig] = None, **kwargs):
        super().__init__()
        cfg = cfg or LadderViTConfig(**kwargs)
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.global_pool = cfg.global_pool
        self.num_features = self.embed_dim = cfg.embed_dim
        self.cls_index = 0 if cfg.class_token_position == "first" else -1
        # timm helpers (and our analyses) find the patch tokens after num_prefix_tokens
        self.num_prefix_tokens = 1 if cfg.class_token_position == "first" else 0
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, cfg.embed_dim)) \
            if cfg.pos_embed == "learned" else None
        self.rope = RotaryEmbedding(cfg.embed_dim // cfg.num_heads, num_patches + 1, theta=cfg.rope_theta) \
            if cfg.rope else None
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList([Block(cfg, dpr[i]) for i in range(cfg.depth)])
        self.norm = build_norm(cfg)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()

        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_linear)
        self.set_soft_mask_rate(cfg.soft_mask_rate)

    # --- timm contract (the rest in ClassifierContract) -----------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"pos_embed", "cls_token"}

    # --- forward -------------------------------------------------------------------------------
    def _add_class_token_and_pos(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        first = self.cls_index == 0
        x = torch.cat((cls, x) if first else (x, cls), dim=1)
        if self.pos_embed is None:
            return x
        pos = self.pos_embed
        if grid != self.patch_embed.grid_size:
            cls_pos, patch_pos = (pos[:, :1], pos[:, 1:]) if first else (pos[:, -1:], pos[:, :-1])
            patch_pos = resample_abs_pos_embed(patch_pos, list(grid), list(self.patch_embed.grid_size),
                                               num_prefix_tokens=0)
            pos = torch.cat((cls_pos, patch_pos) if first else (patch_pos, cls_pos), dim=1)
        return x + pos

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> final-norm tokens (B, P + 1, D), class token first or last per the config."""
        self.patch_embed.check_input(x)
        grid = (x.shape[-2] // self.patch_embed.patch_size[0], x.shape[-1] // self.patch_embed.patch_size[1])
        x = self._add_class_token_and_pos(self.patch_embed(x), grid)
        rope = self.rope(x.shape[1]) if self.rope is not None else None
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x = checkpoint(blk, x, rope, use_reentrant=False)
            else:
                x = blk(x, rope)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, N, D) -> logits (B, num_classes), or the pooled (B, D) with pre_logits."""
        x = x[:, self.cls_index] if self.global_pool == "token" else x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict, model: LadderViT) -> dict:
    """Our own keys only (no official release exists); strips a DDP `module.` prefix."""
    return {k.removeprefix("module."): v for k, v in state_dict.items()}
