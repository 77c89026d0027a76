"""A transformer encoder over the tokens of any modality, with the optional frozen LLM block (Pang et al.'s claim
that the block helps point-cloud, video and other encoders, not only images).

    tokenizer(x) -> tokens (B, N, D), positions (B, N, D)
    [cls] + tokens + positions -> DeiT blocks -> frozen LLM path (optional) -> LayerNorm -> pool -> head

The tokenizer is injected (a point-cloud grouping + mini-PointNet, a tubelet embedding, ...); the blocks are the
ViT + frozen LLM model's (`vit_block`: our Block with a DeiT block's parts) and the frozen path is
`FrozenLLMPath`, as in ViTLLM: mapper1 -> frozen LLaMA layers -> RMSNorm -> mapper2, no residual around it.
`llm_path=None` here means NO frozen block (the baseline arm); 'random' or a file add one.
"""
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import Mlp, trunc_normal_

from ..layers import run_blocks
from .common import ClassifierContract, init_linear
from .frozen_llm import SMOLLM2_SHAPE, FrozenLLMOptions, FrozenLLMPath
from .vit_llm import vit_block

POOLS = ("token", "avg", "token_max")


@dataclass
class TokenEncoderConfig(FrozenLLMOptions):
    """The encoder's hyper-parameters; the frozen block's source (None: no block) and shape (SmolLM2-135M's)."""
    num_classes: int = 10
    embed_dim: int = 96
    depth: int = 4
    num_heads: int = 3
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    global_pool: str = "token"   # 'token' (class token) | 'avg' (mean of the others) | 'token_max' (PointBERT's
    #                              class token concatenated with the max over the others: 2 D wide)
    norm_eps: float = 1e-6
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    llm_dim: int = SMOLLM2_SHAPE["llm_dim"]
    llm_num_heads: int = SMOLLM2_SHAPE["llm_num_heads"]
    llm_num_kv_heads: Optional[int] = SMOLLM2_SHAPE["llm_num_kv_heads"]
    llm_ffn_hidden: int = SMOLLM2_SHAPE["llm_ffn_hidden"]
    llm_norm_eps: float = SMOLLM2_SHAPE["llm_norm_eps"]
    llm_num_layers: int = SMOLLM2_SHAPE["llm_num_layers"]


class TokenEncoder(FrozenLLMPath, ClassifierContract, nn.Module):
    """Encoder over `tokenizer`'s tokens. forward: inputs (whatever the tokenizer takes) -> (B, num_classes);
    forward_features -> final-norm tokens (B, 1 + N, D), the class token first."""

    stem_pattern = r"^cls_|^tokenizer"

    def __init__(self, tokenizer: nn.Module, cfg: TokenEncoderConfig):
        super().__init__()
        if cfg.global_pool not in POOLS:
            raise ValueError(f"global_pool must be one of {POOLS}, got {cfg.global_pool!r}")
        self.cfg, self.tokenizer = cfg, tokenizer
        self.embed_dim, self.num_classes, self.global_pool = cfg.embed_dim, cfg.num_classes, cfg.global_pool
        self.num_prefix_tokens, self.grad_checkpointing = 1, False
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        norm_layer = partial(nn.LayerNorm, eps=cfg.norm_eps)
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList([
            vit_block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, True, None, 0.0, 0.0, rate,
                      norm_layer, nn.GELU, Mlp) for rate in rates])
        self.has_llm = cfg.llm_path is not None
        self.norm = norm_layer(cfg.embed_dim)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_(self.cls_pos, std=0.02)
        for module in (self.blocks, self.head):
            module.apply(init_linear)
        if self.has_llm:   # after the init above: the block keeps the weights it was read with
            self.init_frozen_llm(cfg.embed_dim, cfg)

    @property
    def num_features(self) -> int:
        """Width of the pooled vector the head reads."""
        return 2 * self.embed_dim if self.global_pool == "token_max" else self.embed_dim

    def check_global_pool(self, global_pool: str) -> None:
        if global_pool not in POOLS:
            raise ValueError(f"global_pool must be one of {POOLS}, got {global_pool!r}")

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A fresh classifier for num_classes (its width follows the pooling)."""
        if global_pool is not None:
            self.check_global_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        like = next(self.parameters())
        self.head = (nn.Linear(self.num_features, num_classes, device=like.device, dtype=like.dtype)
                     if num_classes > 0 else nn.Identity())

    def embed(self, x) -> torch.Tensor:
        """Inputs -> the class token and the tokenizer's tokens, positions added: (B, 1 + N, D)."""
        tokens, positions = self.tokenizer(x)
        cls = (self.cls_token + self.cls_pos).expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens + positions], dim=1)

    def forward_features(self, x, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Inputs -> tokens (B, 1 + N, D) after the blocks, the frozen path (if any) and the final norm."""
        checkpointing = self.grad_checkpointing and self.training
        tokens = run_blocks(self.blocks, self.embed(x), checkpointing, attn_mask=attn_mask)
        if self.has_llm:
            tokens = self.forward_llm(tokens, attn_mask)
        return self.norm(tokens)

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, 1 + N, D) -> pooled (B, num_features), or logits (B, num_classes)."""
        if self.global_pool == "avg":
            pooled = tokens[:, 1:].mean(dim=1)
        elif self.global_pool == "token_max":
            pooled = torch.cat([tokens[:, 0], tokens[:, 1:].max(dim=1).values], dim=-1)
        else:
            pooled = tokens[:, 0]
        pooled = self.head_drop(pooled)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, attn_mask))
