"""AIM v1: the autoregressive image model (El-Nouby et al., "Scalable Pre-training of Large
Autoregressive Image Models"), trunk and attentive probe as in apple/ml-aim (aim-v1, torch backend).

preprocessor: Conv2d patch embed (bias) -> LayerNorm -> + fixed 2D sin-cos positions of the input grid
trunk:        pre-norm blocks (LayerNorm, bias-free attention and GELU MLP), attention mask injected
head:         mean of the RAW outputs of the `probe_layers` blocks -> attentive pooling -> Linear

Module names are the official ones (preprocessor.patchifier.*, trunk.blocks.i.*, head.*), so released
backbone/head files load without renaming. The same trunk serves probing (no mask) and pre-training
(`model(x, attn_mask=prefix_causal_mask(...))`, `forward_trunk` for the decoder's input).
"""
from dataclasses import dataclass
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import Mlp
from timm.models._features import feature_take_indices

from ..layers import Attention, AttentivePoolingHead, Block, MeanTokenHead, PatchEmbed
from ..layers.pos_embed import sincos_2d
from .common import ClassifierContract, TokenTrunk


@dataclass
class AIMConfig:
    """AIM v1 hyper-parameters (timm names); the official sizes are registered by name."""
    img_size: Union[int, Tuple[int, int]] = 224
    patch_size: int = 14
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 1536
    depth: int = 24
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    norm_eps: float = 1e-6
    probe_layers: Union[int, Sequence[int]] = 6   # int K = the last K blocks; or 0-based block indices
    drop_path_rate: float = 0.0                   # not in the official model; for fine-tuning


class Patchifier(PatchEmbed):
    """Conv patch embed then LayerNorm. (B, C, H, W) -> (B, H/p * W/p, D), raster order."""

    def __init__(self, img_size, patch_size: int, in_chans: int, embed_dim: int, norm_eps: float):
        super().__init__(img_size, patch_size, in_chans, embed_dim, bias=True)
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))


