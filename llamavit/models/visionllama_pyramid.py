"""VisionLLaMA, pyramid form: Twins-SVT with VisionLLaMA blocks, 2D RoPE instead of the PEG.

Four stages, each: strided-conv patch embed + LayerNorm, then blocks alternating locally-grouped
window attention (even index, window-local RoPE positions) and global sub-sampled attention (odd
index, RoPE on queries at their grid positions and on the sub-sampled keys at the official
positions, see `gsa_key_positions`). No class token; head = Linear(norm(mean(norm(tokens)))), the same
LayerNorm twice as in the official code. Matches Meituan-AutoML/VisionLLaMA deit/my_models.py
(PyramidVisionLLaMA + GroupBlock) numerically, at any input size whose stages stay non-empty.
"""
import collections
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.models._features import feature_take_indices

from ..layers import Rope2D, SubsampledAttention, WindowAttention, run_blocks, swiglu_hidden_dim
from ..layers.patch_embed import check_images
from .common import ClassifierContract, init_linear
from .visionllama import build_block, convert_official  # the same block and official -> ours key mapping


@dataclass
class VisionLLaMAPyramidConfig:
    """Pyramid VisionLLaMA hyper-parameters, per stage (timm's Twins names)."""
    img_size: Union[int, Tuple[int, int]] = 224
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    embed_dims: Sequence[int] = (64, 128, 256, 512)
    depths: Sequence[int] = (2, 2, 10, 4)
    num_heads: Sequence[int] = (2, 4, 8, 16)
    mlp_ratio: float = 4.0
    mlp_multiple_of: int = 256
    qkv_bias: bool = True
    wss: Sequence[int] = (7, 7, 7, 7)          # window size of the locally-grouped attention per stage
    sr_ratios: Sequence[int] = (8, 4, 2, 1)    # key/value sub-sampling of the global attention per stage
    norm_eps: float = 1e-5
    init_values: Optional[float] = 1e-4
    global_pool: str = "avg"
    rope_theta: float = 10000.0
    rope_auto_scale: bool = False   # global-attention positions * rope_ref_grid / stage grid height
    rope_ref_grid: int = 14
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0


class StageEmbed(nn.Module):
    """Strided conv + LayerNorm. (B, C, H, W) -> tokens (B, H/s * W/s, D) and the grid (H/s, W/s)."""

    def __init__(self, in_chans: int, embed_dim: int, stride: int, norm_eps: float):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=stride, stride=stride)
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        x = self.proj(x)
        grid = (x.shape[-2], x.shape[-1])
        return self.norm(x.flatten(2).transpose(1, 2)), grid


def build_group_block(dim: int, num_heads: int, mlp_hidden: int, window_size: Optional[int], sr_ratio: int,
                      qkv_bias: bool, norm_eps: float, init_values: Optional[float], proj_drop: float,
                      drop_path: float) -> nn.Module:
    """A VisionLLaMA block around window attention (LSA, window_size given) or sub-sampled attention (GSA).
    Called as block(x (B, H*W, C), grid=(H, W), rope=..., [key_rope=...])."""
    if window_size:
        attn = WindowAttention(dim, num_heads, window_size, qkv_bias=qkv_bias, proj_drop=proj_drop)
    else:
        attn = SubsampledAttention(dim, num_heads, sr_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop, norm_eps=norm_eps)
    return build_block(dim, attn, mlp_hidden, False, norm_eps, init_values, proj_drop, drop_path)


def gsa_key_positions(sr_ratio: int) -> dict:
    """Grid arguments of the sub-sampled keys' RoPE positions, reproducing the official code: reduced
    token p sits at (1 - 1/sr) + sr * (p mod W, p div W) with W the FULL-resolution width (not W / sr)."""
    return {"step": float(sr_ratio), "offset": 1.0 - 1.0 / sr_ratio}


