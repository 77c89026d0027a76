"""Classifier-free guidance: run the model on the labels and on the null label in one batch and
extrapolate  uncond + s * (cond - uncond)  on the first C (predicted noise / velocity) channels; the
learned-variance channels, if any, come from the conditional half. Scale 1 is the plain conditional
model (one forward, as DiT's samplers do when the scale is 1)."""
from typing import Callable

import torch
import torch.nn as nn


def guided_model(model: nn.Module, y: torch.Tensor, cfg_scale: float = 1.0) -> Callable:
    """model(x, t, y) -> a function (x, t) -> guided output (B, out_chans, H, W) for labels y (B,)."""
    if cfg_scale == 1.0:
        return lambda x, t: model(x, t, y)
    null = getattr(model, "null_class", None)
    if null is None:
        raise ValueError("classifier-free guidance needs a model trained with label dropout "
                         "(class_dropout_prob > 0), which has a null class")

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = model(torch.cat((x, x)), torch.cat((t, t)), torch.cat((y, torch.full_like(y, null))))
        cond, uncond = out.chunk(2)
        c = x.shape[1]
        eps = uncond[:, :c] + cfg_scale * (cond[:, :c] - uncond[:, :c])
        return torch.cat((eps, cond[:, c:]), dim=1)

    return fn
