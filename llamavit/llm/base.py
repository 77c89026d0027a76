"""What every LLM reader returns: an `LLMConfig` and per-layer weights in ONE layout, Meta's.

Layout of one decoder layer (names as in Meta's `consolidated.*.pth`, without `layers.{i}.`):
    attention.wq.weight  (n_heads * head_dim, dim)      q/k rows in Meta's interleaved-RoPE order
    attention.wk.weight  (n_kv_heads * head_dim, dim)   (pairs (2i, 2i+1) of a head rotate together)
    attention.wv.weight  (n_kv_heads * head_dim, dim)
    attention.wo.weight  (dim, n_heads * head_dim)
    feed_forward.w1.weight (ffn_hidden, dim)   gate, through SiLU
    feed_forward.w2.weight (dim, ffn_hidden)   down
    feed_forward.w3.weight (ffn_hidden, dim)   up
    attention_norm.weight, ffn_norm.weight (dim,)
All tensors are float32 on the CPU.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

LAYER_KEYS = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
              "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight",
              "attention_norm.weight", "ffn_norm.weight")


class LLMError(ValueError):
    """An LLM checkpoint that cannot be read as a LLaMA-architecture model; the message is one line."""


@dataclass
class LLMConfig:
    """Shape of a LLaMA-architecture decoder, as its checkpoint's own config states it."""
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden: int
    norm_eps: float
    rope_theta: float = 10000.0
    head_dim: Optional[int] = None   # None: dim // n_heads

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise LLMError(f"n_heads ({self.n_heads}) is not a multiple of n_kv_heads ({self.n_kv_heads})")

    def layer_shapes(self) -> Dict[str, tuple]:
        """Expected shape of every tensor of one layer, keyed as LAYER_KEYS."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return {"attention.wq.weight": (q, self.dim), "attention.wk.weight": (kv, self.dim),
                "attention.wv.weight": (kv, self.dim), "attention.wo.weight": (self.dim, q),
                "feed_forward.w1.weight": (self.ffn_hidden, self.dim),
                "feed_forward.w2.weight": (self.dim, self.ffn_hidden),
                "feed_forward.w3.weight": (self.ffn_hidden, self.dim),
                "attention_norm.weight": (self.dim,), "ffn_norm.weight": (self.dim,)}


def resolve_layers(layers: Optional[Sequence[int]], n_layers: int, source: str) -> List[int]:
    """Layer indices -> non-negative indices; None = the last layer; negative count from the end."""
    if layers is None:
        return [n_layers - 1]
    if isinstance(layers, int):
        layers = [layers]
    out = []
    for i in layers:
        j = int(i) + n_layers if int(i) < 0 else int(i)
        if not 0 <= j < n_layers:
            raise LLMError(f"layer index {i} out of range: {source} has {n_layers} layers "
                           f"(valid: 0..{n_layers - 1}, or -{n_layers}..-1 from the end)")
        out.append(j)
    return out


class LLMReader:
    """A LLaMA-architecture checkpoint opened for reading. Subclasses set `config`, `format`, `path`
    and implement `_read_layer(i)` returning the Meta-layout dict of layer i (any float dtype)."""
    format: str = ""
    path: str = ""
    config: LLMConfig

    def files(self) -> List[str]:
        """The files whose contents define the weights (for the fingerprint)."""
        raise NotImplementedError

    def _read_layer(self, index: int) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def read_layers(self, layers: Optional[Sequence[int]] = None) -> List[Dict[str, torch.Tensor]]:
        """Weights of the requested layers (None = the last), float32, shapes checked against the config."""
        expected = self.config.layer_shapes()
        out = []
        for i in resolve_layers(layers, self.config.n_layers, self.path):
            weights = self._read_layer(i)
            for key, shape in expected.items():
                if key not in weights:
                    raise LLMError(f"{self.path}: layer {i} has no {key} — not a LLaMA-architecture checkpoint")
                if tuple(weights[key].shape) != shape:
                    raise LLMError(f"{self.path}: layer {i} {key} has shape {tuple(weights[key].shape)}, the "
                                   f"config implies {shape}")
            out.append({k: weights[k].to(torch.float32).contiguous() for k in LAYER_KEYS})
        return out