class VisionLLaMAPyramid(ClassifierContract, nn.Module):
    """Pyramid VisionLLaMA classifier. forward: (B, C, H, W) -> (B, num_classes)."""

    def __init__(self, cfg: Optional[VisionLLaMAPyramidConfig] = None, **kwargs):
        super().__init__()
        cfg = cfg or VisionLLaMAPyramidConfig(**kwargs)
        stages = len(cfg.depths)
        for name in ("embed_dims", "num_heads", "wss", "sr_ratios"):
            if len(getattr(cfg, name)) != stages:
                raise ValueError(f"{name} has {len(getattr(cfg, name))} entries but depths has {stages} stages")
        self.check_global_pool(cfg.global_pool)
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.global_pool = "avg"
        self.num_features = self.embed_dim = cfg.embed_dims[-1]
        self.num_prefix_tokens = 0
        self.grad_checkpointing = False
        self.in_chans = cfg.in_chans
        self.strides = [cfg.patch_size * 2 ** i for i in range(stages)]

        self.patch_embeds = nn.ModuleList([
            StageEmbed(cfg.in_chans if i == 0 else cfg.embed_dims[i - 1], cfg.embed_dims[i],
                       cfg.patch_size if i == 0 else 2, cfg.norm_eps) for i in range(stages)])
        self.ropes = nn.ModuleList([Rope2D(cfg.embed_dims[i] // cfg.num_heads[i], cfg.rope_theta)
                                    for i in range(stages)])
        total = sum(cfg.depths)
        dpr = [cfg.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        self.blocks = nn.ModuleList()
        for i in range(stages):
            hidden = swiglu_hidden_dim(cfg.embed_dims[i], cfg.mlp_ratio, cfg.mlp_multiple_of)
            first = sum(cfg.depths[:i])
            self.blocks.append(nn.ModuleList([
                build_group_block(cfg.embed_dims[i], cfg.num_heads[i], hidden, cfg.wss[i] if j % 2 == 0 else None,
                                  cfg.sr_ratios[i], cfg.qkv_bias, cfg.norm_eps, cfg.init_values, cfg.drop_rate,
                                  dpr[first + j]) for j in range(cfg.depths[i])]))
        self.norm = nn.LayerNorm(self.embed_dim, eps=cfg.norm_eps)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(self.embed_dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.feature_info = [{"num_chs": cfg.embed_dims[i], "reduction": self.strides[i], "module": f"blocks.{i}"}
                             for i in range(stages)]
        self.apply(_init_weights)

    # --- timm contract (the rest in ClassifierContract) -----------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's parameter groups: each block of each stage, the stage embeddings with their stage."""
        if coarse:
            return {"stem": r"^patch_embeds\.0", "blocks": [(r"^(?:blocks|patch_embeds)\.(\d+)", None),
                                                             (r"^norm", (99999,))]}
        return {"stem": r"^patch_embeds\.0", "blocks": [(r"^blocks\.(\d+)\.(\d+)", None),
                                                         (r"^patch_embeds\.(\d+)", (0,)), (r"^norm", (99999,))]}

    def checkpoint_filter(self, state_dict: dict) -> dict:
        return convert_official(state_dict)

    def check_global_pool(self, global_pool: str) -> None:
        if global_pool != "avg":
            raise ValueError(f"the pyramid has no class token: global_pool must be 'avg', got {global_pool!r}")

    # --- forward -------------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError unless every stage and its key sub-sampling keep a token at this input size."""
        check_images(x, self.in_chans)
        h, w = x.shape[-2:]
        smallest = max(stride * sr for stride, sr in zip(self.strides, self.cfg.sr_ratios))
        if h % self.cfg.patch_size or w % self.cfg.patch_size or h < smallest or w < smallest:
            raise ValueError(f"input size {h}x{w} must be a multiple of the patch size {self.cfg.patch_size} and at "
                             f"least {smallest}x{smallest} so that every stage and its key sub-sampling keep a token")

    def stage_ropes(self, stage: int, grid: Tuple[int, int]) -> Tuple[dict, dict]:
        """Attention arguments of one stage's blocks: (LSA: grid + window tables, GSA: grid + query and key tables)."""
        h, w = grid
        ws, sr = self.cfg.wss[stage], self.cfg.sr_ratios[stage]
        rope = self.ropes[stage]
        window = {"grid": grid, "rope": rope(ws * ws, ws)}
        scale = self.cfg.rope_ref_grid / h if self.cfg.rope_auto_scale else 1.0
        num_keys = (h // sr) * (w // sr)
        glob = {"grid": grid, "rope": rope(h * w, w, scale),
                "key_rope": rope(num_keys, w, scale, **gsa_key_positions(sr))}
        return window, glob

    def _stage(self, stage: int, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        x, grid = self.patch_embeds[stage](x)
        window, glob = self.stage_ropes(stage, grid)
        checkpointing = self.grad_checkpointing and self.training and not torch.jit.is_scripting()
        for j, blk in enumerate(self.blocks[stage]):   # LSA (even index) and GSA (odd) alternate
            x = run_blocks([blk], x, checkpointing, **(window if j % 2 == 0 else glob))
        return x, grid

    def _stages(self, x: torch.Tensor, count: int):
        """Run the first `count` stages on images (B, C, H, W); yield (index, tokens, grid) after each."""
        grid = None
        for i in range(count):
            x, grid = self._stage(i, x if grid is None else _to_map(x, grid))
            yield i, x, grid

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, C, H, W) -> last-stage tokens (B, H/32 * W/32, C_last) after the final norm.

        attn_mask: accepted for the trunk contract, but a token mask has no meaning for window and
        sub-sampled attention: anything but None is refused.
        """
        if attn_mask is not None:
            raise ValueError("the pyramid's window and sub-sampled attention take no attention mask (AIM "
                             "pre-training needs a plain trunk: iLLaMA, VisionLLaMA, AIM or a ViT + frozen LLM)")
        self.check_input(x)
        (_, tokens, _), = collections.deque(self._stages(x, len(self.blocks)), maxlen=1)
        return self.norm(tokens)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, N, C) -> logits, or the pooled (B, C) = norm(mean(tokens)) with pre_logits."""
        x = self.head_drop(self.norm(x.mean(dim=1)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """timm's feature API over the stages: each taken stage's last block output as (B, C_i, H_i, W_i),
        un-normed (`norm` applies the final norm to the last stage only, the one it was made for).

        indices: the last n stages if an int, all if None, else the listed stage indices.
        Returns the list, or (final-norm tokens, list) unless intermediates_only.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"the pyramid's feature maps are NCHW, got output_fmt={output_fmt!r}")
        self.check_input(x)
        take, max_index = feature_take_indices(len(self.blocks), indices)
        last = len(self.blocks) - 1
        stages = max_index + 1 if stop_early else len(self.blocks)
        intermediates, tokens = [], x
        for i, tokens, grid in self._stages(x, stages):
            if i in take:
                intermediates.append(_to_map(self.norm(tokens) if norm and i == last else tokens, grid))
        if intermediates_only:
            return intermediates
        return self.norm(tokens), intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        self.patch_embeds = self.patch_embeds[:max_index + 1]
        if prune_norm or max_index < len(self.cfg.depths) - 1:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take


def _to_map(tokens: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """(B, H*W, C) raster tokens -> (B, C, H, W)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)


def _init_weights(m: nn.Module) -> None:
    init_linear(m)
    if isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
