"""iLLaMA: a decoder-only ViT (Wang et al., "Adapting LLaMA Decoder to Vision Transformer"), and every
step between a DeiT-style ViT and it.

Conv patch embed -> patch tokens, class token appended LAST -> learned absolute pos_embed ->
blocks (RMSNorm, attention with 1D RoPE and the soft mask, RMSNorm, SwiGLU) -> final RMSNorm ->
last token -> Linear head. Matches techmonsterwang/iLLaMA models/illama.py numerically; unlike the
official code it accepts any input resolution (pos_embed interpolated, RoPE recomputed).

Each ingredient that separates iLLaMA from a ViT is one config field, so the ablation ladder
(`ladder_vit_*`, configs/ladder_illama.yaml) is a set of options of this model, not a second model:

    norm                 'rmsnorm' (weight only, float32 statistics) | 'layernorm' (affine, ViT)
    mlp                  'swiglu' (LLaMA width rounding) | 'gelu' (Linear-GELU-Linear, hidden D*mlp_ratio)
    qkv_bias, proj_bias, mlp_bias   the biases of the attention and MLP Linears
    mask_mode            'soft' (post-softmax mask, rate r) | 'causal' (renormalised) | 'bidirectional'
    class_token_position 'last' (iLLaMA's post-sequence class token) | 'first' (ViT)
    pos_embed            'learned' (absolute, one row per token) | 'none'
    rope                 1D RoPE on q and k over token indices 0..N-1
Tokens: (B, P + 1, D) with the class token at index P ('last') or 0 ('first').
"""
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import Mlp, resample_abs_pos_embed, trunc_normal_

from ..layers import Attention, Block, PatchEmbed, RMSNorm, RotaryEmbedding, SwiGLU, swiglu_hidden_dim
from .common import ClassifierContract, TokenTrunk, init_linear

NORMS = ("rmsnorm", "layernorm")
MLPS = ("swiglu", "gelu")
CLASS_TOKEN_POSITIONS = ("last", "first")
POS_EMBEDS = ("learned", "none")


