"""MAE pre-training of the plain VisionLLaMA, as the paper's mmpretrain runs: random masking (ratio
0.75), the encoder sees only the kept patches (plus the class token), a light decoder fills in mask
tokens, and the loss is the MSE to per-patch normalised pixels on masked patches.

Position enters VisionLLaMA only through 2D RoPE, so the kept tokens must be rotated by their TRUE grid
positions: the trunk's own forward takes the kept indices (`forward_features(x, keep=ids)`) and gathers
its full-grid RoPE table at them. The decoder uses 2D RoPE over the full grid. Masking draws from the
global RNG, which the step loop seeds per (seed, step), so resume stays exact.
"""
import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..layers import Attention, Rope2D, run_blocks, swiglu_hidden_dim
from ..models.visionllama import build_block
from .targets import freeze_unreached, normalized_targets, patchify, unnormalize_like


@dataclass
class MAEDecoderConfig:
    """MAE's light decoder: width, depth, and the fraction of patches hidden from the encoder."""
    dim: int = 256
    depth: int = 4
    mask_ratio: float = 0.75


def random_masking(batch: int, num_patches: int, mask_ratio: float, device=None):
    """(ids_keep (B, K), mask (B, N) with 1 = hidden), K = int(N * (1 - ratio)); kept ids in random order."""
    keep = int(num_patches * (1 - mask_ratio))
    if not 0 < keep <= num_patches:
        raise ValueError(f"mask ratio {mask_ratio} keeps {keep} of {num_patches} patches")
    order = torch.rand(batch, num_patches, device=device).argsort(dim=1)
    mask = torch.ones(batch, num_patches, device=device)
    mask.scatter_(1, order[:, :keep], 0.0)
    return order[:, :keep], mask


class MAEObjective(nn.Module):
    """VisionLLaMA trunk + light decoder.

    forward(images (B, C, H, W)) -> (loss, predictions (B, N, p*p*C), mask (B, N) with 1 = hidden).
    """

    def __init__(self, trunk: nn.Module, decoder: MAEDecoderConfig, in_chans: int):
        super().__init__()
        if "keep" not in inspect.signature(trunk.forward_features).parameters:
            raise ValueError(f"MAE needs a trunk whose forward_features takes the kept patches (keep=...), as the "
                             f"plain VisionLLaMA does; {type(trunk).__name__} does not")
        self.trunk, self.decoder_cfg, self.in_chans = trunk, decoder, in_chans
        self.patch_size = trunk.patch_embed.patch_size[0]
        heads = decoder.dim // 32 if decoder.dim % 32 == 0 else 1
        hidden = swiglu_hidden_dim(decoder.dim, 4.0, 8)
        self.decoder = nn.ModuleDict({
            "embed": nn.Linear(trunk.embed_dim, decoder.dim),
            "blocks": nn.ModuleList([build_block(decoder.dim, Attention(decoder.dim, heads), hidden, init_values=None)
                                     for _ in range(decoder.depth)]),
            "norm": nn.LayerNorm(decoder.dim, eps=1e-6),
            "pred": nn.Linear(decoder.dim, self.patch_size ** 2 * in_chans),
        })
        self.decoder["mask_token"] = _ParamHolder(nn.Parameter(0.02 * torch.randn(1, 1, decoder.dim)))
        self.decoder_rope = Rope2D(decoder.dim // heads)
        size = trunk.patch_embed.img_size
        images = torch.zeros(1, in_chans, *size, device=next(trunk.parameters()).device)
        keep = torch.arange(trunk.patch_embed.num_patches, device=images.device)[None]
        self.frozen = freeze_unreached(trunk, lambda: trunk.forward_features(images, keep=keep))

    def decode(self, latent: torch.Tensor, ids_keep: torch.Tensor, grid) -> torch.Tensor:
        """Encoder tokens -> pixel predictions for every patch (B, N, p*p*C), patches back in raster order."""
        d = self.decoder
        x = d["embed"](latent[:, self.trunk.num_prefix_tokens:])
        n = grid[0] * grid[1]
        full = d["mask_token"].weight.to(x.dtype).expand(x.shape[0], n, -1).clone()
        full.scatter_(1, ids_keep[..., None].expand(-1, -1, x.shape[-1]), x)
        full = run_blocks(d["blocks"], full, rope=self.decoder_rope(n, grid[1]))
        return d["pred"](d["norm"](full))

    def forward(self, images: torch.Tensor):
        p = self.patch_size
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        ids_keep, mask = random_masking(images.shape[0], grid[0] * grid[1], self.decoder_cfg.mask_ratio, images.device)
        preds = self.decode(self.trunk.forward_features(images, keep=ids_keep), ids_keep, grid)
        per_patch = ((preds.float() - normalized_targets(patchify(images.float(), p))) ** 2).mean(-1)
        return (per_patch * mask).sum() / mask.sum(), preds, mask

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor):
        """A random mask at the training ratio: -> (pixel patches (B, N, p*p*C): the visible ones and the
        un-normalised predictions of the hidden ones, given (B, N) bool)."""
        _, preds, mask = self(images)
        patches = patchify(images.float(), self.patch_size)
        hidden = mask.bool()
        return torch.where(hidden[..., None], unnormalize_like(preds, patches), patches), ~hidden


class _ParamHolder(nn.Module):
    """Puts the mask token inside `decoder` so it is saved and restored with the decoder."""

    def __init__(self, param: nn.Parameter):
        super().__init__()
        self.weight = param