class Preprocessor(nn.Module):
    """Patch tokens plus the 2D sin-cos table of the actual input grid (no parameters for positions)."""

    def __init__(self, cfg: AIMConfig):
        super().__init__()
        self.patchifier = Patchifier(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patchifier(x)
        ph, pw = self.patchifier.patch_size
        pos = sincos_2d(tokens.shape[-1], x.shape[-2] // ph, x.shape[-1] // pw, device=x.device)
        return tokens + pos.to(tokens.dtype)


def build_block(cfg: AIMConfig, drop_path: float = 0.0) -> Block:
    """x + attn(LN(x), mask), x + mlp(LN(x)); all Linears bias-free, exact GELU."""
    dim = cfg.embed_dim
    attn = Attention(dim, cfg.num_heads, qkv_bias=cfg.qkv_bias, proj_bias=False)
    mlp = Mlp(dim, int(cfg.mlp_ratio * dim), act_layer=nn.GELU, bias=False)
    return Block(dim, attn, mlp, norm_layer=partial(nn.LayerNorm, eps=cfg.norm_eps), drop_path=drop_path)


class Trunk(nn.Module):
    """The blocks and the post-trunk norm (read only by the pre-training decoder, not by the probe)."""

    def __init__(self, cfg: AIMConfig):
        super().__init__()
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList([build_block(cfg, dpr[i]) for i in range(cfg.depth)])
        self.post_trunk_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)


def resolve_probe_layers(probe_layers: Union[int, Sequence[int]], depth: int) -> Tuple[int, ...]:
    """An int K -> the last K block indices; a list -> itself, checked to be in [0, depth)."""
    if isinstance(probe_layers, int):
        if not 1 <= probe_layers <= depth:
            raise ValueError(f"probe_layers={probe_layers} must be between 1 and depth={depth}")
        return tuple(range(depth - probe_layers, depth))
    layers = tuple(int(i) for i in probe_layers)
    if not layers or any(not 0 <= i < depth for i in layers):
        raise ValueError(f"probe_layers {list(layers)} must be non-empty 0-based block indices below depth={depth}")
    return layers


class AIM(TokenTrunk, ClassifierContract, nn.Module):
    """AIM v1 classifier with the attentive probe. forward: (B, C, H, W) -> (B, num_classes).

    `forward_features` returns the head input: the mean of the raw (un-normed) outputs of the probe
    layers, (B, N, D) in raster order; AIM has no final norm on that path. Only the blocks up to the
    deepest probe layer run.
    """

    supports_meta_init = True   # no state outside the state dict: safe to build on 'meta' and load with assign
    stem_pattern = r"^preprocessor"
    blocks_pattern = r"^trunk\.blocks\.(\d+)"

    def __init__(self, cfg: Optional[AIMConfig] = None, **kwargs):
        super().__init__()
        cfg = cfg or AIMConfig(**kwargs)
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.num_features = self.embed_dim = cfg.embed_dim
        self.in_chans = cfg.in_chans
        self.num_prefix_tokens = 0
        self.probe_layers = resolve_probe_layers(cfg.probe_layers, cfg.depth)
        self.grad_checkpointing = False
        self.preprocessor = Preprocessor(cfg)
        self.trunk = Trunk(cfg)
        self.head = AttentivePoolingHead(cfg.embed_dim, cfg.num_classes, cfg.num_heads, bn_eps=cfg.norm_eps)
        self.feature_info = self.feature_info_of(self.trunk.blocks, cfg.patch_size)
        self._init_weights()
        # the classifier never reads the post-trunk norm (the official design): frozen here, trained by
        # pre-training through forward_trunk (set_post_trunk_norm_trainable)
        self.set_post_trunk_norm_trainable(False)

    def set_post_trunk_norm_trainable(self, enable: bool = True) -> None:
        """Whether the post-trunk norm (read by forward_trunk, the pre-training path only) is trained."""
        self.trunk.post_trunk_norm.requires_grad_(enable)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.preprocessor.patchifier.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))   # the patch conv as a Linear, as MAE and AIM do

    # --- timm contract (set_grad_checkpointing in ClassifierContract) ---------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"head.cls_token"}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.linear

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset_classifier(num_classes)

    def checkpoint_filter(self, state_dict: dict) -> dict:
        """Official AIM keys -> ours: a DDP 'module.' prefix stripped, the blocks' norm_1 / norm_2 named
        norm1 / norm2 (our one block), BatchNorm's counter kept an integer (some exports store it as
        float, which `load_state_dict(assign=True)` would keep)."""
        out = {}
        for k, v in state_dict.items():
            k = k.removeprefix("module.").replace(".norm_1.", ".norm1.").replace(".norm_2.", ".norm2.")
            if k.endswith("num_batches_tracked"):
                v = v.long()
            out[k] = v
        return out

    # --- forward (TokenTrunk) ------------------------------------------------------------------
    def trunk_blocks(self) -> nn.ModuleList:
        return self.trunk.blocks

    def final_layers(self) -> Tuple[int, ...]:
        return self.probe_layers

    def finish(self, outputs: Dict[int, torch.Tensor], attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return torch.stack([outputs[i] for i in self.probe_layers]).mean(dim=0)

    def intermediate_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.trunk.post_trunk_norm(tokens)

    def embed(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None):
        """Images (B, C, H, W) -> (patch tokens with positions (B, N, D), block arguments, patch grid)."""
        tokens = self.preprocessor(x)
        n = tokens.shape[1]
        if attn_mask is not None and tuple(attn_mask.shape[-2:]) != (n, n):
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not fit {n} tokens; expected "
                             f"(N, N) or (B, 1, N, N) with N = {n}")
        return tokens, {"attn_mask": attn_mask}, self.patch_grid(x)

    def patch_grid(self, x: torch.Tensor) -> Tuple[int, int]:
        ph, pw = self.preprocessor.patchifier.patch_size
        return x.shape[-2] // ph, x.shape[-1] // pw

    def forward_trunk(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, C, H, W) -> post_trunk_norm(last block) (B, N, D): what the pre-training decoder reads (call
        set_post_trunk_norm_trainable() to train the norm)."""
        last = len(self.trunk.blocks) - 1
        return self.trunk.post_trunk_norm(self.run_trunk(x, attn_mask, {last}, last)[0][last])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Head input (B, N, D) -> logits (B, num_classes), or the pooled (B, D) with pre_logits."""
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, attn_mask))

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the blocks after the last taken index; the probe then averages the probe layers that are left
        (or the last block kept)."""
        take, max_index = feature_take_indices(len(self.trunk.blocks), indices)
        self.trunk.blocks = self.trunk.blocks[:max_index + 1]
        self.probe_layers = tuple(i for i in self.probe_layers if i <= max_index) or (max_index,)
        if prune_norm:
            self.trunk.post_trunk_norm = nn.Identity()
        if prune_head:   # the attentive pooling goes with the classifier: forward gives the mean token
            self.head, self.num_classes = MeanTokenHead(), 0
        return take
