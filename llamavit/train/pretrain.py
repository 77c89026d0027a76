"""Self-supervised pre-training (`llamavit pretrain aim|mae`) on the step loop.

AIM: the recipe of ml-l3m configs/aimv1 on any trunk that takes an attention mask (prefix-causal attention,
MLP pixel decoder, next-patch regression): AdamW (betas 0.9/0.95, wd 0.05 off biases/norms), linear
warm-up over `warmup_frac` of the steps then cosine (timm), gradient clipping, optional bf16 autocast, the
official augmentations (RandomResizedCrop 0.4-1 bicubic, flip, ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8).
MAE: the same loop with the masked-reconstruction objective of the plain VisionLLaMA (MAE_DEFAULTS).

Checkpoints are the step loop's: the trunk's weights + metadata in model.safetensors (so `probe`,
`finetune` and `create_model(checkpoint_path=...)` read it), the decoder with the optimiser in state.pt.
Resume is exact: per-(seed, epoch) data order, per-(seed, epoch, index) augmentation, and prefix lengths
(AIM) or masks (MAE) drawn per (seed, step) for the global batch.
"""
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
from torch.utils.data import Subset
from torchvision import transforms as T
from torchvision.utils import save_image

from ..data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, aim_pretrain_transform, build_dataset, rgb_normalization
from ..data.transforms import FirstChannel, ToRGB
from ..data.seeding import mix_seed
from ..models import create_model, load_checkpoint
from ..objectives import (AutoregressiveObjective, DecoderConfig, MAEDecoderConfig, MAEObjective, patchify,
                          sample_prefix_lengths, unpatchify)
from .config import LoopConfig
from .step_loop import StepLoop

OBJECTIVES = ("aim", "mae")
# MAE's recipe where it differs from AIM's (facebookresearch/mae): light decoder, crops 0.2-1, no colour jitter
MAE_DEFAULTS = {"decoder_dim": 256, "decoder_depth": 4, "scale": (0.2, 1.0), "color_jitter_prob": 0.0}


@dataclass
class PretrainConfig(LoopConfig):
    """Options of `llamavit pretrain aim|mae` (with the step loop's, LoopConfig)."""
    _kind = "pre-training"
    objective: str = "aim"                 # 'aim' (next-patch regression) | 'mae' (masked reconstruction)
    # model
    model: str = "aim_600m_patch14_224"
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    checkpoint_path: Optional[str] = None
    img_size: int = 224
    in_chans: int = 3
    # decoder (ml-l3m AIMv1-600M: 2048 wide, 12 MLP blocks, x + LN(x) quirk)
    decoder_dim: int = 2048
    decoder_depth: int = 12
    decoder_mlp_ratio: float = 4.0
    decoder_quirk: bool = True
    prefix_min: int = 1
    prefix_max: int = 0                    # 0 = N - 1
    mask_ratio: float = 0.75               # MAE only: fraction of patches hidden from the encoder
    # data and the official augmentations
    data: str = "fashion_mnist"
    train_subset: int = 0
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None
    scale: Tuple[float, float] = (0.4, 1.0)
    hflip: float = 0.5
    color_jitter: Tuple[float, ...] = (0.4, 0.4, 0.2, 0.1)
    color_jitter_prob: float = 0.8
    # optimisation
    batch_size: int = 256
    lr: float = 1e-3
    min_lr: float = 0.0
    warmup_frac: float = 0.025
    warmup_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: Tuple[float, float] = (0.9, 0.95)
    clip_grad: Optional[float] = 1.0
    output: str = "runs/pretrain"
    recon_every: int = 0                   # >0: save reconstructions.png every N steps (and at the end)

    _ranges = {"img_size": (">", 0), "in_chans": (">", 0), "decoder_dim": (">", 0), "decoder_depth": (">=", 0),
               "decoder_mlp_ratio": (">", 0), "prefix_min": (">", 0), "prefix_max": (">=", 0),
               "mask_ratio": ("in", (0, 1)), "train_subset": (">=", 0), "scale": ("sorted", None),
               "hflip": ("in", (0, 1.001)), "color_jitter_prob": ("in", (0, 1.001)), "lr": (">=", 0),
               "min_lr": (">=", 0), "warmup_frac": ("in", (0, 1)), "warmup_lr": (">=", 0), "weight_decay": (">=", 0),
               "betas": ("each in", (0, 1)), "recon_every": (">=", 0)}

    def __post_init__(self):
        super().__post_init__()
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")


