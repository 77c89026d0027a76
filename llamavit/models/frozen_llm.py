"""The frozen LLM block of Pang et al. ("Frozen Transformers in Language Models Are Effective Visual Encoder
Layers"), as a part any encoder can hold: `llama_dim_mapper1` Linear(D -> Dllm) -> `llama` (frozen LLaMA decoder
layers, no mask, no RoPE, then a frozen RMSNorm) -> `llama_dim_mapper2` Linear(Dllm -> D), the official key names.

Where the block comes from (`llm_path`): a Meta dir, a Hugging Face dir, a .gguf file or 'smollm2' (read from the
file; our checkpoints store the file's sha256 and the layer indices instead of the weights), 'random' (a
deliberately random block of the configured shape, the paper's control, saved like any weight) or None (an
untrained block of the configured shape that warns when used, unless a checkpoint storing `llama.layers.*`
fills it). `FrozenLLMPath` is the mixin that gives a model the three parts and `forward_llm`.
"""
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.layers import trunc_normal_

from ..errors import CheckpointError
from ..layers import run_blocks
from ..layers.llama_block import llama_decoder_block, meta_to_block_key
from ..layers.norm import RMSNorm
from ..llm import LLMConfig, LLMReader, llm_fingerprint, open_llm, resolve_layers

RANDOM = "random"


@dataclass
class FrozenLLMOptions:
    """Where an encoder's frozen block comes from, and its shape when it is not read from a file (defaults:
    LLaMA-1 7B). An encoder config inherits these fields."""
    llm_path: Optional[str] = None    # Meta dir | HF dir | .gguf | 'smollm2' | 'random' | None (see the module)
    llm_layers: Optional[Sequence[int]] = None   # LLM layer indices (negative: from the end); None = last
    llm_dim: int = 4096
    llm_num_heads: int = 32
    llm_num_kv_heads: Optional[int] = None
    llm_ffn_hidden: int = 11008
    llm_norm_eps: float = 1e-6
    llm_num_layers: int = 32

    def llm_shape(self) -> LLMConfig:
        """The frozen block's shape when it is not read from a file."""
        return LLMConfig(dim=self.llm_dim, n_layers=self.llm_num_layers, n_heads=self.llm_num_heads,
                         n_kv_heads=self.llm_num_kv_heads or self.llm_num_heads, ffn_hidden=self.llm_ffn_hidden,
                         norm_eps=self.llm_norm_eps)


SMOLLM2_SHAPE = dict(llm_dim=576, llm_num_heads=9, llm_num_kv_heads=3, llm_ffn_hidden=1536, llm_norm_eps=1e-5,
                     llm_num_layers=30)   # SmolLM2-135M: the registered encoders' default block


class FrozenLLM(nn.Module):
    """`llama.layers` (frozen LLaMA decoder layers) and `llama.norm` (frozen RMSNorm).
    (B, N, Dllm) -> (B, N, Dllm). `source`: 'file' | 'random' | 'untrained' | 'checkpoint'."""

    def __init__(self, config: LLMConfig, layer_ids: List[int], source: str):
        super().__init__()
        self.config, self.source = config, source
        self.path: Optional[str] = None
        self.layers = nn.ModuleList([
            llama_decoder_block(config.dim, config.n_heads, config.n_kv_heads, config.ffn_hidden, config.norm_eps,
                                config.head_dim) for _ in layer_ids])
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        # identify the block in our checkpoints instead of storing it (zeros: not from a file)
        self.register_buffer("llm_sha256", torch.zeros(32, dtype=torch.uint8))
        self.register_buffer("llm_layers", torch.tensor(layer_ids, dtype=torch.int64))
        for m in self.layers.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)   # the official random block: timm's ViT init
        self.requires_grad_(False)
        self.register_state_dict_post_hook(_drop_file_layers)
        self.register_load_state_dict_pre_hook(_adapt_loaded)
        self.register_load_state_dict_post_hook(_forgive_file_layers)

    @torch.no_grad()
    def load_from(self, reader: LLMReader, layer_ids: List[int]) -> None:
        """Copy the LLM layers into the frozen block and record the file's fingerprint."""
        for layer, weights in zip(self.layers, reader.read_layers(layer_ids)):
            weights = {meta_to_block_key(k): v for k, v in weights.items()}
            for name, p in layer.named_parameters():
                p.copy_(weights[name])
        self.llm_sha256.copy_(torch.tensor(list(bytes.fromhex(llm_fingerprint(reader))), dtype=torch.uint8))
        self.source, self.path = "file", reader.path

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """attn_mask None (the official block: every token sees all) or a boolean SDPA mask for every layer."""
        return self.norm(run_blocks(self.layers, x, attn_mask=attn_mask))


