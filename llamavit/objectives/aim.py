"""The AIM pre-training objective (apple/ml-l3m, configs/aimv1): prefix-causal trunk, MLP pixel
decoder, next-patch regression of per-patch normalised pixels.

For a batch of images and per-sample prefix lengths L_b drawn uniformly in [1, N-1]:
    tokens = trunk(images, attn_mask = j <= i or j < L_b)          (B, N, D)
    preds  = decoder(tokens)                                       (B, N, p*p*C)
    loss   = mean over (b, i) with i + 1 >= L_b of MSE(preds[b, i], target[b, i + 1])
so position i predicts patch i+1, and only patches outside the prefix are targets. Works for any
llamavit trunk that takes `attn_mask` (AIM, iLLaMA, VisionLLaMA), whatever extra tokens it adds.
"""
from dataclasses import dataclass
from functools import partial
from typing import Tuple

import torch
import torch.nn as nn
from timm.layers import Mlp

from ..layers import Block, prefix_causal_mask, run_blocks
from ..layers.pos_embed import sincos_2d
from .targets import freeze_unreached, normalized_targets, patchify


def next_patch_loss(preds: torch.Tensor, targets: torch.Tensor, prefix_len: torch.Tensor) -> torch.Tensor:
    """MSE of preds[:, i] against targets[:, i + 1], averaged over all non-prefix targets of the batch.

    preds, targets: (B, N, K); prefix_len: (B,) ints in [1, N - 1]. Computed in float32.
    """
    err = (preds[:, :-1].float() - targets[:, 1:].float()).square().mean(dim=-1)       # (B, N - 1)
    target_index = torch.arange(1, preds.shape[1], device=preds.device)
    valid = (target_index[None] >= prefix_len.to(preds.device)[:, None]).float()
    return (err * valid).sum() / valid.sum()


def sample_prefix_lengths(batch: int, num_patches: int, generator: torch.Generator = None,
                          low: int = 1, high: int = 0) -> torch.Tensor:
    """(batch,) prefix lengths drawn uniformly in [low, high] (high 0 = num_patches - 1)."""
    high = high or num_patches - 1
    if not 1 <= low <= high <= num_patches - 1:
        raise ValueError(f"prefix range [{low}, {high}] must lie in [1, {num_patches - 1}]")
    return torch.randint(low, high + 1, (batch,), generator=generator)


@dataclass
class DecoderConfig:
    """ml-l3m AIMv1 `SimpleDecoder` with the attention replaced by an identity."""
    dim: int = 2048
    depth: int = 12
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-5
    # the official block computes x + attn(norm_1(x)) with attn = identity, i.e. x + LN(x): kept by default
    identity_attn_quirk: bool = True


def decoder_block(cfg: DecoderConfig) -> Block:
    """[x + norm1(x)] then x + mlp(norm2(x)); bias-free GELU MLP. The official block's attention is an
    identity, so with the quirk it is our Block with `nn.Identity()` as attention. (B, N, dim) -> (B, N, dim)."""
    mlp = Mlp(cfg.dim, int(cfg.mlp_ratio * cfg.dim), act_layer=nn.GELU, bias=False)
    return Block(cfg.dim, nn.Identity() if cfg.identity_attn_quirk else None, mlp,
                 norm_layer=partial(nn.LayerNorm, eps=cfg.norm_eps))


class PixelDecoder(nn.Module):
    """Linear(in -> dim, bias) + fixed 2D sin-cos positions -> blocks -> LayerNorm -> Linear(dim -> out, bias).

    tokens (B, N, in_dim) on a (gh, gw) grid -> (B, N, out_dim). Every Linear is xavier-uniform with
    zero bias: the official code's depth-scaled init of the last layer is overwritten by its own
    module-wide xavier init, so xavier is what it trains with.
    """

    def __init__(self, in_dim: int, out_dim: int, cfg: DecoderConfig):
        super().__init__()
        self.decoder_projection = nn.Linear(in_dim, cfg.dim, bias=True)
        self.decoder_blocks = nn.ModuleList([decoder_block(cfg) for _ in range(cfg.depth)])
        self.decoder_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.decoder_pred = nn.Linear(cfg.dim, out_dim, bias=True)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        x = self.decoder_projection(x)
        x = x + sincos_2d(x.shape[-1], grid[0], grid[1], device=x.device).to(x.dtype)
        return self.decoder_pred(self.decoder_norm(run_blocks(self.decoder_blocks, x)))


