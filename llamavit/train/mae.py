"""MAE pre-training of the plain VisionLLaMA (`llamavit pretrain mae`), as the paper's mmpretrain runs:
random masking (ratio 0.75), the encoder sees only the kept patches (plus the class token), a light
decoder fills in mask tokens, and the loss is the MSE to per-patch normalised pixels on masked patches.

Position enters VisionLLaMA only through 2D RoPE, so the kept tokens must be rotated by their TRUE grid
positions: the full-grid table (AS2DRoPE-scaled if the trunk uses it) is gathered at the kept indices,
per sample, giving (B, 1, K, head_dim / 2) tables that broadcast over heads. The decoder uses 2D RoPE
over the full grid. Masking draws from the global RNG, which the pre-training loop seeds per
(seed, step), so resume stays exact. Data, optimiser, checkpoints and resume are the AIM
pre-training loop's (aim_pretrain.py); only the objective differs.
"""
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
from torchvision.utils import save_image

from ..layers import Rope2D, swiglu_hidden_dim
from ..models.visionllama import Block
from .aim_objective import patchify, unpatchify
from .aim_pretrain import AIMPretrainer, PretrainConfig

# MAE's recipe where it differs from AIM's (facebookresearch/mae): light decoder, crops 0.2-1, no colour jitter
MAE_DEFAULTS = {"decoder_dim": 256, "decoder_depth": 4, "scale": (0.2, 1.0), "color_jitter_prob": 0.0}


@dataclass
class MAEDecoderConfig:
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


def gather_rope(tables: Tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Full-grid (cos, sin) (N, d) gathered at per-sample token rows (B, K) -> (B, 1, K, d) each."""
    return tuple(t[rows][:, None] for t in tables)


class MAEObjective(nn.Module):
    """VisionLLaMA trunk + light decoder. forward(images (B, C, H, W)) -> (loss, predictions (B, N, p*p*C), mask (B, N))."""

    def __init__(self, trunk: nn.Module, decoder: MAEDecoderConfig, in_chans: int):
        super().__init__()
        for attr in ("patch_embed", "rope_tables", "blocks", "norm", "num_prefix_tokens"):
            if not hasattr(trunk, attr):
                raise ValueError(f"MAE needs a plain VisionLLaMA-style trunk (2D RoPE, droppable tokens); "
                                 f"{type(trunk).__name__} has no {attr}")
        self.trunk, self.decoder_cfg, self.in_chans = trunk, decoder, in_chans
        self.patch_size = trunk.patch_embed.patch_size[0]
        heads = decoder.dim // 32 if decoder.dim % 32 == 0 else 1
        self.decoder = nn.ModuleDict({
            "embed": nn.Linear(trunk.embed_dim, decoder.dim),
            "blocks": nn.ModuleList([Block(decoder.dim, heads, swiglu_hidden_dim(decoder.dim, 4.0, 8), init_values=None)
                                     for _ in range(decoder.depth)]),
            "norm": nn.LayerNorm(decoder.dim, eps=1e-6),
            "pred": nn.Linear(decoder.dim, self.patch_size ** 2 * in_chans),
        })
        self.decoder["mask_token"] = _ParamHolder(nn.Parameter(0.02 * torch.randn(1, 1, decoder.dim)))
        self.decoder_rope = Rope2D(decoder.dim // heads)

    def encode(self, images: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Kept patches (and the class token) through the trunk, RoPE at their true positions -> (B, P + K, D)."""
        m = self.trunk
        tables = m.rope_tables(images.shape[-2:])           # rows: [class token,] patches in raster order
        x = m.patch_embed(images)
        x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))
        rows = ids_keep + m.num_prefix_tokens
        if m.num_prefix_tokens:
            x = torch.cat((m.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
            rows = torch.cat((torch.zeros_like(rows[:, :1]), rows), dim=1)
        rope = gather_rope(tables, rows)
        for blk in m.blocks:
            x = blk(x, rope)
        return m.norm(x)

    def decode(self, latent: torch.Tensor, ids_keep: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """Encoder tokens -> pixel predictions for every patch (B, N, p*p*C), patches back in raster order."""
        d = self.decoder
        x = d["embed"](latent[:, self.trunk.num_prefix_tokens:])
        n = grid[0] * grid[1]
        full = d["mask_token"].weight.to(x.dtype).expand(x.shape[0], n, -1).clone()
        full.scatter_(1, ids_keep[..., None].expand(-1, -1, x.shape[-1]), x)
        rope = self.decoder_rope(n, grid[1])
        for blk in d["blocks"]:
            full = blk(full, rope)
        return d["pred"](d["norm"](full))

    def forward(self, images: torch.Tensor, prefix=None):
        p = self.patch_size
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        ids_keep, mask = random_masking(images.shape[0], grid[0] * grid[1], self.decoder_cfg.mask_ratio, images.device)
        preds = self.decode(self.encode(images, ids_keep), ids_keep, grid)
        target = patchify(images.float(), p)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        per_patch = ((preds.float() - target) ** 2).mean(-1)
        return (per_patch * mask).sum() / mask.sum(), preds, mask


class _ParamHolder(nn.Module):
    """Puts the mask token inside `decoder` so the loop saves and restores it with the decoder."""

    def __init__(self, param: nn.Parameter):
        super().__init__()
        self.weight = param


class MAEPretrainer(AIMPretrainer):
    """The AIM pre-training loop with the MAE objective."""

    objective_name = "mae"

    def build_objective(self) -> nn.Module:
        cfg = self.cfg
        return MAEObjective(self.model, MAEDecoderConfig(cfg.decoder_dim, cfg.decoder_depth, cfg.mask_ratio),
                            cfg.in_chans)

    def prefix_lengths(self, batch: int, num_patches: int) -> Optional[torch.Tensor]:
        return None

    @torch.no_grad()
    def save_reconstructions(self, num_images: int = 8) -> str:
        """reconstructions.png: originals, masked inputs, reconstructions (visible patches kept, predictions
        un-normalised with each true patch's mean and std)."""
        images = torch.stack([self.train_set[i][0] for i in range(min(num_images, len(self.train_set)))])
        images = images.to(self.cfg.device)
        was_training = self.objective.training
        self.objective.eval()
        _, preds, mask = self.objective(images)
        self.objective.train(was_training)
        p = self.objective.patch_size
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        patches = patchify(images.float(), p)
        mean, std = patches.mean(-1, keepdim=True), (patches.var(-1, keepdim=True) + 1e-6).sqrt()
        hidden = mask[..., None].bool()
        masked = torch.where(hidden, torch.zeros_like(patches), patches)
        recon = torch.where(hidden, preds.float() * std + mean, patches)
        c = images.shape[1]
        out = torch.cat((images.float(), unpatchify(masked, p, grid, c), unpatchify(recon, p, grid, c)))
        lo, hi = out.amin(dim=(1, 2, 3), keepdim=True), out.amax(dim=(1, 2, 3), keepdim=True)
        path = os.path.join(self.cfg.output, "reconstructions.png")
        save_image((out - lo) / (hi - lo + 1e-6), path, nrow=images.shape[0])
        return path


def pretrain_mae(cfg: PretrainConfig) -> dict:
    """MAE-pre-train according to cfg and return the summary."""
    return MAEPretrainer(cfg).fit()
