"""Hugging Face LLaMA directories: config.json + model.safetensors, or shards listed in
model.safetensors.index.json. Only the requested layer's tensors are read (safe_open)."""
import glob
import json
import os
from typing import Dict, List

import torch
from safetensors import safe_open

from .base import LLMConfig, LLMError, LLMReader
from .permute import hf_to_meta_rows

INDEX_NAME = "model.safetensors.index.json"
# ours (Meta) -> HF name inside model.layers.{i}.
HF_NAMES = {"attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
            "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
            "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
            "feed_forward.w3.weight": "mlp.up_proj.weight", "attention_norm.weight": "input_layernorm.weight",
            "ffn_norm.weight": "post_attention_layernorm.weight"}
_LLAMA_CLASSES = ("LlamaForCausalLM", "LlamaModel")


def is_hf_dir(path: str) -> bool:
    """Whether path is a Hugging Face model directory (config.json + safetensors)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def _rope_theta(cfg: dict) -> float:
    rope = cfg.get("rope_parameters") or {}
    return float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0)))


class HFReader(LLMReader):
    format = "hf"

    def __init__(self, path: str):
        self.path = path
        try:
            with open(os.path.join(path, "config.json")) as f:
                cfg = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise LLMError(f"{path}: cannot read config.json ({e})") from e
        arch = cfg.get("model_type")
        llama_class = set(cfg.get("architectures") or ()) & set(_LLAMA_CLASSES)
        if arch != "llama" and (arch is not None or not llama_class):
            raise LLMError(f"{path}: model_type {arch!r} (architectures {cfg.get('architectures')}) is not a LLaMA "
                           f"architecture; expected model_type 'llama'")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise LLMError(f"{path}: attention_bias/mlp_bias set; llamavit's LLaMA block has no biases")
        heads = cfg["num_attention_heads"]
        self.config = LLMConfig(dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=heads,
                                n_kv_heads=cfg.get("num_key_value_heads") or heads,
                                ffn_hidden=cfg["intermediate_size"], norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                                rope_theta=_rope_theta(cfg), head_dim=cfg.get("head_dim"))
        self.weight_map = self._weight_map()
        probe = [k for k in self.weight_map if k.endswith("layers.0." + HF_NAMES["attention.wq.weight"])]
        if not probe:
            raise LLMError(f"{path}: no layers.0.self_attn.q_proj.weight in its safetensors files: not a LLaMA "
                           f"checkpoint")
        self.prefix = probe[0][:-len("0." + HF_NAMES["attention.wq.weight"])]   # 'model.layers.' or 'layers.'

    def _weight_map(self) -> Dict[str, str]:
        """tensor name -> safetensors file, from the index or by listing every file's keys."""
        index = os.path.join(self.path, INDEX_NAME)
        if os.path.isfile(index):
            with open(index) as f:
                return {k: os.path.join(self.path, v) for k, v in json.load(f)["weight_map"].items()}
        files = sorted(glob.glob(os.path.join(self.path, "*.safetensors")))
        if not files:
            other = sorted(os.path.basename(p) for p in glob.glob(os.path.join(self.path, "*.bin")))
            hint = f" (found {other[:2]}: convert them to safetensors)" if other else ""
            raise LLMError(f"{self.path} has config.json but no *.safetensors file{hint}")
        out = {}
        for fname in files:
            with safe_open(fname, framework="pt") as f:
                out.update({k: fname for k in f.keys()})
        return out

    def files(self) -> List[str]:
        index = os.path.join(self.path, INDEX_NAME)
        extra = [index] if os.path.isfile(index) else []
        return [os.path.join(self.path, "config.json"), *extra, *sorted(set(self.weight_map.values()))]

    def _read_layer(self, index: int) -> Dict[str, torch.Tensor]:
        names = {ours: f"{self.prefix}{index}.{hf}" for ours, hf in HF_NAMES.items()}
        by_file: Dict[str, List[str]] = {}
        for ours, name in names.items():
            if name not in self.weight_map:
                raise LLMError(f"{self.path}: tensor {name} missing")
            by_file.setdefault(self.weight_map[name], []).append(ours)
        out = {}
        for fname, keys in by_file.items():
            with safe_open(fname, framework="pt") as f:
                for ours in keys:
                    out[ours] = f.get_tensor(names[ours]).to(torch.float32)
        shapes = self.config.layer_shapes()
        for key, heads in (("attention.wq.weight", self.config.n_heads),
                           ("attention.wk.weight", self.config.n_kv_heads)):
            if tuple(out[key].shape) == shapes[key]:   # a wrong shape is reported by read_layers
                out[key] = hf_to_meta_rows(out[key], heads)
        return out
