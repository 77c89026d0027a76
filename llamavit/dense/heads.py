"""Segmentation heads on a 4-level pyramid (finest first): four maps (B, C_i, H_i, W_i) -> logits (B, K, H_0, W_0).

    upernet   UperNet (Xiao et al. 2018): segmentation-models-pytorch's UPerNetDecoder (per-level LayerNorm,
              pyramid pooling on the coarsest map, FPN fusion at the finest level), then dropout 0.1 and a 1x1
              classifier as mmseg's UPerHead
    fpn       a light FPN (Kirillov et al. 2019): segmentation-models-pytorch's FPNDecoder, then a 1x1 classifier
    linear    the lightest: every level upsampled to the finest, concatenated, BatchNorm and a 1x1 classifier
    fcn       mmseg's auxiliary FCNHead on one level (the stride-16 map): 3x3 conv + BN + ReLU, dropout, 1x1

The logits come at the finest level's resolution; the Segmenter upsamples them to the image.
"""
from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from segmentation_models_pytorch.decoders.fpn.decoder import FPNDecoder
from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder

HEADS = ("upernet", "fpn", "linear")


class UperNetHead(nn.Module):
    """UperNet on four maps -> logits (B, K, H_0, W_0); `channels` is the decoder width (mmseg: 512, 768 for
    VisionLLaMA-B)."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 256, dropout: float = 0.1):
        super().__init__()
        # smp's decoder takes an encoder's features at strides 1, 2, 4, ... and skips the first two
        self.decoder = UPerNetDecoder([0, 0, *in_channels], encoder_depth=len(in_channels) + 1,
                                      decoder_channels=channels)
        self.classifier = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1))

    def forward(self, maps: List[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.decoder([None, None, *maps]))


class FPNHead(nn.Module):
    """A light FPN on four maps (each an exact halving of the one before) -> logits (B, K, H_0, W_0)."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 128, dropout: float = 0.1):
        super().__init__()
        if channels % 32:
            raise ValueError(f"the FPN head's channels must be a multiple of 32 (GroupNorm of 32), got {channels}")
        self.decoder = FPNDecoder(list(in_channels), encoder_depth=len(in_channels) - 1, pyramid_channels=2 * channels,
                                  segmentation_channels=channels, dropout=dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, maps: List[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.decoder(list(maps)))


class LinearHead(nn.Module):
    """Every map upsampled to the finest, concatenated, BatchNorm + 1x1 -> logits (B, K, H_0, W_0)."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 0, dropout: float = 0.1):
        super().__init__()
        width = sum(in_channels)
        self.classifier = nn.Sequential(nn.BatchNorm2d(width), nn.Dropout2d(dropout), nn.Conv2d(width, num_classes, 1))

    def forward(self, maps: List[torch.Tensor]) -> torch.Tensor:
        size = maps[0].shape[-2:]
        up = [maps[0]] + [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps[1:]]
        return self.classifier(torch.cat(up, dim=1))


class FCNHead(nn.Module):
    """mmseg's auxiliary head on map `level` -> logits (B, K, H_level, W_level)."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, level: int = 2, channels: int = 256,
                 dropout: float = 0.1):
        super().__init__()
        self.level = level
        self.conv = nn.Sequential(nn.Conv2d(in_channels[level], channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(nn.Dropout2d(dropout), nn.Conv2d(channels, num_classes, 1))

    def forward(self, maps: List[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.conv(maps[self.level]))


def create_head(name: str, in_channels: Sequence[int], num_classes: int, channels: int = 0) -> nn.Module:
    """A segmentation head by name (HEADS); channels 0 = the head's default width."""
    heads = {"upernet": UperNetHead, "fpn": FPNHead, "linear": LinearHead}
    if name not in heads:
        raise ValueError(f"head must be one of {', '.join(HEADS)}, got {name!r}")
    if num_classes < 2:
        raise ValueError(f"a segmentation head needs at least 2 classes, got {num_classes}")
    return heads[name](in_channels, num_classes, **({"channels": channels} if channels else {}))
