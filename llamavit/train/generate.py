"""Training a class-conditional DiT / DiT-LLaMA (`llamavit generate train`).

Objectives: 'ddpm' — DiT's recipe (t uniform over 1000 steps, eps MSE + learned-sigma VB) — or
'flow' — SiT's linear interpolant with velocity regression (t ~ U[0, 1]). DiT's optimiser: AdamW,
constant lr 1e-4, no weight decay; EMA of the weights (DiT: 0.9999; `ema_warmup` uses
min(decay, (1 + s) / (10 + s)) so short runs get a useful average). Label dropout (the model's
class_dropout_prob, 0.1) trains the null class for classifier-free guidance.

Data: 'fashion_mnist' (28x28 zero-padded to 32x32, 1 channel, scaled to [-1, 1]), 'synthetic' (tests),
or a latents file (.pt or .safetensors holding 'latents' (N, C, H, W) already scaled, e.g. VAE
latents * 0.18215, and 'labels' (N,)): the model does not care which.

Checkpoints and resume are the supervised loop's (train/checkpoint.py): model and EMA weights with
metadata in safetensors, optimiser and step in state.pt; data order per (seed, epoch), and t, noise and
label dropout per (seed, step), so a resumed run logs the same losses as an uninterrupted one.
"""
import copy
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
from torch.utils.data import Subset, TensorDataset
from torchvision import transforms as T

from ..data import build_dataset
from ..data.transforms import ToRGB
from ..diffusion import GaussianDiffusion, LinearFlow
from ..models import create_model, load_checkpoint
from .checkpoint import EMA_NAME, load_training_state, save_checkpoint
from .config import Options
from .step_loop import EpochBatchSampler, SeededAugmentation, StepLoop, seed_everything

OBJECTIVES = ("ddpm", "flow")


@dataclass
class GenerateConfig(Options):
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
    num_workers: int = 0
    # optimisation (DiT: AdamW 1e-4, no weight decay, EMA 0.9999)
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 0.0
    clip_grad: Optional[float] = None
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    amp: bool = False
    device: str = "cpu"
    # bookkeeping
    output: str = "runs/generate"
    seed: int = 0
    resume: bool = False
    max_steps: int = 0
    max_minutes: float = 0.0           # > 0: stop (with a checkpoint) after this much training time
    log_every: int = 20
    ckpt_every: int = 0
    keep_checkpoints: int = 2
    progress: bool = True

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        self._require_positive("epochs", "batch_size")


HELP = {
    "objective": "'ddpm' (DiT: eps + learned-sigma VB) or 'flow' (SiT: linear interpolant, velocity)",
    "diffusion_steps": "DDPM timesteps (linear betas)",
    "data": "'fashion_mnist', 'synthetic', or a latents file (.pt/.safetensors with 'latents' and 'labels')",
    "ema_decay": "EMA decay of the weights (DiT: 0.9999)",
    "ema_warmup": "EMA decay min(decay, (1+step)/(10+step)) early on",
    "img_size": "image side in pixels (Fashion-MNIST 28 is padded to it)",
    "max_minutes": "stop after this many minutes of training, with a checkpoint (0 = no limit)",
}


def _is_latents(data: str) -> bool:
    return data.endswith((".pt", ".pth", ".safetensors")) and os.path.isfile(data)


