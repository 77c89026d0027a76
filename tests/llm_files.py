"""Tiny LLaMA checkpoints written by the tests in each format, from one Meta-layout reference.

Each writer follows the real converters' conventions, written out here independently of
llamavit.llm: Meta model-parallel shards (column-parallel Linears split on dim 0, row-parallel on
dim 1, norms replicated), Hugging Face's q/k "rotate-half" row permutation, and llama.cpp's
converter, which applies its own permutation to the HF tensors.
"""
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import save_file

KEYS = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
        "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight", "attention_norm.weight",
        "ffn_norm.weight")
HF = {"attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
      "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
      "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w2.weight": "mlp.down_proj.weight",
      "feed_forward.w3.weight": "mlp.up_proj.weight", "attention_norm.weight": "input_layernorm.weight",
      "ffn_norm.weight": "post_attention_layernorm.weight"}
GGUF = {"attention.wq.weight": "attn_q", "attention.wk.weight": "attn_k", "attention.wv.weight": "attn_v",
        "attention.wo.weight": "attn_output", "feed_forward.w1.weight": "ffn_gate",
        "feed_forward.w2.weight": "ffn_down", "feed_forward.w3.weight": "ffn_up",
        "attention_norm.weight": "attn_norm", "ffn_norm.weight": "ffn_norm"}


@dataclass
class TinyLLM:
    """A random LLaMA with grouped-query attention (4 query heads, 2 KV heads by default)."""
    dim: int = 32
    n_layers: int = 3
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_hidden: int = 96     # = multiple_of * ceil(int(8 * dim / 3) / multiple_of), multiple_of 32
    norm_eps: float = 1e-5
    seed: int = 7

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    def layers(self):
        """[{Meta name: float32 tensor}] per layer; norms around 1, weights ~0.1."""
        g = torch.Generator().manual_seed(self.seed)
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        shapes = {"attention.wq.weight": (q, self.dim), "attention.wk.weight": (kv, self.dim),
                  "attention.wv.weight": (kv, self.dim), "attention.wo.weight": (self.dim, q),
                  "feed_forward.w1.weight": (self.ffn_hidden, self.dim),
                  "feed_forward.w2.weight": (self.dim, self.ffn_hidden),
                  "feed_forward.w3.weight": (self.ffn_hidden, self.dim)}
        out = []
        for _ in range(self.n_layers):
            layer = {k: 0.1 * torch.randn(s, generator=g) for k, s in shapes.items()}
            layer["attention_norm.weight"] = 1 + 0.1 * torch.randn(self.dim, generator=g)
            layer["ffn_norm.weight"] = 1 + 0.1 * torch.randn(self.dim, generator=g)
            out.append(layer)
        return out


def hf_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """transformers' convert_llama_weights_to_hf permutation (Meta -> HF rows)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf LlamaModel.permute, applied to HF q/k tensors."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_meta(path, llm: TinyLLM, shards: int = 1, multiple_of: int = 32, dtype=torch.float16, extra=None):
    """Meta consolidated.NN.pth shards + params.json."""
    os.makedirs(path, exist_ok=True)
    params = {"dim": llm.dim, "n_layers": llm.n_layers, "n_heads": llm.n_heads, "n_kv_heads": llm.n_kv_heads,
              "multiple_of": multiple_of, "norm_eps": llm.norm_eps, "vocab_size": -1, **(extra or {})}
    with open(os.path.join(path, "params.json"), "w") as f:
        json.dump(params, f)
    parts = [{} for _ in range(shards)]
    for i, layer in enumerate(llm.layers()):
        for k, v in layer.items():
            dim = None if v.ndim == 1 else (1 if k in ("attention.wo.weight", "feed_forward.w2.weight") else 0)
            chunks = [v] * shards if dim is None else v.chunk(shards, dim=dim)
            for part, c in zip(parts, chunks):
                part[f"layers.{i}.{k}"] = c.to(dtype).clone()
    for s, part in enumerate(parts):
        part["norm.weight"] = torch.ones(llm.dim, dtype=dtype)
        torch.save(part, os.path.join(path, f"consolidated.{s:02d}.pth"))
    return path


def write_hf(path, llm: TinyLLM, files: int = 1, model_type: str = "llama"):
    """config.json + safetensors (q/k rows permuted the HF way); several files come with the index."""
    os.makedirs(path, exist_ok=True)
    arch = "LlamaForCausalLM" if model_type == "llama" else "OtherForCausalLM"
    cfg = {"architectures": [arch], "model_type": model_type, "hidden_size": llm.dim,
           "num_hidden_layers": llm.n_layers, "num_attention_heads": llm.n_heads,
           "num_key_value_heads": llm.n_kv_heads, "intermediate_size": llm.ffn_hidden, "rms_norm_eps": llm.norm_eps,
           "rope_theta": 10000.0}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    tensors = {"model.embed_tokens.weight": torch.zeros(8, llm.dim), "model.norm.weight": torch.ones(llm.dim)}
    for i, layer in enumerate(llm.layers()):
        for k, v in layer.items():
            if k == "attention.wq.weight":
                v = hf_permute(v, llm.n_heads)
            elif k == "attention.wk.weight":
                v = hf_permute(v, llm.n_kv_heads)
            tensors[f"model.layers.{i}.{HF[k]}"] = v.to(torch.bfloat16)
    names = sorted(tensors)
    if files == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"))
        return path
    weight_map = {}
    for j in range(files):
        fname = f"model-{j + 1:05d}-of-{files:05d}.safetensors"
        chunk = {n: tensors[n] for n in names[j::files]}
        save_file(chunk, os.path.join(path, fname))
        weight_map.update({n: fname for n in chunk})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return path


def write_gguf(path, llm: TinyLLM, qtype: str = "F32", arch: str = "llama"):
    """A GGUF file the way llama.cpp's converter writes one from the HF checkpoint: HF tensors, q/k
    re-permuted by llama.cpp, weights quantised to `qtype` (norms stay F32)."""
    import gguf
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(llm.n_layers)
    w.add_embedding_length(llm.dim)
    w.add_feed_forward_length(llm.ffn_hidden)
    w.add_head_count(llm.n_heads)
    w.add_head_count_kv(llm.n_kv_heads)
    w.add_layer_norm_rms_eps(llm.norm_eps)
    w.add_rope_freq_base(10000.0)
    qt = gguf.GGMLQuantizationType[qtype]
    for i, layer in enumerate(llm.layers()):
        for k, v in layer.items():
            a = v.numpy()
            if k == "attention.wq.weight":
                a = llama_cpp_permute(hf_permute(v, llm.n_heads).numpy(), llm.n_heads)
            elif k == "attention.wk.weight":
                a = llama_cpp_permute(hf_permute(v, llm.n_kv_heads).numpy(), llm.n_kv_heads)
            name = f"blk.{i}.{GGUF[k]}.weight"
            if a.ndim == 1 or qtype == "F32":
                w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float32))
            elif qtype == "F16":
                w.add_tensor(name, np.ascontiguousarray(a, dtype=np.float16))
            else:
                w.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(a, dtype=np.float32), qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_roundtrip(t: torch.Tensor, qtype: str) -> torch.Tensor:
    """What a weight becomes after quantising to qtype and back (the exact expected read value)."""
    import gguf
    if qtype == "F32" or t.ndim == 1:
        return t.clone()
    if qtype == "F16":
        return t.half().float()
    qt = gguf.GGMLQuantizationType[qtype]
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(t.numpy(), qt), qt).astype(np.float32))