def _hex(t: torch.Tensor) -> str:
    return bytes(t.tolist()).hex()


def _drop_file_layers(module: FrozenLLM, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict hook: a block read from a file is referenced by sha256, not stored."""
    if module.source == "file":
        for k in [k for k in state_dict if k.startswith(prefix + "layers.")]:
            del state_dict[k]


def _forgive_file_layers(module: FrozenLLM, incompatible_keys) -> None:
    if module.source == "file":
        prefix = getattr(module, "_load_prefix", "llama.")
        incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys
                                             if not k.startswith(prefix + "layers.")]


def _adapt_loaded(module: FrozenLLM, state_dict: dict, prefix: str, *args) -> None:
    module._load_prefix = prefix
    adapt_llm_state(module, state_dict, prefix)


def adapt_llm_state(module: FrozenLLM, sd: dict, prefix: str = "llama.") -> dict:
    """Check an incoming state dict's frozen-LLM entries against the model (in place), one clear error
    for each way they can disagree; drop stored layers that the model's LLM file already provides."""
    sha_key, ids_key = prefix + "llm_sha256", prefix + "llm_layers"
    given_name = _rename_meta_layer_keys(sd, prefix + "layers.")
    layer_keys = [k for k in sd if k.startswith(prefix + "layers.")]
    mine_ids = module.llm_layers.tolist()
    if sha_key in sd and any(sd[sha_key].tolist()):
        theirs, theirs_ids = _hex(sd[sha_key]), sd[ids_key].tolist() if ids_key in sd else "?"
        if module.source != "file":
            raise CheckpointError(f"the checkpoint references its frozen LLM block (layers {theirs_ids} of the LLM "
                                  f"with sha256 {theirs[:16]}…) without storing it: build the model with "
                                  f"llm_path=<that LLM checkpoint>, llm_layers={theirs_ids}")
        if theirs != _hex(module.llm_sha256):
            raise CheckpointError(f"the checkpoint was trained with the LLM of sha256 {theirs[:16]}…, but llm_path "
                                  f"{module.path} has sha256 {_hex(module.llm_sha256)[:16]}…: pass the LLM file the "
                                  f"model was trained with")
        if theirs_ids != mine_ids:
            raise CheckpointError(f"the checkpoint was trained with LLM layers {theirs_ids}, this model takes "
                                  f"{mine_ids}: pass llm_layers={theirs_ids}")
    if sha_key not in sd or not any(sd[sha_key].tolist()):
        sd[sha_key], sd[ids_key] = module.llm_sha256.clone(), module.llm_layers.clone()
    if module.source == "file":
        params = dict(module.named_parameters())
        for k in layer_keys:
            mine, theirs = params.get(k[len(prefix):]), sd.pop(k)
            if mine is None or mine.is_meta:
                continue
            if mine.shape != theirs.shape or not torch.allclose(theirs.float(), mine, rtol=2e-3, atol=1e-6):
                raise CheckpointError(f"the checkpoint stores a frozen LLM block whose {given_name.get(k, k)} differs "
                                      f"from layer {mine_ids} of {module.path}: build the model with llm_path=None to "
                                      f"use the checkpoint's own block, or pass the LLM it was trained with")
    elif layer_keys:
        module.source = "checkpoint"
    elif module.source in ("untrained", "checkpoint"):
        raise CheckpointError(f"the checkpoint does not store the frozen LLM block ({prefix}layers.*) and the model "
                              f"was built without an LLM: pass llm_path=<Meta dir | HF dir | .gguf>")
    return sd


def _rename_meta_layer_keys(sd: dict, prefix: str) -> Dict[str, str]:
    """In place: `<prefix>{j}.attention.wq.weight` (Meta's layer names: official checkpoints and ours before
    the layers became Blocks) -> `<prefix>{j}.attn.wq.weight`; -> {new name: the name in the checkpoint}."""
    renamed = {}
    for k in [k for k in sd if k.startswith(prefix)]:
        index, _, rest = k[len(prefix):].partition(".")
        new = f"{prefix}{index}.{meta_to_block_key(rest)}"
        if new != k:
            sd[new] = sd.pop(k)
            renamed[new] = k
    return renamed


def llm_block_source(options: FrozenLLMOptions) -> Tuple[Optional[LLMReader], LLMConfig, List[int]]:
    """(reader or None, shape of the LLM, resolved layer indices): the file's shape when `llm_path` names a file,
    else the configured one (for 'random' and None)."""
    if options.llm_path not in (None, RANDOM):
        reader = open_llm(options.llm_path)
        return reader, reader.config, resolve_layers(options.llm_layers, reader.config.n_layers, reader.path)
    shape = options.llm_shape()
    return None, shape, resolve_layers(options.llm_layers, shape.n_layers, "the configured LLM shape")


class FrozenLLMPath:
    """Mixin for an nn.Module encoder: `init_frozen_llm` adds llama_dim_mapper1, llama (FrozenLLM) and
    llama_dim_mapper2; `forward_llm` runs them; `llm_source` says where the block came from."""

    def init_frozen_llm(self, embed_dim: int, options: FrozenLLMOptions) -> None:
        """Add the frozen path for tokens of width embed_dim, its block from `options`."""
        reader, llm, layer_ids = llm_block_source(options)
        self.llm_config = llm
        source = "file" if reader is not None else (RANDOM if options.llm_path == RANDOM else "untrained")
        self.llama_dim_mapper1 = nn.Linear(embed_dim, llm.dim, bias=False)
        self.llama = FrozenLLM(llm, layer_ids, source)
        self.llama_dim_mapper2 = nn.Linear(llm.dim, embed_dim, bias=False)
        trunc_normal_(self.llama_dim_mapper1.weight, std=0.02)
        trunc_normal_(self.llama_dim_mapper2.weight, std=0.02)
        if reader is not None:
            if self.llama_dim_mapper1.weight.is_meta:   # shapes only (`llamavit info`): nothing to read
                self.llama.path = reader.path
            else:
                self.llama.load_from(reader, layer_ids)
        self._warned_untrained = False

    @property
    def llm_source(self) -> Dict[str, object]:
        """Where the frozen block comes from: source, path, sha256 (file only), layer indices, shape."""
        out = {"source": self.llama.source, "layers": self.llama.llm_layers.tolist(),
               "dim": self.llm_config.dim, "n_heads": self.llm_config.n_heads,
               "n_kv_heads": self.llm_config.n_kv_heads, "ffn_hidden": self.llm_config.ffn_hidden}
        if self.llama.source == "file":
            sha = None if self.llama.llm_sha256.is_meta else _hex(self.llama.llm_sha256)
            out.update(path=self.llama.path, sha256=sha)
        return out

    def forward_llm(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The frozen path: tokens (B, N, D) -> mapper1 -> LLM layers -> llama.norm -> mapper2 -> (B, N, D)."""
        if self.llama.source == "untrained" and not self._warned_untrained and x.device.type != "meta":
            self._warned_untrained = True
            warnings.warn(f"{type(self).__name__}: the frozen LLM block is UNTRAINED (random weights, "
                          f"dim {self.llm_config.dim}): pass llm_path=<Meta dir | HF dir | .gguf> or load a checkpoint "
                          f"that stores llama.layers.*; use llm_path='random' for a deliberate random control",
                          stacklevel=3)
        return self.llama_dim_mapper2(self.llama(self.llama_dim_mapper1(x), attn_mask))


def make_standalone(model: nn.Module, model_args: Dict[str, Any]) -> Dict[str, Any]:
    """In place, for files that must stand alone (a timm folder): a frozen block read from an LLM file becomes an
    ordinary stored weight of `model` (its state dict then holds the layers; our checkpoints reference the file by
    sha256 instead, which is cleared) -> the construction kwargs that rebuild the block without the file (llm_path
    None, its shape and layer indices). Other models are left as they are and get `model_args` back."""
    block = next((m for m in model.modules() if isinstance(m, FrozenLLM)), None)
    if block is None or block.source != "file":
        return dict(model_args)
    shape = block.config
    if shape.head_dim != shape.dim // shape.n_heads:
        raise ValueError(f"the frozen LLM block has head_dim {shape.head_dim} != dim / heads "
                         f"({shape.dim} / {shape.n_heads}): no construction option gives that shape")
    with torch.no_grad():
        block.llm_sha256.zero_()
    block.source, block.path = "checkpoint", None
    return {**model_args, "llm_path": None, "llm_layers": block.llm_layers.tolist(), "llm_dim": shape.dim,
            "llm_num_heads": shape.n_heads, "llm_num_kv_heads": shape.n_kv_heads, "llm_ffn_hidden": shape.ffn_hidden,
            "llm_norm_eps": shape.norm_eps, "llm_num_layers": shape.n_layers}
