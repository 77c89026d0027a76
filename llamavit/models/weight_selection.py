"""Initialise an iLLaMA or plain VisionLLaMA trunk from a LLaMA-architecture LLM by weight selection.

The idea of techmonsterwang/iLLaMA `llama2/weight_selection.py` (after Xu et al., "Initializing Models
with Larger Ones"): each weight of a student block is a uniformly strided sub-tensor of the matching
weight of one LLM layer. What follows the official code:
- the element rule of `uniform_indices` (a stride when the sizes divide, else rounded linspace);
- the layer rule 'first': student block i takes LLM layer i (the official script takes the first 12 of
  LLaMA-2-7B's 32 layers);
- what is copied: both norm weights, the q/k/v and output projections, the SwiGLU's gate, up and down
  matrices. Everything else keeps the model's own init: Linear biases, patch embedding, class token,
  positions, final norm, head, and VisionLLaMA's LayerNorm biases (zero) and layer scale.
Where it differs, and why:
- the official code stacks q, k, v and selects rows of the stack, which with grouped-query attention
  would hand the student's query rows part of the LLM's keys; here q, k and v are selected one by one;
- selection is per head: whole heads, and inside a head whole RoPE pairs (Meta's interleaved rows
  (2i, 2i+1)), so a student head's q.k is a partial sum of one LLM head's q.k. The official code
  strides over the rows of Hugging Face's rotate-half order, which splits pairs;
- grouped-query attention: the LLM's k and v heads are repeated to n_heads (query head h uses kv head
  h // (n_heads / n_kv_heads), as the LLM computes it) before the heads are selected, so student head h
  gets the q, k and v of the same LLM head;
- the default layer rule is 'even': the blocks are spread over the LLM's depth with the element rule
  (30 layers to 12 blocks: 0, 3, 5, ..., 29), so a shallow student takes late layers too.
"""
from typing import Dict, List, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..layers import Attention, SwiGLU
from ..llm import LLMConfig, llm_fingerprint, meta_to_hf_rows, open_llm, resolve_layers
from .illama import ILLaMA
from .visionllama import VisionLLaMA

SUPPORTED = (ILLaMA, VisionLLaMA)
LAYER_RULES = ("first", "even")