HELP = {
    "objective": "aim (next-patch regression, prefix-causal) | mae (masked reconstruction, plain VisionLLaMA)",
    "decoder_dim": "width of the pixel decoder", "decoder_depth": "blocks in the decoder",
    "decoder_mlp_ratio": "decoder MLP hidden ratio",
    "decoder_quirk": "keep the official AIM decoder's x + LN(x) step (its identity attention)",
    "prefix_min": "smallest prefix length", "prefix_max": "largest prefix length (0 = patches - 1)",
    "mask_ratio": "MAE: fraction of patches hidden from the encoder",
    "color_jitter": "ColorJitter brightness contrast saturation hue", "color_jitter_prob": "ColorJitter probability",
    "warmup_frac": "linear warm-up as a fraction of all steps",
    "recon_every": "save reconstructions.png every N steps (0 = only at the end)",
}


def _norm_stats(cfg: PretrainConfig):
    mean, std = cfg.mean, cfg.std
    if cfg.data == "fashion_mnist" and mean is None:
        mean, std = FASHION_MNIST_MEAN, FASHION_MNIST_STD
    return rgb_normalization(mean, std, cfg.in_chans)


def pretrain_transform(cfg: PretrainConfig):
    """The pre-training augmentation of cfg (the official AIM recipe)."""
    return aim_pretrain_transform(cfg.img_size, cfg.in_chans, *_norm_stats(cfg), scale=cfg.scale, hflip=cfg.hflip,
                                  color_jitter=cfg.color_jitter, color_jitter_prob=cfg.color_jitter_prob)


