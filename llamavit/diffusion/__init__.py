"""Generative objectives for the DiT / DiT-LLaMA models: DDPM with DiT's learned-sigma hybrid loss
(gaussian.py), SiT's linear-interpolant flow matching (flow.py), classifier-free guidance (guidance.py).
No model or training code here: every method takes a `model_fn(x_t, t) -> output`."""
from .flow import ODE_METHODS, LinearFlow
from .gaussian import GaussianDiffusion, linear_betas, mean_flat, space_timesteps
from .guidance import guided_model

__all__ = ["GaussianDiffusion", "LinearFlow", "ODE_METHODS", "guided_model", "linear_betas", "mean_flat",
           "space_timesteps"]
