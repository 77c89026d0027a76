"""A LLaMA decoder layer under Meta's parameter names, used as a FROZEN visual encoder layer.

As in "Frozen Transformers in Language Models Are Effective Visual Encoder Layers" (Pang et al.):
no attention mask and no RoPE (image tokens have no causal order, and q/k row order then does not
matter), softmax in float32, grouped-query attention when the LLM has fewer KV heads.
Keys: attention.{wq,wk,wv,wo}.weight, feed_forward.{w1,w2,w3}.weight, attention_norm.weight,
ffn_norm.weight — the names Meta's checkpoints and `llamavit.llm` readers use.
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from .norm import RMSNorm


class LLaMAAttention(nn.Module):
    """Bidirectional multi-head attention without RoPE. (B, N, dim) -> (B, N, dim)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.wq(x).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        # the official block takes the softmax in float32: under bf16/fp16 (autocast included) the
        # attention product runs in float32
        autocast = x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)
        with torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                 enable_gqa=self.n_kv_heads != self.n_heads).to(q.dtype)
        return self.wo(out.transpose(1, 2).reshape(b, n, -1))


class LLaMAFeedForward(nn.Module):
    """SwiGLU w2(silu(w1 x) * w3 x), bias-free. (B, N, dim) -> (B, N, dim)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LLaMADecoderLayer(nn.Module):
    """h = x + attn(rms(x)); out = h + ffn(rms(h)). (B, N, dim) -> (B, N, dim)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, ffn_hidden: int, norm_eps: float,
                 head_dim: int = None):
        super().__init__()
        self.attention = LLaMAAttention(dim, n_heads, n_kv_heads, head_dim or dim // n_heads)
        self.feed_forward = LLaMAFeedForward(dim, ffn_hidden)
        self.attention_norm = RMSNorm(dim, eps=norm_eps)
        self.ffn_norm = RMSNorm(dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x))
        return h + self.feed_forward(self.ffn_norm(h))