@dataclass
class ILLaMAConfig:
    """iLLaMA hyper-parameters (timm names) and the switches between a ViT and iLLaMA (module docstring)."""
    img_size: Union[int, Tuple[int, int]] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    mlp_multiple_of: int = 256    # SwiGLU width rounding of the official code; unused by the GELU MLP
    norm: str = "rmsnorm"
    norm_eps: float = 1e-6
    mlp: str = "swiglu"
    qkv_bias: bool = True
    proj_bias: bool = True
    mlp_bias: bool = False
    mask_mode: str = "soft"       # 'soft' (official post-softmax mask) | 'causal' (renormalised) | 'bidirectional'
    soft_mask_rate: float = 0.0   # 0 = causal end state of training, 1 = bidirectional
    class_token_position: str = "last"
    pos_embed: str = "learned"
    rope: bool = True
    rope_theta: float = 10000.0
    global_pool: str = "token"    # 'token' (the class token) | 'avg' (mean of all tokens)
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0

    def __post_init__(self):
        for name, allowed in (("norm", NORMS), ("mlp", MLPS), ("class_token_position", CLASS_TOKEN_POSITIONS),
                              ("pos_embed", POS_EMBEDS), ("mask_mode", ("soft", "causal", "bidirectional"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")


def build_norm(cfg: ILLaMAConfig) -> nn.Module:
    """The configured norm over embed_dim: RMSNorm or LayerNorm."""
    return RMSNorm(cfg.embed_dim, eps=cfg.norm_eps) if cfg.norm == "rmsnorm" else nn.LayerNorm(cfg.embed_dim,
                                                                                                 eps=cfg.norm_eps)


def build_block(cfg: ILLaMAConfig, drop_path: float) -> Block:
    """One block: the configured norm, attention (mask mode, biases) and MLP."""
    dim = cfg.embed_dim
    attn = Attention(dim, cfg.num_heads, qkv_bias=cfg.qkv_bias, proj_bias=cfg.proj_bias, mask_mode=cfg.mask_mode)
    if cfg.mlp == "swiglu":
        mlp = SwiGLU(dim, swiglu_hidden_dim(dim, cfg.mlp_ratio, cfg.mlp_multiple_of), bias=cfg.mlp_bias)
    else:
        mlp = Mlp(dim, int(dim * cfg.mlp_ratio), act_layer=nn.GELU, bias=cfg.mlp_bias)
    return Block(dim, attn, mlp, norm_layer=lambda _: build_norm(cfg), drop_path=drop_path)


class ILLaMA(TokenTrunk, ClassifierContract, nn.Module):
    """iLLaMA classifier (or a ladder rung). forward: (B, C, H, W) -> (B, num_classes).

    forward_features: final-norm tokens (B, P + 1, D), patches in raster order, the class token last
    (iLLaMA) or first.
    """

    def __init__(self, cfg: Optional[ILLaMAConfig] = None, **kwargs):
        super().__init__()
        cfg = cfg or ILLaMAConfig(**kwargs)
        self.check_global_pool(cfg.global_pool)
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.global_pool = cfg.global_pool
        self.num_features = self.embed_dim = cfg.embed_dim
        self.in_chans = cfg.in_chans
        self.cls_index = -1 if cfg.class_token_position == "last" else 0
        # timm helpers and our analyses find the patch tokens between the prefix and suffix tokens
        self.num_prefix_tokens = int(self.cls_index == 0)
        self.num_suffix_tokens = int(self.cls_index == -1)
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, cfg.embed_dim)) \
            if cfg.pos_embed == "learned" else None
        self.rope = RotaryEmbedding(cfg.embed_dim // cfg.num_heads, num_patches + 1, theta=cfg.rope_theta) \
            if cfg.rope else None
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList([build_block(cfg, dpr[i]) for i in range(cfg.depth)])
        self.norm = build_norm(cfg)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(cfg.embed_dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.feature_info = self.feature_info_of(self.blocks, cfg.patch_size)

        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_linear)
        self.set_soft_mask_rate(cfg.soft_mask_rate)

    # --- timm contract (the rest in ClassifierContract) -----------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"pos_embed", "cls_token"}

    def set_soft_mask_rate(self, rate: float) -> None:
        """Soft-mask rate r for every block: 1 = bidirectional, 0 = causal (the official post-softmax mask)."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"soft mask rate must be in [0, 1], got {rate}")
        self.soft_mask_rate = float(rate)
        for blk in self.blocks:
            blk.attn.soft_mask_rate = float(rate)

    # --- forward -------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None):
        """Images (B, C, H, W) -> (tokens (B, P + 1, D), block arguments, patch grid)."""
        self.patch_embed.check_input(x)
        grid = self.patch_grid(x)
        tokens = self.patch_embed(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat((tokens, cls) if self.cls_index == -1 else (cls, tokens), dim=1)
        if self.pos_embed is not None:
            tokens = tokens + self._positions(grid)
        rope = self.rope(tokens.shape[1]) if self.rope is not None else None
        return tokens, {"rope": rope, "attn_mask": attn_mask}, grid

    def _positions(self, grid: Tuple[int, int]) -> torch.Tensor:
        """The absolute positions (1, P + 1, D) for a patch grid."""
        if grid == self.patch_embed.grid_size:
            return self.pos_embed
        return self._resample_positions(self.pos_embed, grid, self.patch_embed.grid_size)

    def _resample_positions(self, pos: torch.Tensor, new_grid, old_grid) -> torch.Tensor:
        """pos (1, P + 1, D) of old_grid -> (1, P' + 1, D) of new_grid; the class-token row is kept as it is."""
        last = self.cls_index == -1
        cls_pos, patch_pos = (pos[:, -1:], pos[:, :-1]) if last else (pos[:, :1], pos[:, 1:])
        patch_pos = resample_abs_pos_embed(patch_pos, list(new_grid), list(old_grid), num_prefix_tokens=0)
        return torch.cat((patch_pos, cls_pos) if last else (cls_pos, patch_pos), dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, N, D) -> logits (B, num_classes), or the pooled (B, D) with pre_logits."""
        x = x[:, self.cls_index] if self.global_pool == "token" else x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, attn_mask))

    def checkpoint_filter(self, state_dict: dict) -> dict:
        """Official iLLaMA keys -> ours: SwiGLU fc1 (gate) / fc3 (up) / fc2 (down) -> fc1_g / fc1_x / fc2,
        pos_embed resampled to the model's grid. Already-converted keys pass through unchanged."""
        out = {}
        swiglu = self.cfg.mlp == "swiglu"
        for k, v in state_dict.items():
            k = k.removeprefix("module.")
            if k == "freqs_cis":
                continue
            if swiglu:
                k = k.replace("mlp.fc1.", "mlp.fc1_g.").replace("mlp.fc3.", "mlp.fc1_x.")
            if k == "pos_embed" and self.pos_embed is not None and v.shape != self.pos_embed.shape:
                side = int(round((v.shape[1] - 1) ** 0.5))
                if side * side == v.shape[1] - 1:   # else left for the shape check to report
                    v = self._resample_positions(v, self.patch_embed.grid_size, (side, side))
            out[k] = v
        return out


# the ladder's first rung: a DeiT-style ViT expressed in ILLaMAConfig fields
VIT_OPTIONS = {"norm": "layernorm", "mlp": "gelu", "mlp_bias": True, "mask_mode": "bidirectional",
               "class_token_position": "first", "rope": False}
