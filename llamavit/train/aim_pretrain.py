"""AIM pre-training loop (`llamavit pretrain aim`): the recipe of ml-l3m configs/aimv1 on any trunk.

AdamW (betas 0.9/0.95, wd 0.05 off biases/norms), linear warm-up over `warmup_frac` of the steps then
cosine (timm), gradient clipping, optional bf16 autocast, the official augmentations (RandomResizedCrop
0.4-1 bicubic, flip, ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8). Checkpoints are the supervised
loop's (train/checkpoint.py): the trunk's weights + metadata in model.safetensors (so `probe`,
`finetune` and `create_model(checkpoint_path=...)` read it), decoder and optimiser in state.pt.
Resume is exact for the same reasons as the supervised loop: per-(seed, epoch) data order,
per-(seed, epoch, index) augmentation and per-(seed, step) prefix lengths.
"""
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
from timm.data import create_transform
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch.utils.data import Subset
from torchvision import transforms as T
from torchvision.utils import save_image

from ..data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, build_dataset
from ..data.transforms import FirstChannel, ToRGB, _channels
from ..models import create_model, load_checkpoint
from .aim_objective import AutoregressiveObjective, DecoderConfig, patchify, sample_prefix_lengths, unpatchify
from .checkpoint import load_training_state, save_checkpoint
from .config import Options
from .step_loop import EpochBatchSampler, SeededAugmentation, StepLoop, mix_seed, seed_everything


@dataclass
class PretrainConfig(Options):
    _kind = "pre-training"
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
    # data and the official augmentations
    data: str = "fashion_mnist"
    train_subset: int = 0
    num_workers: int = 0
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None
    scale: Tuple[float, float] = (0.4, 1.0)
    hflip: float = 0.5
    color_jitter: Tuple[float, ...] = (0.4, 0.4, 0.2, 0.1)
    color_jitter_prob: float = 0.8
    # optimisation
    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    min_lr: float = 0.0
    warmup_frac: float = 0.025
    warmup_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: Tuple[float, float] = (0.9, 0.95)
    clip_grad: Optional[float] = 1.0
    amp: bool = False                      # bf16 autocast
    device: str = "cpu"
    # bookkeeping
    output: str = "runs/pretrain"
    seed: int = 0
    resume: bool = False
    max_steps: int = 0
    log_every: int = 20
    ckpt_every: int = 0
    keep_checkpoints: int = 2
    recon_every: int = 0                   # >0: save reconstructions.png every N steps (and at the end)
    mask_ratio: float = 0.75               # MAE only: fraction of patches hidden from the encoder
    progress: bool = True

    def __post_init__(self):
        self._lists_to_tuples("scale", "betas", "mean", "std", "color_jitter")
        self._require_positive("epochs", "batch_size")


HELP = {
    "decoder_dim": "width of the MLP pixel decoder", "decoder_depth": "MLP blocks in the decoder",
    "decoder_mlp_ratio": "decoder MLP hidden ratio",
    "decoder_quirk": "keep the official decoder's x + LN(x) step (its identity attention)",
    "prefix_min": "smallest prefix length", "prefix_max": "largest prefix length (0 = patches - 1)",
    "color_jitter": "ColorJitter brightness contrast saturation hue", "color_jitter_prob": "ColorJitter probability",
    "warmup_frac": "linear warm-up as a fraction of all steps", "device": "cpu or cuda",
    "recon_every": "save reconstructions.png every N steps (0 = only at the end)",
}


def _norm_stats(cfg: PretrainConfig):
    mean, std = cfg.mean, cfg.std
    if cfg.data == "fashion_mnist" and mean is None:
        mean, std = FASHION_MNIST_MEAN, FASHION_MNIST_STD
    mean = _channels(_channels(mean, (0.485, 0.456, 0.406), cfg.in_chans), (), 3)
    std = _channels(_channels(std, (0.229, 0.224, 0.225), cfg.in_chans), (), 3)
    return mean, std


def pretrain_transform(cfg: PretrainConfig):
    """PIL image -> augmented, normalised (in_chans, img_size, img_size) tensor (official AIM recipe)."""
    mean, std = _norm_stats(cfg)
    tf = create_transform(input_size=(3, cfg.img_size, cfg.img_size), is_training=True, scale=cfg.scale,
                          hflip=cfg.hflip, vflip=0.0, color_jitter=cfg.color_jitter,
                          color_jitter_prob=cfg.color_jitter_prob, interpolation="bicubic", mean=mean, std=std)
    return T.Compose([ToRGB(), tf] + ([FirstChannel()] if cfg.in_chans == 1 else []))


