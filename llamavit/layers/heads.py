"""Probe heads over tokens: attentive pooling (AIM's head) and the linear probe (MAE's)."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class AttentivePoolingHead(nn.Module):
    """BatchNorm over tokens -> a learned query (no q projection) attends to k(x), v(x) -> Linear.

    x: (B, N, D) -> logits (B, num_classes), or the pooled (B, D) with pre_logits=True.
    BatchNorm1d(affine=False) normalises every channel over all B*N tokens (batch statistics in
    training, running ones in eval). k, v and the classifier carry no bias, as in apple/ml-aim.
    Key names follow the official module: bn, cls_token, k, v, linear.
    """

    def __init__(self, dim: int, num_classes: int, num_heads: int, num_queries: int = 1, use_batch_norm: bool = True,
                 bn_eps: float = 1e-6):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=bn_eps) if use_batch_norm else nn.Identity()
        self.cls_token = nn.Parameter(torch.randn(1, num_queries, dim) * 0.02)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.linear = nn.Linear(dim, num_classes, bias=False) if num_classes > 0 else nn.Identity()

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh classifier (0: none) on the head's device and dtype, in its train/eval mode."""
        like = self.k.weight
        self.linear = (nn.Linear(like.shape[1], num_classes, bias=False, device=like.device, dtype=like.dtype)
                       if num_classes > 0 else nn.Identity()).train(self.training)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        b, n, d = x.shape
        x = self.bn(x.transpose(1, 2)).transpose(1, 2)
        split = (self.num_heads, d // self.num_heads)
        q = self.cls_token.expand(b, -1, -1).unflatten(-1, split).transpose(1, 2)
        k = self.k(x).unflatten(-1, split).transpose(1, 2)
        v = self.v(x).unflatten(-1, split).transpose(1, 2)
        pooled = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2).mean(dim=1)
        return pooled if pre_logits else self.linear(pooled)


class LinearProbeHead(nn.Module):
    """Mean token -> BatchNorm1d(affine=False) -> Linear, as MAE's linear probe.

    x: (B, N, D) tokens or (B, D) -> logits (B, num_classes), or the normalised (B, D) with pre_logits=True.
    """

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = self.bn(x.mean(dim=1) if x.ndim == 3 else x)
        return pooled if pre_logits else self.linear(pooled)


class MeanTokenHead(nn.Module):
    """No classifier: the mean token. x (B, N, D) -> (B, D) (a head pruned away, timm's prune_head)."""

    def reset_classifier(self, num_classes: int) -> None:
        """A pruned head takes no classifier (0 only)."""
        if num_classes:
            raise ValueError("a pruned head has no classifier; build the model again to classify")

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x.mean(dim=1)
