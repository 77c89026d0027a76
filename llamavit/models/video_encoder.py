"""A video encoder: tubelet tokens into the shared TokenEncoder, so the frozen LLM block of Pang et al. can be
measured on clips (their claim: the block helps video encoders too).

    clips (B, C, T, H, W) -> Conv3d tubelets (ViViT / VideoMAE) -> tokens (B, T'*H'*W', D), time-major
    positions: a temporal table (T', D) + a spatial table (H'*W', D)
    -> TokenEncoder: [cls] -> DeiT blocks -> frozen LLM path (llm_path) -> LayerNorm -> pool -> head
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, trunc_normal_

from .token_encoder import TokenEncoder, TokenEncoderConfig


class TubeletEmbed(nn.Module):
    """Non-overlapping tubelets through one Conv3d (kernel = stride = (tubelet_size, patch_size, patch_size)).

    (B, C, T, H, W) -> (B, T/t * H/p * W/p, D), tokens ordered by time, then in raster order. T must be a multiple
    of tubelet_size and H, W of patch_size; anything else raises a ValueError saying what was given."""

    def __init__(self, in_chans: int = 3, embed_dim: int = 96, tubelet_size: int = 2, patch_size: int = 16):
        super().__init__()
        self.in_chans, self.tubelet_size, self.patch_size = in_chans, tubelet_size, patch_size
        kernel = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=kernel, stride=kernel)

    def grid(self, frames: int, height: int, width: int) -> Tuple[int, int, int]:
        """Tubelet grid (T', H', W') of a clip of frames x height x width."""
        return frames // self.tubelet_size, height // self.patch_size, width // self.patch_size

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError unless x is a float (B, in_chans, T, H, W) batch that the tubelets tile exactly."""
        if x.ndim != 5:
            raise ValueError(f"expected clips of shape (B, C, T, H, W), got a tensor of shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"expected a floating-point clip tensor, got {x.dtype}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"expected {self.in_chans} input channel(s), got {x.shape[1]} (input shape "
                             f"{tuple(x.shape)}; clips are (B, C, T, H, W))")
        t, h, w = x.shape[2:]
        if t == 0 or h == 0 or w == 0 or t % self.tubelet_size or h % self.patch_size or w % self.patch_size:
            raise ValueError(f"clip of {t} frames of {h}x{w} is not tiled by tubelets of {self.tubelet_size} frames "
                             f"x {self.patch_size}x{self.patch_size}: frames must be a positive multiple of "
                             f"{self.tubelet_size} and height, width of {self.patch_size}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> tokens (B, T'*H'*W', D)."""
        self.check_input(x)
        return self.proj(x).flatten(2).transpose(1, 2)


class VideoTokenizer(nn.Module):
    """The tubelet embedding and learned positions for TokenEncoder: forward(clips (B, C, T, H, W)) ->
    (tokens (B, N, D), positions (B, N, D)), N = T'*H'*W', positions[t', s] = temporal[t'] + spatial[s]."""

    def __init__(self, in_chans: int = 3, embed_dim: int = 96, num_frames: int = 8, img_size: int = 28,
                 tubelet_size: int = 2, patch_size: int = 7):
        super().__init__()
        self.embed = TubeletEmbed(in_chans, embed_dim, tubelet_size, patch_size)
        frames, rows, cols = self.embed.grid(num_frames, img_size, img_size)
        if frames * tubelet_size != num_frames or rows * patch_size != img_size or rows == 0 or frames == 0:
            raise ValueError(f"num_frames {num_frames} must be a positive multiple of tubelet_size {tubelet_size} and "
                             f"img_size {img_size} of patch_size {patch_size}")
        self.grid_size = (frames, rows, cols)
        # separable tables (T' + H'W' rows, not T'H'W'): each resamples alone, so a clip of another length keeps
        # the spatial table exactly (and another frame size the temporal one), and every frame shares one grid
        self.temporal_pos = nn.Parameter(torch.zeros(1, frames, embed_dim))
        self.spatial_pos = nn.Parameter(torch.zeros(1, rows * cols, embed_dim))
        trunc_normal_(self.temporal_pos, std=0.02)
        trunc_normal_(self.spatial_pos, std=0.02)

    def positions(self, frames: int, rows: int, cols: int) -> torch.Tensor:
        """Positions (1, frames*rows*cols, D) of a tubelet grid, the tables resampled when the grid differs
        from the construction one (temporal: linear, spatial: timm's bicubic)."""
        temporal, spatial = self.temporal_pos, self.spatial_pos
        if frames != temporal.shape[1]:
            temporal = F.interpolate(temporal.transpose(1, 2), size=frames, mode="linear",
                                     align_corners=False).transpose(1, 2)
        if (rows, cols) != self.grid_size[1:]:
            spatial = resample_abs_pos_embed(spatial, (rows, cols), self.grid_size[1:], num_prefix_tokens=0)
        return (temporal[:, :, None] + spatial[:, None]).flatten(1, 2)

    def forward(self, clips: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """clips (B, C, T, H, W) -> tokens (B, N, D), positions (B, N, D)."""
        tokens = self.embed(clips)
        positions = self.positions(*self.embed.grid(*clips.shape[2:]))
        return tokens, positions.expand(tokens.shape[0], -1, -1)


@dataclass
class VideoEncoderConfig(TokenEncoderConfig):
    """TokenEncoderConfig plus the clip geometry: square frames of img_size, num_frames per clip, tubelets of
    tubelet_size frames x patch_size x patch_size pixels (defaults: 8 grayscale 28x28 frames -> 4x4x4 tokens)."""
    img_size: int = 28
    in_chans: int = 1
    num_frames: int = 8
    tubelet_size: int = 2
    patch_size: int = 7


class VideoEncoder(TokenEncoder):
    """TokenEncoder over tubelet tokens. forward: clips (B, C, T, H, W) -> (B, num_classes); forward_features ->
    final-norm tokens (B, 1 + T'*H'*W', D), the class token first."""

    def __init__(self, cfg: Optional[VideoEncoderConfig] = None, **kwargs):
        cfg = cfg or VideoEncoderConfig(**kwargs)
        tokenizer = VideoTokenizer(cfg.in_chans, cfg.embed_dim, cfg.num_frames, cfg.img_size, cfg.tubelet_size,
                                   cfg.patch_size)
        super().__init__(tokenizer, cfg)
