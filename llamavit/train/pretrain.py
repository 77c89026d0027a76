"""Self-supervised pre-training (`llamavit pretrain aim|mae`) on the step loop.

AIM: the recipe of ml-l3m configs/aimv1 on any trunk that takes an attention mask (prefix-causal attention,
MLP pixel decoder, next-patch regression): AdamW (betas 0.9/0.95, wd 0.05 off biases/norms), linear
warm-up over `warmup_frac` of the steps then cosine (timm), gradient clipping, optional bf16 autocast, the
official augmentations (RandomResizedCrop 0.4-1 bicubic, flip, ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8).
The paper's ablations are options: the patch `order`, the `target` (normalised pixels, pixels, k-means
tokens: the codebook is fitted on the first `codebook_images` training images and kept in the run directory),
`attention` (prefix-causal or fully causal), the decoder's depth (0 = linear) and width, and the masked
baseline on the same trunk (`objective: masked`). `val_images` adds a held-out pre-training loss (test split).
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
from ..objectives import (ORDERS, TARGETS, AutoregressiveObjective, DecoderConfig, MAEDecoderConfig, MAEObjective,
                          MaskedObjective, fit_codebook, load_codebook, patchify, random_patch_mask,
                          sample_prefix_lengths, save_codebook, trunk_patch_size, unpatchify)
from .config import LoopConfig
from .step_loop import StepLoop

OBJECTIVES = ("aim", "masked", "mae")
ATTENTIONS = ("prefix", "causal")
CODEBOOK_NAME = "codebook.safetensors"
# MAE's recipe where it differs from AIM's (facebookresearch/mae): light decoder, crops 0.2-1, no colour jitter
MAE_DEFAULTS = {"decoder_dim": 256, "decoder_depth": 4, "scale": (0.2, 1.0), "color_jitter_prob": 0.0}


@dataclass
class PretrainConfig(LoopConfig):
    """Options of `llamavit pretrain aim|mae` (with the step loop's, LoopConfig)."""
    _kind = "pre-training"
    # 'aim' (next-patch prediction) | 'masked' (AIM's masked baseline, same trunk) | 'mae' (plain VisionLLaMA)
    objective: str = "aim"
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
    mask_ratio: float = 0.75               # masked / MAE: fraction of patches hidden
    order: str = "raster"                  # AIM: the patch order (llamavit.objectives.orders)
    order_seed: int = 0                    # the 'random' order's permutation
    attention: str = "prefix"              # AIM: 'prefix' (prefix-causal) | 'causal' (prefix length 1)
    target: str = "normalized"             # 'normalized' | 'pixels' | 'tokens' (k-means patch codes)
    codebook_size: int = 512
    codebook_images: int = 1000            # training images whose patches fit the codebook
    val_images: int = 0                    # >0: held-out pre-training loss on the first N test images
    val_every: int = 0                     # steps between held-out losses (0 = every epoch)
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
               "betas": ("each in", (0, 1)), "recon_every": (">=", 0), "order_seed": (">=", 0),
               "codebook_size": (">", 1), "codebook_images": (">", 0), "val_images": (">=", 0),
               "val_every": (">=", 0)}

    def __post_init__(self):
        super().__post_init__()
        for name, choices in (("objective", OBJECTIVES), ("order", ORDERS), ("attention", ATTENTIONS),
                              ("target", TARGETS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.objective == "mae" and self.target != "normalized":
            raise ValueError(f"the MAE objective predicts normalised pixels only, got target {self.target!r}")
        if self.objective != "aim" and (self.order != "raster" or self.attention != "prefix"):
            raise ValueError(f"order and attention are options of the autoregressive objective, not of "
                             f"{self.objective!r}")


HELP = {
    "objective": "aim (next-patch regression, prefix-causal) | mae (masked reconstruction, plain VisionLLaMA)",
    "decoder_dim": "width of the pixel decoder", "decoder_depth": "blocks in the decoder (0 = one linear layer)",
    "decoder_mlp_ratio": "decoder MLP hidden ratio",
    "decoder_quirk": "keep the official AIM decoder's x + LN(x) step (its identity attention)",
    "prefix_min": "smallest prefix length", "prefix_max": "largest prefix length (0 = patches - 1)",
    "mask_ratio": "masked / MAE: fraction of patches hidden",
    "order": f"AIM patch order: {' | '.join(ORDERS)}", "order_seed": "seed of the 'random' order",
    "attention": "AIM attention: prefix (prefix-causal, the paper's) | causal (fully causal)",
    "target": "normalized (per-patch normalised pixels) | pixels | tokens (k-means patch codes, cross-entropy)",
    "codebook_size": "tokens target: k-means codes",
    "codebook_images": "tokens target: images the codebook is fitted on",
    "val_images": "held-out pre-training loss on the first N test images (0 = none)",
    "val_every": "steps between held-out losses (0 = every epoch)",
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


def plain_images(cfg: PretrainConfig, split: str, num_images: int) -> torch.Tensor:
    """The first `num_images` images of a split, resized and centre-cropped, not augmented: (M, C, H, W)."""
    mean, std = _norm_stats(cfg)
    tf = T.Compose([ToRGB(), T.Resize(cfg.img_size, T.InterpolationMode.BICUBIC), T.CenterCrop(cfg.img_size),
                    T.ToTensor(), T.Normalize(mean, std)] + ([FirstChannel()] if cfg.in_chans == 1 else []))
    dataset = build_dataset(cfg.data, split, tf, img_size=cfg.img_size, in_chans=cfg.in_chans, seed=cfg.seed)
    return torch.stack([dataset[i][0] for i in range(min(num_images, len(dataset)))])


def patch_codebook(cfg: PretrainConfig, patch_size: int, is_main: bool = True):
    """The run's k-means patch codebook: read from the run directory, else fitted on the first
    `codebook_images` training images (seeded) and written there (by rank 0)."""
    path = os.path.join(cfg.output, CODEBOOK_NAME)
    if os.path.isfile(path):
        return load_codebook(path)
    patches = patchify(plain_images(cfg, "train", cfg.codebook_images), patch_size)
    codebook = fit_codebook(patches.reshape(-1, patches.shape[-1]), cfg.codebook_size, cfg.seed)
    if is_main:
        os.makedirs(cfg.output, exist_ok=True)
        save_codebook(codebook, path + ".tmp", images=cfg.codebook_images, data=cfg.data, seed=cfg.seed)
        os.replace(path + ".tmp", path)
    return codebook


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
        if cfg.objective == "mae":
            objective = MAEObjective(model, MAEDecoderConfig(cfg.decoder_dim, cfg.decoder_depth, cfg.mask_ratio),
                                     cfg.in_chans)
        else:
            decoder = DecoderConfig(cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_mlp_ratio,
                                    identity_attn_quirk=cfg.decoder_quirk)
            codebook = patch_codebook(cfg, trunk_patch_size(model), self.is_main) \
                if cfg.target == "tokens" else None
            common = dict(img_size=cfg.img_size, in_chans=cfg.in_chans, target=cfg.target, codebook=codebook)
            objective = (AutoregressiveObjective(model, decoder, order=cfg.order, order_seed=cfg.order_seed, **common)
                         if cfg.objective == "aim" else MaskedObjective(model, decoder, mask_ratio=cfg.mask_ratio,
                                                                       **common))
        self.objective = objective
        self.init_training(objective, model=model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas,
                           warmup_steps=int(cfg.warmup_frac * self.total_steps), warmup_lr=cfg.warmup_lr,
                           min_lr=cfg.min_lr, ema_decay=cfg.ema_decay)
        self._recon_images: Optional[torch.Tensor] = None
        self._val_images: Optional[torch.Tensor] = None

    def meta(self) -> Dict[str, Any]:
        cfg = self.cfg
        facts = {"model": cfg.model, "model_kwargs": self.model_kwargs, "classes": [], "objective": cfg.objective,
                 "decoder": dataclasses.asdict(self.objective.decoder_cfg)}
        if cfg.objective != "mae":
            facts.update(target=cfg.target, **({"order": cfg.order, "attention": cfg.attention}
                                               if cfg.objective == "aim" else {"mask_ratio": cfg.mask_ratio}))
        return facts

    # --- one step ------------------------------------------------------------------------------
    def prepare_batch(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None):
        """This rank's images (labels are ignored) and what the objective draws per sample: AIM's prefix
        lengths (all 1 under fully causal attention) or the masked objective's hidden patches, drawn for the
        global batch from the step's generator, so every world size trains on the same ones."""
        images = images.to(self.env.device, non_blocking=True)
        if self.cfg.objective == "mae":
            return (images,)
        g = torch.Generator().manual_seed(mix_seed(self.cfg.seed, self.step, 31337))
        drawn = self._draw(self.cfg.batch_size, images, g)
        local = images.shape[0]
        return images, drawn[self.env.rank * local:(self.env.rank + 1) * local].to(self.env.device)

    def _draw(self, batch: int, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        p = self.objective.patch_size
        n = (images.shape[-2] // p) * (images.shape[-1] // p)
        if self.cfg.objective == "masked":
            return random_patch_mask(batch, n, self.cfg.mask_ratio, generator)
        if self.cfg.attention == "causal":
            return torch.ones(batch, dtype=torch.long)
        return sample_prefix_lengths(batch, n, generator, self.cfg.prefix_min, self.cfg.prefix_max)

    def loss(self, images: torch.Tensor, drawn: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        args = (images,) if drawn is None else (images, drawn)
        return {"loss": self.train_module(*args)[0]}

    def after_step(self) -> None:
        cfg = self.cfg
        if cfg.recon_every and self.step % cfg.recon_every == 0:
            self.save_reconstructions()
        if cfg.val_images and self.step % (cfg.val_every or self.steps_per_epoch) == 0:
            self.log({"step": self.step, "epoch": self.step / self.steps_per_epoch,
                      "val_loss": self.validation_loss()})

    def after_fit(self) -> None:
        self.save_reconstructions()

    @torch.no_grad()
    def validation_loss(self) -> float:
        """The objective's loss on the first `val_images` test images, not augmented, with prefixes / masks
        drawn from a fixed seed (the same at every call), so its curve shows over- or under-fitting. Every
        rank computes it on all of them (collective under FSDP)."""
        cfg = self.cfg
        if self._val_images is None:
            self._val_images = plain_images(cfg, "val", cfg.val_images)
        was_training = self.objective.training
        self.objective.eval()
        total, count = 0.0, 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(cfg.seed, 0, 4242))   # MAE draws its masks from the global RNG
            g = torch.Generator().manual_seed(mix_seed(cfg.seed, 0, 4242))
            for start in range(0, len(self._val_images), cfg.batch_size):
                images = self._val_images[start:start + cfg.batch_size].to(self.env.device)
                args = (images,) if cfg.objective == "mae" else (
                    images, self._draw(images.shape[0], images, g).to(self.env.device))
                with torch.autocast(self.env.device.type, dtype=torch.bfloat16, enabled=self.amp):
                    loss = self.train_module(*args)[0]
                total, count = total + loss.float().item() * images.shape[0], count + images.shape[0]
        self.objective.train(was_training)
        return total / count

    def summary_extras(self) -> Dict[str, Any]:
        curve = [{"step": r["step"], "val_loss": r["val_loss"]} for r in self.history if "val_loss" in r]
        return {"val_curve": curve, "final_val_loss": curve[-1]["val_loss"]} if curve else {}

    # --- reconstructions -----------------------------------------------------------------------
    @torch.no_grad()
    def save_reconstructions(self, num_images: int = 8) -> str:
        """reconstructions.png: rows of originals, what the objective was given (AIM: the first half of the
        order as prefix; masked / MAE: the visible patches), and its predictions filled in, on the first
        training images (the same at every call). Normalised predictions are un-normalised with each true
        patch's mean and std (as MAE's figures), codes drawn as their centroids. Every rank runs the forward
        (collective under FSDP); rank 0 writes the file."""
        if self._recon_images is None:
            self._recon_images = plain_images(self.cfg, "train", min(num_images, len(self.train_set)))
        images = self._recon_images.to(self.env.device)
        p = self.objective.patch_size
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        was_training = self.objective.training
        self.objective.eval()
        recon, given = self.objective.reconstruct(images)
        self.objective.train(was_training)
        if not self.is_main:
            return ""
        patches = patchify(images.float(), p)
        shown = torch.where(given[..., None], patches, torch.zeros_like(patches))
        c = images.shape[1]
        out = torch.cat([images.float(), unpatchify(shown, p, grid, c), unpatchify(recon.float(), p, grid, c)])
        lo, hi = out.amin(dim=(1, 2, 3), keepdim=True), out.amax(dim=(1, 2, 3), keepdim=True)
        path = os.path.join(self.cfg.output, "reconstructions.png")
        save_image((out - lo) / (hi - lo + 1e-6), path, nrow=images.shape[0])
        return path


def pretrain(cfg: PretrainConfig) -> Dict[str, Any]:
    """Pre-train according to cfg and return the summary (steps, final loss)."""
    return Pretrainer(cfg).fit()
