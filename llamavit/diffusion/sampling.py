"""Class-conditional sampling from a trained DiT / DiT-LLaMA with any of the samplers, and image grids."""
from typing import Optional

import torch
import torch.nn as nn
from torchvision.utils import save_image

from .flow import ODE_METHODS, LinearFlow
from .gaussian import GaussianDiffusion
from .guidance import guided_model

DIFFUSION_SAMPLERS = ("ddpm", "ddim")
SAMPLERS = DIFFUSION_SAMPLERS + ODE_METHODS


def default_sampler(objective: str) -> str:
    """The sampler an objective uses by default: 'ddpm' for DDPM, 'heun' for flow."""
    return "ddpm" if objective == "ddpm" else "heun"


@torch.no_grad()
def generate_samples(model: nn.Module, labels: torch.Tensor, objective: str = "ddpm", sampler: Optional[str] = None,
                     steps: int = 250, cfg_scale: float = 1.0, seed: int = 0, batch_size: int = 256,
                     diffusion_steps: int = 1000, eta: float = 0.0, img_size: Optional[int] = None,
                     clip_denoised: bool = False, progress: bool = False) -> torch.Tensor:
    """Samples (N, C, H, W) for labels (N,), deterministic for a seed and batch size.

    objective 'ddpm' takes sampler 'ddpm' or 'ddim' over `steps` respaced timesteps; objective 'flow'
    takes the ODE sampler 'euler' or 'heun' with `steps` steps. Noise for every batch comes from one
    torch.Generator seeded with `seed`, so the output does not depend on the global RNG.
    clip_denoised clamps each predicted x_0 to [-1, 1] (pixel data; DiT on latents does not).
    """
    sampler = sampler or default_sampler(objective)
    valid = DIFFUSION_SAMPLERS if objective == "ddpm" else ODE_METHODS
    if sampler not in valid:
        raise ValueError(f"objective {objective!r} samples with one of {valid}, got {sampler!r}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    size = img_size or model.x_embedder.img_size[0]
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for start in range(0, len(labels), batch_size):
        y = labels[start:start + batch_size].to(device)
        noise = torch.randn((len(y), model.in_chans, size, size), generator=g, device=device)
        fn = guided_model(model, y, cfg_scale)
        if objective == "ddpm":
            diffusion = GaussianDiffusion.create(diffusion_steps, respacing=steps, learn_sigma=model.cfg.learn_sigma)
            if sampler == "ddpm":
                x = diffusion.ddpm_sample(fn, noise, generator=g, clip_denoised=clip_denoised, progress=progress)
            else:
                x = diffusion.ddim_sample(fn, noise, eta=eta, generator=g, clip_denoised=clip_denoised,
                                            progress=progress)
        else:
            x = LinearFlow().sample(fn, noise, num_steps=steps, method=sampler, progress=progress)
        out.append(x.cpu())
    model.train(was_training)
    return torch.cat(out)


def class_grid_labels(num_classes: int, per_class: int) -> torch.Tensor:
    """Labels 0,0,..,1,1,.. (per_class of each): one grid row per class."""
    return torch.arange(num_classes).repeat_interleave(per_class)


def save_grid(samples: torch.Tensor, path: str, nrow: int, pixels: bool = True) -> str:
    """PNG grid. Pixel samples are in [-1, 1]; latents are shown channel 0, min-max scaled per image."""
    if pixels:
        images = ((samples.float() + 1) / 2).clamp(0, 1)
    else:
        images = samples[:, :1].float()
        lo, hi = images.amin(dim=(1, 2, 3), keepdim=True), images.amax(dim=(1, 2, 3), keepdim=True)
        images = (images - lo) / (hi - lo + 1e-6)
    save_image(images, path, nrow=nrow, padding=1, pad_value=1.0)
    return path
