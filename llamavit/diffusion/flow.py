"""The SiT objective: a linear interpolant between noise and data, trained by velocity regression,
sampled with a fixed-step ODE solver (willisma/SiT transport/, path 'Linear', prediction 'velocity').

    x_t = t * x_1 + (1 - t) * x_0,   x_0 ~ N(0, I) noise, x_1 data, t ~ U[0, 1]
    target velocity u = x_1 - x_0;   loss = mean over pixels of (v_theta(x_t, t) - u)^2

The model sees t in [0, 1] directly (the sinusoidal timestep embedding takes fractional values).
Sampling integrates dx/dt = v from t = 0 (noise) to t = 1 (data). SiT's default sampler is the
adaptive dopri5 of torchdiffeq; here Euler and Heun (2nd order) with a fixed number of steps. Only the
first C output channels are used, as SiT-LLaMA does with its learned-sigma output.
"""
from typing import Callable, Dict

import torch

from .gaussian import mean_flat

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ODE_METHODS = ("euler", "heun")


class LinearFlow:
    """Linear-path flow matching with velocity prediction."""

    @staticmethod
    def interpolate(x1: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
        """(x_t, u_t) for data x1, noise x0 and times t (B,)."""
        tt = t.view(-1, *([1] * (x1.ndim - 1)))
        return tt * x1 + (1 - tt) * noise, x1 - noise

    def training_losses(self, model_fn: ModelFn, x1: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Per-sample velocity MSE (B,) under 'loss' (and 'mse')."""
        xt, ut = self.interpolate(x1, noise, t)
        v = model_fn(xt, t)[:, :x1.shape[1]]
        mse = mean_flat((v - ut) ** 2)
        return {"loss": mse, "mse": mse}

    @torch.no_grad()
    def sample(self, model_fn: ModelFn, noise: torch.Tensor, num_steps: int = 50, method: str = "heun",
               progress: bool = False) -> torch.Tensor:
        """Integrate from noise at t = 0 to data at t = 1 in num_steps equal steps -> x_1."""
        if method not in ODE_METHODS:
            raise ValueError(f"ODE method must be one of {ODE_METHODS}, got {method!r}")
        c = noise.shape[1]
        x, times = noise, torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64).tolist()
        steps = range(num_steps)
        if progress:
            from tqdm import tqdm
            steps = tqdm(steps, desc=method, unit="step", dynamic_ncols=True)

        def velocity(x_: torch.Tensor, t_: float) -> torch.Tensor:
            return model_fn(x_, torch.full((len(x_),), t_, device=x_.device))[:, :c]

        for i in steps:
            t0, t1 = times[i], times[i + 1]
            v0 = velocity(x, t0)
            x_euler = x + (t1 - t0) * v0
            x = x_euler if method == "euler" else x + (t1 - t0) * 0.5 * (v0 + velocity(x_euler, t1))
        return x