class Pretrainer(StepLoop):
    """Self-supervised pre-training of one llamavit trunk according to a PretrainConfig."""

    progress_desc = "pretrain"

    def __init__(self, cfg: PretrainConfig):
        self.init_loop(cfg)
        dataset = build_dataset(cfg.data, "train", pretrain_transform(cfg), img_size=cfg.img_size,
                                in_chans=cfg.in_chans, seed=cfg.seed)
        if cfg.train_subset:
            dataset = Subset(dataset, range(min(cfg.train_subset, len(dataset))))
        self.init_data(dataset)
        self.model_kwargs = {"num_classes": 0, "img_size": cfg.img_size, "in_chans": cfg.in_chans, **cfg.model_kwargs}
        model = create_model(cfg.model, **self.model_kwargs)
        if cfg.checkpoint_path:
            load_checkpoint(model, cfg.checkpoint_path)
        model.to(self.env.device)   # the objective probes the trunk once on the device
        if cfg.objective == "aim":
            decoder = DecoderConfig(cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_mlp_ratio,
                                    identity_attn_quirk=cfg.decoder_quirk)
            objective = AutoregressiveObjective(model, decoder, cfg.img_size, cfg.in_chans)
        else:
            objective = MAEObjective(model, MAEDecoderConfig(cfg.decoder_dim, cfg.decoder_depth, cfg.mask_ratio),
                                     cfg.in_chans)
        self.objective = objective
        self.init_training(objective, model=model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas,
                           warmup_steps=int(cfg.warmup_frac * self.total_steps), warmup_lr=cfg.warmup_lr,
                           min_lr=cfg.min_lr, ema_decay=cfg.ema_decay)
        self._recon_images: Optional[torch.Tensor] = None

    def meta(self) -> Dict[str, Any]:
        return {"model": self.cfg.model, "model_kwargs": self.model_kwargs, "classes": [],
                "objective": self.cfg.objective, "decoder": dataclasses.asdict(self.objective.decoder_cfg)}

    # --- one step ------------------------------------------------------------------------------
    def prepare_batch(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None):
        """This rank's images (labels are ignored) and, for AIM, their prefix lengths: drawn for the global
        batch from the step's generator, so every world size trains on the same prefixes."""
        images = images.to(self.env.device, non_blocking=True)
        if self.cfg.objective == "mae":
            return (images,)
        p = self.objective.patch_size
        n = (images.shape[-2] // p) * (images.shape[-1] // p)
        g = torch.Generator().manual_seed(mix_seed(self.cfg.seed, self.step, 31337))
        prefix = sample_prefix_lengths(self.cfg.batch_size, n, g, self.cfg.prefix_min, self.cfg.prefix_max)
        local = images.shape[0]
        return images, prefix[self.env.rank * local:(self.env.rank + 1) * local].to(self.env.device)

    def loss(self, images: torch.Tensor, prefix: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        args = (images,) if prefix is None else (images, prefix)
        return {"loss": self.train_module(*args)[0]}

    def after_step(self) -> None:
        if self.cfg.recon_every and self.step % self.cfg.recon_every == 0:
            self.save_reconstructions()

    def after_fit(self) -> None:
        self.save_reconstructions()

    # --- reconstructions -----------------------------------------------------------------------
    def _plain_images(self, num_images: int) -> torch.Tensor:
        """The first training images, centre-cropped, not augmented (the same ones at every call)."""
        if self._recon_images is None:
            cfg = self.cfg
            mean, std = _norm_stats(cfg)
            tf = T.Compose([ToRGB(), T.Resize(cfg.img_size, T.InterpolationMode.BICUBIC), T.CenterCrop(cfg.img_size),
                            T.ToTensor(), T.Normalize(mean, std)] + ([FirstChannel()] if cfg.in_chans == 1 else []))
            plain = build_dataset(cfg.data, "train", tf, img_size=cfg.img_size, in_chans=cfg.in_chans, seed=cfg.seed)
            self._recon_images = torch.stack([plain[i][0] for i in range(min(num_images, len(self.train_set)))])
        return self._recon_images.to(self.env.device)

    @torch.no_grad()
    def save_reconstructions(self, num_images: int = 8) -> str:
        """reconstructions.png. AIM: rows of originals and next-patch predictions with half the patches as
        prefix. MAE: originals, masked inputs, reconstructions. Predictions are un-normalised with each true
        patch's mean and std (as MAE's figures); given patches are shown as they are. Every rank runs the
        forward (collective under FSDP); rank 0 writes the file."""
        images = self._plain_images(num_images)
        p = self.objective.patch_size
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        n, c = grid[0] * grid[1], images.shape[1]
        was_training = self.objective.training
        self.objective.eval()
        patches = patchify(images.float(), p)
        mean, std = patches.mean(-1, keepdim=True), (patches.var(-1, keepdim=True) + 1e-6).sqrt()
        if self.cfg.objective == "aim":
            prefix = torch.full((images.shape[0],), n // 2, device=images.device)
            _, preds, _ = self.objective(images, prefix)
            recon = patches.clone()
            recon[:, 1:] = preds[:, :-1].float() * std[:, 1:] + mean[:, 1:]
            keep = torch.arange(n, device=images.device)[None, :, None] < prefix[:, None, None]
            rows = [images.float(), unpatchify(torch.where(keep, patches, recon), p, grid, c)]
        else:
            _, preds, mask = self.objective(images)
            hidden = mask[..., None].bool()
            rows = [images.float(), unpatchify(torch.where(hidden, torch.zeros_like(patches), patches), p, grid, c),
                    unpatchify(torch.where(hidden, preds.float() * std + mean, patches), p, grid, c)]
        self.objective.train(was_training)
        if not self.is_main:
            return ""
        out = torch.cat(rows)
        lo, hi = out.amin(dim=(1, 2, 3), keepdim=True), out.amax(dim=(1, 2, 3), keepdim=True)
        path = os.path.join(self.cfg.output, "reconstructions.png")
        save_image((out - lo) / (hi - lo + 1e-6), path, nrow=images.shape[0])
        return path


def pretrain(cfg: PretrainConfig) -> Dict[str, Any]:
    """Pre-train according to cfg and return the summary (steps, final loss)."""
    return Pretrainer(cfg).fit()