def uniform_indices(size: int, target: int) -> torch.Tensor:
    """The `target` indices (int64) kept from a dimension of `size`.

    When target divides size: 0, s, 2s, ... with s = size // target (the first of each group of s).
    Otherwise: round(linspace(0, size - 1, target)) (torch.round, ties to even), first and last kept.
    """
    if not 0 < target <= size:
        raise ValueError(f"cannot select {target} of {size} elements (need 0 < target <= size)")
    if size % target == 0:
        return torch.arange(target) * (size // target)
    return torch.linspace(0, size - 1, target).round().to(torch.int64)


def uniform_select(weight: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Sub-tensor of `weight` with `shape`: `uniform_indices` along every dimension independently.

    weight (T0, T1, ...) -> (S0, S1, ...) with S_i <= T_i. E.g. arange(24).view(6, 4) -> (3, 2) keeps rows
    0, 2, 4 and columns 0, 2.
    """
    shape = tuple(shape)
    if weight.dim() != len(shape):
        raise ValueError(f"cannot select shape {shape} from a {weight.dim()}-d tensor of shape {tuple(weight.shape)}")
    for dim, (size, target) in enumerate(zip(weight.shape, shape)):
        if target > size:
            raise ValueError(f"cannot select shape {shape} from {tuple(weight.shape)}: dimension {dim} is {target} > "
                             f"{size}")
        weight = weight.index_select(dim, uniform_indices(size, target).to(weight.device))
    return weight


def choose_layers(layers: Union[str, Sequence[int]], depth: int, n_layers: int, source: str) -> List[int]:
    """LLM layer index for each of `depth` student blocks: 'first' (0..depth-1, the official rule),
    'even' (`uniform_indices(n_layers, depth)`), or an explicit list of `depth` indices (negative from the end)."""
    if isinstance(layers, str):
        if layers not in LAYER_RULES:
            raise ValueError(f"unknown layer rule {layers!r}; expected one of {LAYER_RULES} or a list of indices")
        if depth > n_layers:
            raise ValueError(f"the model has {depth} blocks but {source} has {n_layers} layers; pass layers=[...] "
                             f"({depth} indices, repeats allowed)")
        return list(range(depth)) if layers == "first" else uniform_indices(n_layers, depth).tolist()
    if len(layers) != depth:
        raise ValueError(f"layers has {len(layers)} indices but the model has {depth} blocks")
    return resolve_layers(layers, n_layers, source)


def select_attention(layer: Dict[str, torch.Tensor], cfg: LLMConfig, num_heads: int, head_dim: int, dim: int,
                     rope_layout: str = "interleaved") -> Tuple[torch.Tensor, torch.Tensor]:
    """One LLM layer's attention (Meta layout) -> our fused qkv weight (3 * H * d, D) and proj weight (D, H * d).

    Heads, then RoPE pairs inside each head, then input channels are selected (module docstring); q/k rows
    come out in `rope_layout` order.
    """
    group = cfg.n_heads // cfg.n_kv_heads
    pairs = (cfg.head_dim // 2, 2)
    q = layer["attention.wq.weight"].view(cfg.n_heads, *pairs, cfg.dim)
    k = layer["attention.wk.weight"].view(cfg.n_kv_heads, *pairs, cfg.dim).repeat_interleave(group, dim=0)
    v = layer["attention.wv.weight"].view(cfg.n_kv_heads, cfg.head_dim, cfg.dim).repeat_interleave(group, dim=0)
    o = layer["attention.wo.weight"].view(cfg.dim, cfg.n_heads, cfg.head_dim)
    rows = num_heads * head_dim
    q, k = (uniform_select(w, (num_heads, head_dim // 2, 2, dim)).reshape(rows, dim) for w in (q, k))
    if rope_layout == "half":
        q, k = meta_to_hf_rows(q, num_heads), meta_to_hf_rows(k, num_heads)
    v = uniform_select(v, (num_heads, head_dim, dim)).reshape(rows, dim)
    o = uniform_select(o, (dim, num_heads, head_dim)).reshape(dim, rows)
    return torch.cat((q, k, v)), o


def select_block(layer: Dict[str, torch.Tensor], cfg: LLMConfig, block: nn.Module) -> Dict[str, torch.Tensor]:
    """{parameter name inside the block: selected tensor} for one student block from one LLM layer."""
    attn, mlp = block.attn, block.mlp
    dim, hidden = block.norm1.weight.shape[0], mlp.fc1_g.out_features
    qkv, proj = select_attention(layer, cfg, attn.num_heads, attn.head_dim, dim, attn.rope_layout)
    return {"norm1.weight": uniform_select(layer["attention_norm.weight"], (dim,)),
            "norm2.weight": uniform_select(layer["ffn_norm.weight"], (dim,)),
            "attn.qkv.weight": qkv, "attn.proj.weight": proj,
            "mlp.fc1_g.weight": uniform_select(layer["feed_forward.w1.weight"], (hidden, dim)),
            "mlp.fc1_x.weight": uniform_select(layer["feed_forward.w3.weight"], (hidden, dim)),
            "mlp.fc2.weight": uniform_select(layer["feed_forward.w2.weight"], (dim, hidden))}


def check_family(model: nn.Module) -> None:
    """Raise ValueError unless `model` is an iLLaMA / plain VisionLLaMA whose blocks have SwiGLU MLPs."""
    if not isinstance(model, SUPPORTED):
        raise ValueError(f"weight selection from an LLM initialises {' and '.join(c.__name__ for c in SUPPORTED)} "
                         f"models; got {type(model).__name__}")
    block = model.blocks[0]
    if not isinstance(block.attn, Attention) or not isinstance(block.mlp, SwiGLU):
        raise ValueError(f"weight selection needs blocks with fused-qkv attention and a SwiGLU MLP; this "
                         f"{type(model).__name__} has {type(block.mlp).__name__} (use mlp='swiglu')")
    attn = block.attn
    if attn.num_kv_heads != attn.num_heads or attn.head_dim % 2:
        raise ValueError(f"weight selection needs num_kv_heads == num_heads and an even head_dim; got "
                         f"{attn.num_kv_heads} kv heads of {attn.num_heads}, head_dim {attn.head_dim}")


def check_widths(model: nn.Module, cfg: LLMConfig, source: str) -> None:
    """Raise ValueError naming the first dimension in which the student is wider than the LLM."""
    block = model.blocks[0]
    attn = block.attn
    widths = (("embed_dim", model.embed_dim, "dim", cfg.dim), ("num_heads", attn.num_heads, "n_heads", cfg.n_heads),
              ("head_dim", attn.head_dim, "head_dim", cfg.head_dim),
              ("SwiGLU hidden width", block.mlp.fc1_g.out_features, "ffn_hidden", cfg.ffn_hidden))
    for name, ours, llm_name, theirs in widths:
        if ours > theirs:
            raise ValueError(f"the student is wider than the LLM: {name} {ours} > the LLM's {llm_name} {theirs} "
                             f"({source}); weight selection only shrinks")


@torch.no_grad()
def select_from_llm(model: nn.Module, llm: str = "smollm2", layers: Union[str, Sequence[int]] = "even") -> dict:
    """Overwrite the block weights of an iLLaMA / plain VisionLLaMA `model` (in place) by weight selection.

    llm: 'smollm2', a Meta dir, a Hugging Face dir or a .gguf file. layers: 'even' (spread over the LLM's
    depth), 'first' (block i <- LLM layer i, the official rule), or one LLM layer index per block.
    Returns {'llm_path', 'llm_sha256', 'layers' (index per block), 'set' and 'left_at_init' (parameter names)}.
    """
    check_family(model)
    reader = open_llm(llm)
    cfg = reader.config
    check_widths(model, cfg, reader.path)
    indices = choose_layers(layers, len(model.blocks), cfg.n_layers, reader.path)
    by_layer = dict(zip(sorted(set(indices)), reader.read_layers(sorted(set(indices)))))
    params = dict(model.named_parameters())
    done = []
    for i, (block, index) in enumerate(zip(model.blocks, indices)):
        for name, value in select_block(by_layer[index], cfg, block).items():
            target = params[f"blocks.{i}.{name}"]
            target.copy_(value.to(device=target.device, dtype=target.dtype))
            done.append(f"blocks.{i}.{name}")
    copied = set(done)
    return {"llm_path": reader.path, "llm_sha256": llm_fingerprint(reader), "layers": indices, "set": done,
            "left_at_init": [n for n in params if n not in copied]}
