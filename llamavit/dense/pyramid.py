"""Backbone adapters: any llamavit trunk or timm model -> four feature maps, finest first, for dense heads.

    native      a hierarchical trunk's own stages (pyramid VisionLLaMA, Twins, ResNet, ...): the last
                feature of each of the four coarsest reductions it has (strides 4, 8, 16, 32 usually)
    simple      ViTDet's simple feature pyramid (Li et al. 2022) of a plain trunk's LAST block map
                (stride p): deconvolutions up, identity, max-pooling down to strides 4, 8, 16, 32 (patch 16:
                p/4, p/2, p, 2p; patch 4: p, 2p, 4p, 8p; a patch that is not a power of two: p/4 ... 2p),
                each followed by a 1x1 and a 3x3 convolution with LayerNorm
    multilevel  mmseg's MultiLevelNeck of four INTERMEDIATE block maps (by default blocks 1/3, 1/2, 2/3
                and all the way down, [3, 5, 7, 11] at depth 12 as VisionLLaMA's UperNet config takes them):
                a 1x1 convolution, bilinear rescaling to the same strides as 'simple' and a 3x3 convolution each

`DenseBackbone.forward(images (B, C, H, W)) -> [maps (B, C_i, H / s_i, W / s_i)]` with `out_channels` and
`strides`; `size_divisor` is the input multiple that makes every level an exact halving of the one before.
"""
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d

from ..models import create_model, list_models, load_backbone, read_state_dict
from ..models.convert import resolve_checkpoint
from ..models.registry import SHIPPED

PYRAMIDS = ("auto", "native", "simple", "multilevel")


def level_scales(stride: float) -> Tuple[float, ...]:
    """How much each of the four levels rescales a plain trunk's stride-`stride` map: to strides 4, 8, 16, 32
    when the stride is a power of two from 4 to 32 (patch 4 -> 1, 1/2, 1/4, 1/8; patch 16 -> 4, 2, 1, 1/2 as
    ViTDet), otherwise ViTDet's 4, 2, 1, 1/2 (patch 14 -> strides 3.5 ... 28)."""
    if stride in (4, 8, 16, 32):
        return tuple(stride / target for target in (4, 8, 16, 32))
    return (4.0, 2.0, 1.0, 0.5)


