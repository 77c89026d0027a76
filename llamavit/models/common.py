"""Plumbing shared by llamavit's classifiers: timm's model contract and the timm ViT weight init.

`ClassifierContract` is a mixin for nn.Module classifiers that hold `self.head` (nn.Linear or
nn.Identity), `self.embed_dim`, `self.num_classes`, `self.global_pool` and `self.grad_checkpointing`.
A model whose pooling choices differ overrides `check_global_pool`; one whose head is not a plain
Linear (AIM's attentive probe) overrides `get_classifier` and `reset_classifier`.
"""
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import trunc_normal_


class ClassifierContract:
    """set_grad_checkpointing, get_classifier, reset_classifier as timm models have them."""

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A fresh classifier for num_classes (0: no classifier, forward returns the pooled features)."""
        if global_pool is not None:
            self.check_global_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def check_global_pool(self, global_pool: str) -> None:
        """Raise ValueError when this model cannot pool that way."""
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")


class SoftMaskRate:
    """set_soft_mask_rate for models whose blocks hold a soft-mask `attn` (iLLaMA and its ablation ladder)."""

    def set_soft_mask_rate(self, rate: float) -> None:
        """Soft-mask rate r for every block: 1 = bidirectional, 0 = causal (the official post-softmax mask)."""
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"soft mask rate must be in [0, 1], got {rate}")
        self.soft_mask_rate = float(rate)
        for blk in self.blocks:
            blk.attn.soft_mask_rate = float(rate)


def init_linear(m: nn.Module) -> None:
    """timm ViT's init for `model.apply`: Linear weights truncated normal (std 0.02), biases zero."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
