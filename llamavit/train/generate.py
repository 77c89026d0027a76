"""Training a class-conditional DiT / DiT-LLaMA (`llamavit generate train`).

Objectives: 'ddpm' — DiT's recipe (t uniform over 1000 steps, eps MSE + learned-sigma VB) — or
'flow' — SiT's linear interpolant with velocity regression (t ~ U[0, 1]). DiT's optimiser: AdamW,
constant lr 1e-4, no weight decay; EMA of the weights (DiT: 0.9999; `ema_warmup` uses
min(decay, (1 + s) / (10 + s)) so short runs get a useful average: `DiTEma`, a timm ModelEmaV3). Label dropout
(the model's
class_dropout_prob, 0.1) trains the null class for classifier-free guidance.

Data: 'fashion_mnist' (28x28 zero-padded to 32x32, 1 channel, scaled to [-1, 1]), 'synthetic' (tests),
or a latents file (.pt or .safetensors holding 'latents' (N, C, H, W) already scaled, e.g. VAE
latents * 0.18215, and 'labels' (N,)): the model does not care which.

Training runs on the step loop (step_loop.py): model and EMA weights with metadata in safetensors,
optimiser and step in state.pt; data order per (seed, epoch), and t, noise and label dropout per
(seed, step), so a resumed run logs the same losses as an uninterrupted one.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
from timm.utils import ModelEmaV3
from torch.utils.data import Subset, TensorDataset

from ..data import build_dataset, generation_transform, is_latents_file, read_latents
from ..diffusion import GaussianDiffusion, LinearFlow
from ..data.seeding import mix_seed
from ..models import create_model, load_checkpoint
from .config import LoopConfig
from .step_loop import StepLoop

OBJECTIVES = ("ddpm", "flow")


@dataclass
class GenerateConfig(LoopConfig):
    """Options of `llamavit generate train` (with the step loop's, LoopConfig)."""
    _kind = "generation"
    model: str = "dit_llama_s_2"
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    checkpoint_path: Optional[str] = None
    objective: str = "ddpm"
    diffusion_steps: int = 1000
    # data
    data: str = "fashion_mnist"
    img_size: int = 32
    in_chans: int = 1
    train_subset: int = 0
    hflip: float = 0.0
    # optimisation (DiT: AdamW 1e-4 constant, no weight decay, EMA 0.9999 with a warm-up)
    lr: float = 1e-4
    weight_decay: float = 0.0
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    output: str = "runs/generate"
    max_minutes: float = 0.0           # > 0: stop (with a checkpoint) after this much training time

    _ranges = {"diffusion_steps": (">", 0), "img_size": (">", 0), "in_chans": (">", 0), "train_subset": (">=", 0),
               "hflip": ("in", (0, 1.001)), "lr": (">=", 0), "weight_decay": (">=", 0), "max_minutes": (">=", 0)}

    def __post_init__(self):
        super().__post_init__()
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")


HELP = {
    "objective": "'ddpm' (DiT: eps + learned-sigma VB) or 'flow' (SiT: linear interpolant, velocity)",
    "diffusion_steps": "DDPM timesteps (linear betas)",
    "data": "'fashion_mnist', 'synthetic', or a latents file (.pt/.safetensors with 'latents' and 'labels')",
    "ema_decay": "EMA decay of the weights (DiT: 0.9999)",
    "ema_warmup": "EMA decay min(decay, (1+step)/(10+step)) early on",
    "img_size": "image side in pixels (Fashion-MNIST 28 is padded to it)",
    "max_minutes": "stop after this many minutes of training, with a checkpoint (0 = no limit)",
}


def build_generative_dataset(cfg: GenerateConfig):
    """(dataset of (x in [-1, 1] or latents, label), class names, pixel space?)."""
    if is_latents_file(cfg.data):
        latents, labels = read_latents(cfg.data)
        return TensorDataset(latents, labels), [str(c) for c in range(int(labels.max()) + 1)], False
    native = 28 if cfg.data == "fashion_mnist" else cfg.img_size
    ds = build_dataset(cfg.data, "train", generation_transform(cfg.img_size, cfg.in_chans, cfg.hflip, native),
                       img_size=cfg.img_size, in_chans=cfg.in_chans, seed=cfg.seed)
    return ds, list(ds.classes), True


class DiTEma(ModelEmaV3):
    """timm's ModelEmaV3 with DiT-style warm-up: decay min(decay, (1 + s) / (10 + s)) after s optimiser
    steps, so a short run's average is not dominated by the random initialisation."""

    def get_decay(self, step: Optional[int] = None) -> float:
        return self.decay if step is None else min(self.decay, (1 + step) / (10 + step))


class GenerativeTrainer(StepLoop):
    """Trains one DiT / DiT-LLaMA according to a GenerateConfig."""

    progress_desc = "diffusion"
    step_salt = 271828   # t, noise and label dropout draw from (seed, step, salt)

    def __init__(self, cfg: GenerateConfig):
        self.init_loop(cfg)
        dataset, self.classes, self.pixels = build_generative_dataset(cfg)
        if cfg.train_subset:
            dataset = Subset(dataset, range(min(cfg.train_subset, len(dataset))))
        sample = dataset[0][0]
        self.init_data(dataset)
        self.model_kwargs = {"img_size": sample.shape[-1], "in_chans": sample.shape[0],
                             "num_classes": len(self.classes), **cfg.model_kwargs}
        model = create_model(cfg.model, **self.model_kwargs)
        if not hasattr(model, "t_embedder"):
            raise ValueError(f"{cfg.model} is not a diffusion model; use a dit_* or dit_llama_* model")
        if cfg.checkpoint_path:
            load_checkpoint(model, cfg.checkpoint_path)
        if cfg.objective == "ddpm":
            self.objective = GaussianDiffusion.create(cfg.diffusion_steps, learn_sigma=model.cfg.learn_sigma)
        else:
            self.objective = LinearFlow()
        self.init_training(model, lr=cfg.lr, weight_decay=cfg.weight_decay, schedule="constant",
                           ema_decay=cfg.ema_decay, ema_class=DiTEma if cfg.ema_warmup else ModelEmaV3)

    def meta(self) -> Dict[str, Any]:
        return {"model": self.cfg.model, "model_kwargs": self.model_kwargs, "classes": self.classes,
                "objective": self.cfg.objective, "diffusion_steps": self.cfg.diffusion_steps,
                "pixels": self.pixels}

    def time_limit_s(self) -> float:
        return 60.0 * self.cfg.max_minutes

    def summary_extras(self) -> Dict[str, Any]:
        return {"objective": self.cfg.objective, "params": sum(p.numel() for p in self.model.parameters())}

    def prepare_batch(self, x: torch.Tensor, y: torch.Tensor):
        """(x, y) on the device with the step's noise and timesteps (drawn from the step's generator)."""
        x, y = x.to(self.env.device), y.to(self.env.device)
        seed = mix_seed(self.cfg.seed, self.step, self.step_salt + self.env.rank)
        g = torch.Generator(device=x.device).manual_seed(seed)
        noise = torch.randn(x.shape, generator=g, device=x.device)
        if self.cfg.objective == "ddpm":
            t = torch.randint(0, self.objective.num_timesteps, (x.shape[0],), generator=g, device=x.device)
        else:
            t = torch.rand(x.shape[0], generator=g, device=x.device)
        return x, y, noise, t

    def loss(self, x: torch.Tensor, y: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The objective's loss terms, averaged over the micro-batch ('loss' is what is minimised)."""
        terms = self.objective.training_losses(lambda xt, tt: self.train_module(xt, tt, y), x, t, noise)
        return {k: v.mean() for k, v in terms.items()}


def train_generative(cfg: GenerateConfig) -> Dict[str, Any]:
    """Train according to cfg and return the summary."""
    return GenerativeTrainer(cfg).fit()