class AutoregressiveObjective(nn.Module):
    """Trunk + pixel decoder; forward(images, prefix_len) -> (loss, preds, targets).

    The trunk is any llamavit model taking `attn_mask`: AIM's `forward_trunk` (post-trunk norm), else
    `forward_features`; trunk parameters that path never reaches (the classifier head, AIM's attentive
    probe) are frozen. Extra tokens (a leading class token counts as prefix; a trailing one, as
    iLLaMA's, only sees the patches) are located once with a probe forward and dropped.
    """

    def __init__(self, model: nn.Module, decoder: DecoderConfig, img_size: int, in_chans: int):
        super().__init__()
        self.model = model
        self.decoder_cfg = decoder
        self.patch_size = _patch_size(model)
        self.in_chans = in_chans
        grid = img_size // self.patch_size
        num_patches = grid * grid
        self.lead = int(getattr(model, "num_prefix_tokens", 0))
        if hasattr(model, "set_post_trunk_norm_trainable"):   # AIM: its decoder input norm trains here
            model.set_post_trunk_norm_trainable(True)
        images = torch.zeros(1, in_chans, img_size, img_size, device=_device(model))
        with torch.no_grad():
            probe = self._trunk(images, None)
        full = torch.ones(probe.shape[1], probe.shape[1], dtype=torch.bool, device=images.device)
        self.frozen = freeze_unreached(model, lambda: self._trunk(images, full))   # also checks it takes a mask
        self.trail = probe.shape[1] - num_patches - self.lead
        if self.trail < 0:
            raise ValueError(f"{type(model).__name__} returns {probe.shape[1]} tokens for {num_patches} patches")
        self.decoder = PixelDecoder(probe.shape[-1], self.patch_size ** 2 * in_chans, decoder)

    def _trunk(self, images: torch.Tensor, attn_mask) -> torch.Tensor:
        forward = getattr(self.model, "forward_trunk", None) or self.model.forward_features
        return forward(images, attn_mask=attn_mask)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        inner = self.model.no_weight_decay() if hasattr(self.model, "no_weight_decay") else set()
        return {f"model.{name}" for name in inner}

    def attention_mask(self, prefix_len: torch.Tensor, num_patches: int) -> torch.Tensor:
        """(B, 1, T, T) prefix-causal mask over all T trunk tokens (leading extra tokens join the prefix)."""
        total = self.lead + num_patches + self.trail
        return prefix_causal_mask(total, prefix_len + self.lead, device=prefix_len.device)

    def forward(self, images: torch.Tensor, prefix_len: torch.Tensor):
        """images (B, C, H, W), prefix_len (B,) -> (loss, preds (B, N, p*p*C), targets (B, N, p*p*C))."""
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        n = grid[0] * grid[1]
        prefix_len = prefix_len.to(images.device)
        tokens = self._trunk(images, self.attention_mask(prefix_len, n))[:, self.lead:self.lead + n]
        preds = self.decoder(tokens, grid)
        targets = normalized_targets(patchify(images.float(), self.patch_size))
        return next_patch_loss(preds, targets, prefix_len), preds, targets


def _patch_size(model: nn.Module) -> int:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):   # the first conv is the patch embedding in every llamavit model
            ph, pw = module.kernel_size
            if ph != pw or module.stride != module.kernel_size:
                raise ValueError(f"AIM pre-training needs square non-overlapping patches, got kernel "
                                 f"{module.kernel_size}")
            return ph
    raise ValueError(f"{type(model).__name__} has no patch-embedding convolution")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