class AIMPretrainer(StepLoop):
    """Autoregressive pre-training of one llamavit trunk according to a PretrainConfig."""

    progress_desc = "pretrain"

    def __init__(self, cfg: PretrainConfig):
        self.cfg = cfg
        seed_everything(cfg.seed)
        dataset = build_dataset(cfg.data, "train", pretrain_transform(cfg), img_size=cfg.img_size,
                                in_chans=cfg.in_chans, seed=cfg.seed)
        if cfg.train_subset:
            dataset = Subset(dataset, range(min(cfg.train_subset, len(dataset))))
        self.train_set = SeededAugmentation(dataset, cfg.seed)
        self.sampler = EpochBatchSampler(len(dataset), cfg.batch_size, cfg.seed)
        self.steps_per_epoch = len(dataset) // cfg.batch_size
        self.total_steps = cfg.epochs * self.steps_per_epoch

        self.model_kwargs = {"num_classes": 0, "img_size": cfg.img_size, "in_chans": cfg.in_chans, **cfg.model_kwargs}
        self.model = create_model(cfg.model, **self.model_kwargs)
        if cfg.checkpoint_path:
            load_checkpoint(self.model, cfg.checkpoint_path)
        self.model.to(cfg.device)
        self.objective = self.build_objective().to(cfg.device)
        self.optimizer = create_optimizer_v2(self.objective, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay,
                                             betas=tuple(cfg.betas))
        self.scheduler = CosineLRScheduler(self.optimizer, t_initial=self.total_steps, lr_min=cfg.min_lr,
                                           warmup_t=int(cfg.warmup_frac * self.total_steps),
                                           warmup_lr_init=cfg.warmup_lr, t_in_epochs=False)
        self.init_loop()
        self._recon_images: Optional[torch.Tensor] = None

    objective_name = "aim"

    def build_objective(self) -> torch.nn.Module:
        """The trunk + decoder module; `forward(images, prefix) -> (loss, predictions, targets)`."""
        cfg = self.cfg
        decoder = DecoderConfig(cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_mlp_ratio,
                                identity_attn_quirk=cfg.decoder_quirk)
        return AutoregressiveObjective(self.model, decoder, cfg.img_size, cfg.in_chans)

    # --- checkpoints (the supervised loop's format) -----------------------------------------------
    def save(self) -> str:
        meta = {"model": self.cfg.model, "model_kwargs": self.model_kwargs, "classes": [],
                "objective": self.objective_name, "decoder": dataclasses.asdict(self.objective.decoder_cfg)}
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "config": self.cfg.to_dict(),
                 "decoder": {k: v.detach().cpu() for k, v in self.objective.decoder.state_dict().items()}}
        return save_checkpoint(self.cfg.output, self.step, self.model, meta, state, keep=self.cfg.keep_checkpoints)

    def restore(self, checkpoint_dir: str) -> int:
        state = load_training_state(checkpoint_dir)
        load_checkpoint(self.model, checkpoint_dir)
        self.objective.decoder.load_state_dict(state["decoder"])
        self.optimizer.load_state_dict(state["optimizer"])
        return int(state["step"])

    def trained_module(self) -> torch.nn.Module:
        return self.objective

    def after_step(self) -> None:
        if self.cfg.recon_every and self.step % self.cfg.recon_every == 0:
            self.save_reconstructions()

    def after_fit(self) -> None:
        self.save_reconstructions()

    # --- one step ------------------------------------------------------------------------------
    def prefix_lengths(self, batch: int, num_patches: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(mix_seed(self.cfg.seed, self.step, 31337))
        return sample_prefix_lengths(batch, num_patches, g, self.cfg.prefix_min, self.cfg.prefix_max)

    def train_step(self, images: torch.Tensor, labels: Optional[torch.Tensor] = None) -> Dict[str, float]:
        """One optimiser step on a batch of images (labels are ignored) -> {'loss': value}."""
        cfg = self.cfg
        self.scheduler.step_update(self.step)
        self.seed_step(104729)
        images = images.to(cfg.device)
        n = (images.shape[-2] // self.objective.patch_size) * (images.shape[-1] // self.objective.patch_size)
        prefix = self.prefix_lengths(images.shape[0], n)
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=cfg.amp):
            loss, _, _ = self.objective(images, prefix)
        value = loss.item()
        self.check_loss(value)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.objective.parameters(), cfg.clip_grad)
        self.optimizer.step()
        self.step += 1
        return {"loss": value}

    @torch.no_grad()
    def save_reconstructions(self, num_images: int = 8) -> str:
        """reconstructions.png: rows of originals and next-patch predictions with half the patches as prefix.

        Predictions are un-normalised with each true patch's mean and std (as MAE's figures), prefix patches
        are shown as they are.
        """
        cfg = self.cfg
        if self._recon_images is None:   # the first training images, centre-cropped, not augmented
            mean, std = _norm_stats(cfg)
            tf = T.Compose([ToRGB(), T.Resize(cfg.img_size, T.InterpolationMode.BICUBIC), T.CenterCrop(cfg.img_size),
                            T.ToTensor(), T.Normalize(mean, std)] + ([FirstChannel()] if cfg.in_chans == 1 else []))
            plain = build_dataset(cfg.data, "train", tf, img_size=cfg.img_size, in_chans=cfg.in_chans, seed=cfg.seed)
            self._recon_images = torch.stack([plain[i][0] for i in range(min(num_images, len(self.train_set)))])
        images = self._recon_images.to(cfg.device)
        p = self.objective.patch_size
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        n = grid[0] * grid[1]
        prefix = torch.full((images.shape[0],), n // 2, device=images.device)
        was_training = self.objective.training
        self.objective.eval()
        _, preds, _ = self.objective(images, prefix)
        self.objective.train(was_training)
        patches = patchify(images.float(), p)
        mean, std = patches.mean(-1, keepdim=True), (patches.var(-1, keepdim=True) + 1e-6).sqrt()
        recon = patches.clone()
        recon[:, 1:] = preds[:, :-1].float() * std[:, 1:] + mean[:, 1:]
        keep = torch.arange(n, device=images.device)[None, :, None] < prefix[:, None, None]
        recon = torch.where(keep, patches, recon)
        out = torch.cat((images.float(), unpatchify(recon, p, grid, images.shape[1])))
        lo, hi = out.amin(dim=(1, 2, 3), keepdim=True), out.amax(dim=(1, 2, 3), keepdim=True)
        path = os.path.join(cfg.output, "reconstructions.png")
        save_image((out - lo) / (hi - lo + 1e-6), path, nrow=images.shape[0])
        return path


def pretrain(cfg: PretrainConfig) -> Dict[str, Any]:
    """Pre-train according to cfg and return the summary (steps, final loss)."""
    return AIMPretrainer(cfg).fit()