def read_latents(path: str):
    """(latents (N, C, H, W) float32, labels (N,) long) from a .pt or .safetensors file."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        obj = load_file(path)
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or "latents" not in obj or "labels" not in obj:
        raise ValueError(f"{path} must hold a dict with 'latents' (N, C, H, W) and 'labels' (N,)")
    latents, labels = obj["latents"].float(), obj["labels"].long()
    if latents.ndim != 4 or len(labels) != len(latents):
        raise ValueError(f"{path}: latents {tuple(latents.shape)} and labels {tuple(labels.shape)} do not match")
    return latents, labels


def pixel_transform(img_size: int, in_chans: int, hflip: float = 0.0, native: int = 28):
    """PIL image -> (in_chans, img_size, img_size) in [-1, 1]; images `native` px wide are zero-padded."""
    steps: List[Any] = [T.Grayscale(1) if in_chans == 1 else ToRGB()]
    if img_size >= native and (img_size - native) % 2 == 0:
        steps.append(T.Pad((img_size - native) // 2))
    steps += [T.Resize((img_size, img_size)), T.RandomHorizontalFlip(hflip), T.ToTensor(),
              T.Normalize((0.5,) * in_chans, (0.5,) * in_chans)]
    return T.Compose(steps)


def build_generative_dataset(cfg: GenerateConfig):
    """(dataset of (x in [-1, 1] or latents, label), class names, pixel space?)."""
    if _is_latents(cfg.data):
        latents, labels = read_latents(cfg.data)
        return TensorDataset(latents, labels), [str(c) for c in range(int(labels.max()) + 1)], False
    native = 28 if cfg.data == "fashion_mnist" else cfg.img_size
    ds = build_dataset(cfg.data, "train", pixel_transform(cfg.img_size, cfg.in_chans, cfg.hflip, native),
                       img_size=cfg.img_size, in_chans=cfg.in_chans, seed=cfg.seed)
    return ds, list(ds.classes), True


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.mul_(decay).add_(p.detach(), alpha=1 - decay)


class GenerativeTrainer(StepLoop):
    """Trains one DiT / DiT-LLaMA according to a GenerateConfig."""

    progress_desc = "diffusion"

    def __init__(self, cfg: GenerateConfig):
        self.cfg = cfg
        seed_everything(cfg.seed)
        dataset, self.classes, self.pixels = build_generative_dataset(cfg)
        if cfg.train_subset:
            dataset = Subset(dataset, range(min(cfg.train_subset, len(dataset))))
        sample = dataset[0][0]
        self.train_set = SeededAugmentation(dataset, cfg.seed)
        self.sampler = EpochBatchSampler(len(dataset), cfg.batch_size, cfg.seed)
        self.steps_per_epoch = len(dataset) // cfg.batch_size
        self.total_steps = cfg.epochs * self.steps_per_epoch

        self.model_kwargs = {"img_size": sample.shape[-1], "in_chans": sample.shape[0],
                             "num_classes": len(self.classes), **cfg.model_kwargs}
        self.model = create_model(cfg.model, **self.model_kwargs)
        if not hasattr(self.model, "t_embedder"):
            raise ValueError(f"{cfg.model} is not a diffusion model; use a dit_* or dit_llama_* model")
        if cfg.checkpoint_path:
            load_checkpoint(self.model, cfg.checkpoint_path)
        self.model.to(cfg.device)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False) if cfg.ema_decay > 0 else None
        if cfg.objective == "ddpm":
            self.objective = GaussianDiffusion.create(cfg.diffusion_steps, learn_sigma=self.model.cfg.learn_sigma)
        else:
            self.objective = LinearFlow()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.init_loop()

    def meta(self) -> Dict[str, Any]:
        return {"model": self.cfg.model, "model_kwargs": self.model_kwargs, "classes": self.classes,
                "objective": self.cfg.objective, "diffusion_steps": self.cfg.diffusion_steps,
                "pixels": self.pixels}

    def save(self) -> str:
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "config": self.cfg.to_dict()}
        return save_checkpoint(self.cfg.output, self.step, self.model, self.meta(), state, ema=self.ema,
                               keep=self.cfg.keep_checkpoints)

    def restore(self, checkpoint_dir: str) -> int:
        state = load_training_state(checkpoint_dir)
        load_checkpoint(self.model, checkpoint_dir)
        if self.ema is not None:
            load_checkpoint(self.ema, os.path.join(checkpoint_dir, EMA_NAME))
        self.optimizer.load_state_dict(state["optimizer"])
        return int(state["step"])

    def trained_module(self) -> nn.Module:
        return self.model

    def time_limit_s(self) -> float:
        return 60.0 * self.cfg.max_minutes

    def summary_extras(self) -> Dict[str, Any]:
        return {"objective": self.cfg.objective, "params": sum(p.numel() for p in self.model.parameters())}

    def losses(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        """Per-sample loss terms of one batch; t and noise drawn from `generator`."""
        b = x.shape[0]
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        fn = lambda xt, t: self.model(xt, t, y)  # noqa: E731
        if self.cfg.objective == "ddpm":
            t = torch.randint(0, self.objective.num_timesteps, (b,), generator=generator, device=x.device)
        else:
            t = torch.rand(b, generator=generator, device=x.device)
        return self.objective.training_losses(fn, x, t, noise)

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
        cfg = self.cfg
        step_seed = self.seed_step(271828)   # label dropout draws from the global generator
        g = torch.Generator(device=cfg.device).manual_seed(step_seed)
        x, y = x.to(cfg.device), y.to(cfg.device)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.amp):
            terms = self.losses(x, y, g)
        loss = terms["loss"].mean()
        self.check_loss(loss.item())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
        self.optimizer.step()
        self.step += 1
        if self.ema is not None:
            decay = min(cfg.ema_decay, (1 + self.step) / (10 + self.step)) if cfg.ema_warmup else cfg.ema_decay
            ema_update(self.ema, self.model, decay)
        return {k: v.mean().item() for k, v in terms.items()}


def train_generative(cfg: GenerateConfig) -> Dict[str, Any]:
    """Train according to cfg and return the summary."""
    return GenerativeTrainer(cfg).fit()