def _rescaler(dim: int, scale: float) -> Tuple[nn.Module, int]:
    """(module, output width) taking (B, dim, h, w) to (B, width, h * scale, w * scale): stride-2 deconvolutions
    halving the width (LayerNorm + GELU between), identity, or max-pooling."""
    if scale <= 1:
        return (nn.Identity() if scale == 1 else nn.MaxPool2d(round(1 / scale))), dim
    layers, width = [], dim
    for i in range(round(math.log2(scale))):
        if i:
            layers += [LayerNorm2d(width), nn.GELU()]
        layers.append(nn.ConvTranspose2d(width, width // 2, 2, stride=2))
        width //= 2
    return (layers[0] if len(layers) == 1 else nn.Sequential(*layers)), width


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's pyramid of one stride-p map (B, D, h, w) -> four maps `out_channels` wide, rescaled by
    `level_scales(p)` (p = 16: strides 4, 8, 16, 32 by two deconvolutions, one, identity and max-pooling)."""

    def __init__(self, dim: int, out_channels: int = 256, scales: Sequence[float] = (4, 2, 1, 0.5)):
        super().__init__()
        rescalers = [_rescaler(dim, scale) for scale in scales]
        self.rescale = nn.ModuleList(module for module, _ in rescalers)
        self.output = nn.ModuleList([
            nn.Sequential(nn.Conv2d(width, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                          nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels))
            for _, width in rescalers])

    def forward(self, maps: List[torch.Tensor]) -> List[torch.Tensor]:
        """[(B, D, h, w)] (the last block's map) -> four maps (B, out, h * scale, w * scale), finest first."""
        return [out(rescale(maps[-1])) for rescale, out in zip(self.rescale, self.output)]


class MultiLevelNeck(nn.Module):
    """mmseg's MultiLevelNeck: four block maps (B, D, h, w) -> rescaled by `scales`, `out_channels` wide."""

    def __init__(self, dim: int, out_channels: Optional[int] = None, scales: Sequence[float] = (4, 2, 1, 0.5)):
        super().__init__()
        out_channels = out_channels or dim
        self.scales = tuple(scales)
        self.lateral = nn.ModuleList(nn.Conv2d(dim, out_channels, 1) for _ in scales)
        self.output = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in scales)

    def forward(self, maps: List[torch.Tensor]) -> List[torch.Tensor]:
        """Four maps (B, D, h, w) -> [(B, out, h * s, w * s) for s in scales]."""
        if len(maps) != len(self.scales):
            raise ValueError(f"MultiLevelNeck takes {len(self.scales)} maps, got {len(maps)}")
        outs = []
        for x, scale, lateral, output in zip(maps, self.scales, self.lateral, self.output):
            x = lateral(x)
            if scale != 1:
                x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
            outs.append(output(x))
        return outs


def default_block_indices(depth: int) -> Tuple[int, ...]:
    """The blocks a multi-level neck taps at `depth`: a third, half, two thirds and all of the way down
    (depth 12 -> (3, 5, 7, 11), as VisionLLaMA's and mmseg's ViT UperNet configs)."""
    return tuple(max(0, round(depth * f) - 1) for f in (1 / 3, 1 / 2, 2 / 3, 1))


def native_levels(feature_info: Sequence[dict]) -> Optional[List[int]]:
    """The indices of a trunk's features forming a 4-level pyramid (the last feature at each of the four
    coarsest distinct reductions, finest >= 4), or None when the trunk has fewer than four (a plain ViT)."""
    last_at: Dict[float, int] = {}
    for i, info in enumerate(feature_info):
        last_at[info["reduction"]] = i
    reductions = sorted(r for r in last_at if r >= 4)
    if len(reductions) < 4:
        return None
    return [last_at[r] for r in reductions[-4:]]


@dataclass
class BackboneConfig:
    """What a dense backbone is made of (recorded in dense checkpoints to rebuild it)."""
    name: str = "visionllama_pyramid_small_224"   # any llamavit or timm model name
    pyramid: str = "auto"                          # auto | native | simple | multilevel (see the module doc)
    img_size: int = 224
    in_chans: int = 3
    kwargs: Dict[str, Any] = field(default_factory=dict)   # create_model options (embed_dim=..., depth=...)
    out_channels: int = 256                        # width of the simple pyramid's levels
    block_indices: Optional[Tuple[int, ...]] = None   # multilevel: the tapped blocks (default_block_indices)
    norm: bool = False                             # apply the trunk's final norm to the tapped maps

    def __post_init__(self):
        if self.pyramid not in PYRAMIDS:
            raise ValueError(f"pyramid must be one of {', '.join(PYRAMIDS)}, got {self.pyramid!r}")
        if self.block_indices is not None:
            self.block_indices = tuple(int(i) for i in self.block_indices)
            if len(self.block_indices) != 4:
                raise ValueError(f"block_indices must name 4 blocks, got {list(self.block_indices)}")


class DenseBackbone(nn.Module):
    """A trunk and the neck that turns its features into a 4-level pyramid.

    forward(images (B, C, H, W)) -> four maps, finest first; `out_channels[i]`, `strides[i]` (input pixels
    per map cell) describe them.
    """

    def __init__(self, trunk: nn.Module, cfg: BackboneConfig):
        super().__init__()
        self.cfg = cfg
        info = getattr(trunk, "feature_info", None)
        if info is None or not hasattr(trunk, "forward_intermediates"):
            raise ValueError(f"{cfg.name} has no feature_info / forward_intermediates: it cannot serve as a dense "
                             f"backbone (timm models with features_only support do)")
        info = [dict(i) for i in (info.info if hasattr(info, "info") else info)]
        levels = native_levels(info)
        pyramid = cfg.pyramid if cfg.pyramid != "auto" else ("native" if levels else "simple")
        if pyramid == "native" and levels is None:
            raise ValueError(f"{cfg.name} is a plain trunk (its features are all at stride "
                             f"{info[-1]['reduction']}): use pyramid 'simple' or 'multilevel'")
        if pyramid != "native" and levels is not None:
            raise ValueError(f"{cfg.name} is hierarchical: pyramid {pyramid!r} is for plain trunks; use 'native'")
        self.pyramid = pyramid
        if pyramid == "native":
            self.indices = levels
            self.neck = nn.Identity()
            self.out_channels = [info[i]["num_chs"] for i in levels]
            self.strides = [float(info[i]["reduction"]) for i in levels]
        else:
            depth, dim, stride = len(info), info[-1]["num_chs"], float(info[-1]["reduction"])
            scales = level_scales(stride)
            if pyramid == "simple":
                self.indices = [depth - 1]
                self.neck = SimpleFeaturePyramid(dim, cfg.out_channels, scales)
                self.out_channels = [cfg.out_channels] * 4
            else:
                self.indices = list(cfg.block_indices or default_block_indices(depth))
                bad = [i for i in self.indices if not 0 <= i < depth]
                if bad:
                    raise ValueError(f"block_indices {bad} are outside the {depth} blocks of {cfg.name}")
                self.neck = MultiLevelNeck(dim, scales=scales)
                self.out_channels = [dim] * 4
            self.strides = [stride / scale for scale in scales]
        # the trunk keeps the blocks up to the last one tapped; its classifier (and unused norm) go
        trunk.prune_intermediate_layers(self.indices, prune_norm=not cfg.norm, prune_head=True)
        self.trunk = trunk
        if hasattr(trunk, "set_soft_mask_rate") and "soft_mask_rate" not in cfg.kwargs:
            trunk.set_soft_mask_rate(1.0)   # iLLaMA: every location sees the whole image (see docs/dense.md)

    @property
    def size_divisor(self) -> int:
        """Inputs whose sides are a multiple of this give exact halvings between the levels."""
        return int(round(self.strides[-1]))

    def forward(self, images: torch.Tensor) -> List[torch.Tensor]:
        """(B, C, H, W), sides multiples of the patch -> four maps (B, out_channels[i], ~H / strides[i], ...)."""
        maps = self.trunk.forward_intermediates(images, indices=self.indices, norm=self.cfg.norm,
                                                intermediates_only=True)
        return self.neck(maps) if self.pyramid != "native" else list(maps)


def build_trunk(name: str, img_size: int, in_chans: int, **kwargs) -> nn.Module:
    """A classifier-free trunk by llamavit or timm name ('timm:<name>' as create_model takes it, or the bare timm
    name); img_size is passed to models that take one."""
    name = name.removeprefix("timm:")
    creator = create_model if name in list_models() else timm.create_model
    try:
        return creator(name, num_classes=0, img_size=img_size, in_chans=in_chans, **kwargs)
    except TypeError as e:
        if "img_size" not in str(e):
            raise
    except RuntimeError as e:   # timm's "Unknown model" is a RuntimeError
        raise ValueError(f"unknown backbone {name!r}: not a llamavit or timm model name") from e
    return creator(name, num_classes=0, in_chans=in_chans, **kwargs)   # convolutional nets take any size


def load_trunk_weights(trunk: nn.Module, path: str) -> None:
    """Initialise a trunk from a llamavit run (classification, AIM, MAE), weights llamavit ships (by name, e.g.
    'illama_fmnist_patch4_28.fmnist'), an official release, an OpenMMLab segmentation / detection / MAE file
    (`backbone.*`) or a timm file; heads of the source are ignored, a stem of another channel count adapted."""
    from .openmmlab import is_openmmlab_state, load_openmmlab_backbone
    if not os.path.exists(path) and path in SHIPPED:
        path = SHIPPED[path]
    path = resolve_checkpoint(path)
    raw = read_state_dict(path, state_keys=("state_dict", "model", "model_state"))   # read once, for either
    if is_openmmlab_state(raw):
        load_openmmlab_backbone(trunk, path, raw)
    else:
        load_backbone(trunk, path, raw)


def create_backbone(cfg: BackboneConfig, checkpoint: Optional[str] = None) -> DenseBackbone:
    """The dense backbone of `cfg`, its trunk initialised from `checkpoint` when given (before pruning)."""
    trunk = build_trunk(cfg.name, cfg.img_size, cfg.in_chans, **cfg.kwargs)
    if checkpoint:
        load_trunk_weights(trunk, checkpoint)
    return DenseBackbone(trunk, cfg)


def trunk_group_matcher(module: nn.Module) -> Callable[..., Dict[str, Any]]:
    """timm's `group_matcher` for a module that holds one DenseBackbone (a segmenter, its objective, a detector):
    the trunk's own groups under the path where the module holds it, for `layer_decay`; the neck, the heads and
    everything else fall in the last group (the full learning rate)."""
    path = next((name for name, m in module.named_modules() if isinstance(m, DenseBackbone)), None)
    if path is None:
        raise ValueError(f"{type(module).__name__} holds no DenseBackbone: no trunk to decay the learning rate over")
    trunk = module.get_submodule(path).trunk if path else module.trunk
    if not hasattr(trunk, "group_matcher"):
        raise ValueError(f"layer decay needs the trunk's group_matcher; {type(trunk).__name__} has none")
    anchor = "^" + re.escape((path + "." if path else "") + "trunk.")

    def prefixed(pattern: str) -> str:
        return pattern.replace("^", anchor)

    def matcher(coarse: bool = False) -> Dict[str, Any]:
        groups = trunk.group_matcher(coarse=coarse)
        return {key: prefixed(value) if isinstance(value, str) else [(prefixed(p), order) for p, order in value]
                for key, value in groups.items()}
    return matcher
