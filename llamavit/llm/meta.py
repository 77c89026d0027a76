"""Meta's original LLaMA format: a directory with params.json and consolidated.NN.pth shards.

Shards are model-parallel slices: column-parallel Linears (wq, wk, wv, w1, w3) are split along the
output dim (0), row-parallel ones (wo, w2) along the input dim (1); norms are replicated. Shards are
opened with mmap, so taking one layer of a 7B model reads only that layer's pages.
"""
import glob
import json
import math
import os
from typing import Dict, List

import torch

from .base import LAYER_KEYS, LLMConfig, LLMError, LLMReader

_ROW_PARALLEL = ("attention.wo.weight", "feed_forward.w2.weight")   # concatenated on dim 1
_REPLICATED = ("attention_norm.weight", "ffn_norm.weight")


def is_meta_dir(path: str) -> bool:
    """Whether path is a Meta checkpoint directory (params.json + consolidated.*.pth)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "params.json"))


def _ffn_hidden(params: dict) -> int:
    """LLaMA's SwiGLU width: int(8 dim / 3), times ffn_dim_multiplier, rounded up to multiple_of."""
    hidden = int(2 * 4 * params["dim"] / 3)
    if params.get("ffn_dim_multiplier") is not None:
        hidden = int(params["ffn_dim_multiplier"] * hidden)
    multiple_of = params.get("multiple_of", 256)
    return multiple_of * math.ceil(hidden / multiple_of)


def _load_shard(path: str) -> Dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


class MetaReader(LLMReader):
    format = "meta"

    def __init__(self, path: str):
        self.path = path
        try:
            with open(os.path.join(path, "params.json")) as f:
                params = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise LLMError(f"{path}: cannot read params.json ({e})") from e
        missing = [k for k in ("dim", "n_layers", "n_heads") if k not in params]
        if missing:
            raise LLMError(f"{path}/params.json lacks {missing}: not a LLaMA-architecture Meta checkpoint")
        self.shards = sorted(glob.glob(os.path.join(path, "consolidated.*.pth")))
        if not self.shards:
            raise LLMError(f"{path} has params.json but no consolidated.*.pth shard")
        self.config = LLMConfig(dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
                                n_kv_heads=params.get("n_kv_heads") or params["n_heads"],
                                ffn_hidden=_ffn_hidden(params), norm_eps=float(params.get("norm_eps", 1e-5)),
                                rope_theta=float(params.get("rope_theta", 10000.0)))
        self._state = [_load_shard(s) for s in self.shards]
        if "layers.0.attention.wq.weight" not in self._state[0]:
            raise LLMError(f"{self.shards[0]} has no layers.0.attention.wq.weight: not a LLaMA-architecture "
                           f"Meta checkpoint")
        # the checkpoint's own tensors decide the FFN width (params.json only implies it)
        self.config.ffn_hidden = sum(s["layers.0.feed_forward.w1.weight"].shape[0] for s in self._state)

    def files(self) -> List[str]:
        return [os.path.join(self.path, "params.json"), *self.shards]

    def _read_layer(self, index: int) -> Dict[str, torch.Tensor]:
        prefix = f"layers.{index}."
        out = {}
        for key in (k for k in LAYER_KEYS if prefix + k in self._state[0]):
            parts = [s[prefix + key] for s in self._state]
            if key in _REPLICATED or len(parts) == 1:
                out[key] = parts[0].to(torch.float32)   # a copy: the mmap is released with the reader
            else:
                out[key] = torch.cat(parts, dim=1 if key in _ROW_PARALLEL else 0).to(torch.float32)
        return out
