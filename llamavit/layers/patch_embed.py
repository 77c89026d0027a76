"""Image to patch-token embedding."""
from typing import Tuple, Union

import torch
import torch.nn as nn
from timm.layers import to_2tuple


def check_images(x: torch.Tensor, in_chans: int) -> None:
    """Raise a ValueError naming the problem unless x is a (B, in_chans, H, W) batch."""
    if x.ndim != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got a tensor of shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"expected a floating-point image tensor, got {x.dtype} (e.g. x.float() / 255, then the "
                         f"model's normalisation)")
    if x.shape[0] == 0:
        raise ValueError("expected a batch of at least one image, got an empty batch")
    if x.shape[1] != in_chans:
        raise ValueError(f"expected {in_chans} input channel(s), got {x.shape[1]} (input shape {tuple(x.shape)})")


class PatchEmbed(nn.Module):
    """Non-overlapping patches through one strided Conv2d, tokens in raster order.

    (B, C, H, W) -> (B, H/p * W/p, D). Any H, W that are multiples of the patch size are accepted;
    anything else raises a ValueError that says what was given and what is expected.
    """

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, patch_size: Union[int, Tuple[int, int]] = 16,
                 in_chans: int = 3, embed_dim: int = 768, bias: bool = True):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        if any(s % p for s, p in zip(self.img_size, self.patch_size)):
            raise ValueError(f"img_size {self.img_size[0]}x{self.img_size[1]} is not a multiple of the patch size "
                             f"{self.patch_size[0]}x{self.patch_size[1]}")
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)

    @property
    def grid_size(self) -> Tuple[int, int]:
        """Patch grid (rows, cols) at the construction size."""
        return self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1]

    @property
    def num_patches(self) -> int:
        """Patches at the construction size."""
        return self.grid_size[0] * self.grid_size[1]

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError unless x is (B, in_chans, H, W) with H, W positive multiples of the patch."""
        check_images(x, self.in_chans)
        h, w = x.shape[-2:]
        ph, pw = self.patch_size
        if h % ph or w % pw or h == 0 or w == 0:
            raise ValueError(f"input size {h}x{w} is not a positive multiple of the patch size {ph}x{pw}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.proj(x).flatten(2).transpose(1, 2)
