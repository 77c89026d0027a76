"""A LLaMA decoder layer, used as a FROZEN visual encoder layer: our Block around LLaMA's attention and FFN.

As in "Frozen Transformers in Language Models Are Effective Visual Encoder Layers" (Pang et al.):
no attention mask and no RoPE (image tokens have no causal order, and q/k row order then does not
matter), softmax in float32, grouped-query attention when the LLM has fewer KV heads.
The attention and FFN keep Meta's parameter names (wq, wk, wv, wo; w1, w2, w3); the layer's parts are the
Block's (norm1, attn, norm2, mlp), so Meta's attention_norm / attention / ffn_norm / feed_forward map onto
them one to one (`meta_to_block_key`), as the `llamavit.llm` readers return them.
"""
import contextlib
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .block import Block
from .norm import RMSNorm


class LLaMAAttention(nn.Module):
    """Multi-head attention without RoPE, bidirectional unless a mask is given. (B, N, dim) -> (B, N, dim)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.wq = nn.Linear(dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """attn_mask: boolean SDPA mask (True = may attend), (N, N) or (B, 1, N, N); None = every token sees all."""
        b, n, _ = x.shape
        q = self.wq(x).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, n, self.n_kv_heads, self.head_dim).transpose(1, 2)
        # the official block takes the softmax in float32: under bf16/fp16 (autocast included) the
        # attention product runs in float32
        autocast = x.device.type != "meta" and torch.is_autocast_enabled(x.device.type)
        with torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask,
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


# Meta's names of one decoder layer's parts -> the parts of our Block
META_TO_BLOCK = (("attention_norm.", "norm1."), ("attention.", "attn."), ("ffn_norm.", "norm2."),
                 ("feed_forward.", "mlp."))


def meta_to_block_key(key: str) -> str:
    """'attention.wq.weight' (Meta, relative to layers.{i}.) -> 'attn.wq.weight' (our Block); others unchanged."""
    for meta, ours in META_TO_BLOCK:
        if key.startswith(meta):
            return ours + key[len(meta):]
    return key


def llama_decoder_block(dim: int, n_heads: int, n_kv_heads: int, ffn_hidden: int, norm_eps: float,
                        head_dim: Optional[int] = None) -> Block:
    """A LLaMA decoder layer as our Block: h = x + attn(rms(x)); out = h + ffn(rms(h)). (B, N, dim) -> (B, N, dim)."""
    attn = LLaMAAttention(dim, n_heads, n_kv_heads, head_dim or dim // n_heads)
    return Block(dim, attn, LLaMAFeedForward(dim, ffn_hidden), norm_layer=partial(RMSNorm, eps=norm_eps))
