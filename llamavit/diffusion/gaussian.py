"""Gaussian diffusion as DiT trains and samples it (facebookresearch/DiT diffusion/, itself from
OpenAI's improved-diffusion): linear betas 1e-4 -> 0.02 over 1000 steps, noise (epsilon) prediction,
learned variance interpolated between beta_t and the clipped posterior variance (LEARNED_RANGE),
and the hybrid loss  MSE(eps) + VB  where the VB term (bits per dimension) trains only the variance
(the mean half of the output is detached in it). Samplers: ancestral DDPM and DDIM (eta 0 by default),
both on a respaced subset of the timesteps; the model always sees the ORIGINAL timestep indices.

A `model_fn(x_t, t) -> output` is what every method takes: output (B, 2C, ...) with learned sigma
(eps first, then the variance values v in [-1, 1]), else (B, C, ...) with the fixed large variance.
All schedule arithmetic is float64, cast to float32 per batch, as in the reference code.
"""
import math
from typing import Callable, Dict, Iterable, Optional, Sequence, Union

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def linear_betas(num_steps: int = 1000) -> torch.Tensor:
    """DDPM's linear schedule, scaled so that any step count spans the same range as 1000 steps."""
    scale = 1000 / num_steps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64)


def space_timesteps(num_steps: int, spacing: Union[int, str, Sequence[int]]) -> list:
    """Sorted timesteps kept from num_steps: an int / 'N' spreads N evenly (rounded, both ends kept),
    'a,b,c' spreads a, b, c over equal thirds, 'ddimN' takes the integer stride giving N steps."""
    if isinstance(spacing, str) and spacing.startswith("ddim"):
        want = int(spacing[4:])
        for stride in range(1, num_steps):
            if len(range(0, num_steps, stride)) == want:
                return list(range(0, num_steps, stride))
        raise ValueError(f"no integer stride gives exactly {want} of {num_steps} steps")
    counts = [int(c) for c in str(spacing).split(",")] if isinstance(spacing, (int, str)) else list(spacing)
    size, extra = divmod(num_steps, len(counts))
    steps, start = [], 0
    for i, count in enumerate(counts):
        section = size + (1 if i < extra else 0)
        if not 0 < count <= section:
            raise ValueError(f"cannot take {count} steps from a section of {section}")
        stride = (section - 1) / (count - 1) if count > 1 else 1
        steps += [start + round(j * stride) for j in range(count)]
        start += section
    return sorted(set(steps))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dim but the batch: (B, ...) -> (B,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log P(x) of 8-bit data in [-1, 1] (bins of width 2/255; open bins at the edges), elementwise, in nats."""
    centred, inv_std = x - means, torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centred + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centred - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class GaussianDiffusion:
    """Diffusion over `betas` (the kept steps of a longer process when `timestep_map` is given)."""

    def __init__(self, betas: torch.Tensor, learn_sigma: bool = True, timestep_map: Optional[Sequence[int]] = None):
        b = betas.to(torch.float64)
        if b.ndim != 1 or not ((b > 0) & (b <= 1)).all():
            raise ValueError("betas must be a 1-D tensor in (0, 1]")
        self.num_timesteps = len(b)
        self.learn_sigma = learn_sigma
        self.timestep_map = torch.as_tensor(timestep_map if timestep_map is not None else range(len(b)))
        a_bar = torch.cumprod(1.0 - b, 0)
        a_bar_prev = torch.cat((torch.ones(1, dtype=torch.float64), a_bar[:-1]))
        post_var = b * (1.0 - a_bar_prev) / (1.0 - a_bar)
        self.t = {
            "betas": b, "log_betas": b.log(), "alphas_cumprod": a_bar, "alphas_cumprod_prev": a_bar_prev,
            "sqrt_alphas_cumprod": a_bar.sqrt(), "sqrt_one_minus_alphas_cumprod": (1.0 - a_bar).sqrt(),
            "sqrt_recip_alphas_cumprod": (1.0 / a_bar).sqrt(), "sqrt_recipm1_alphas_cumprod": (1.0 / a_bar - 1).sqrt(),
            "posterior_variance": post_var,
            # the posterior variance is 0 at t = 0: its log takes the t = 1 value there
            "posterior_log_variance_clipped": torch.cat((post_var[1:2], post_var[1:])).log(),
            "posterior_mean_coef1": b * a_bar_prev.sqrt() / (1.0 - a_bar),
            "posterior_mean_coef2": (1.0 - a_bar_prev) * (1.0 - b).sqrt() / (1.0 - a_bar),
            # FIXED_LARGE variance (no learned sigma): beta_t, with the posterior's at t = 0
            "fixed_large_log_variance": torch.cat((post_var[1:2], b[1:])).log(),
        }

    @classmethod
    def create(cls, num_steps: int = 1000, respacing: Union[None, int, str] = None,
               learn_sigma: bool = True) -> "GaussianDiffusion":
        """The linear-schedule process of num_steps steps, or its respaced version (e.g. 250 or 'ddim50')."""
        betas = linear_betas(num_steps)
        if respacing in (None, "", num_steps, str(num_steps)):
            return cls(betas, learn_sigma)
        keep = space_timesteps(num_steps, respacing)
        a_bar = torch.cumprod(1.0 - betas, 0)
        last, new_betas = 1.0, []
        for i in keep:
            new_betas.append(1.0 - a_bar[i].item() / last)
            last = a_bar[i].item()
        return cls(torch.tensor(new_betas, dtype=torch.float64), learn_sigma, keep)

    def _at(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Table `name` at steps t (B,), shaped (B, 1, ..., 1) like x, float32."""
        return self.t[name].to(t.device)[t].float().view(-1, *([1] * (x.ndim - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Indices of this (possibly respaced) process -> the original timesteps the model was trained on."""
        return self.timestep_map.to(t.device)[t]

    # --- forward process -----------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a_bar_t) x0 + sqrt(1 - a_bar_t) noise."""
        return self._at("sqrt_alphas_cumprod", t, x0) * x0 + self._at("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor):
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._at("posterior_mean_coef1", t, xt) * x0 + self._at("posterior_mean_coef2", t, xt) * xt
        return mean, self._at("posterior_log_variance_clipped", t, xt)

    # --- reverse process -----------------------------------------------------------------------
    def p_mean_variance(self, output: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                        clip_denoised: bool = False) -> Dict[str, torch.Tensor]:
        """Model output at (x_t, t) -> mean, log_variance of p(x_{t-1} | x_t) and the predicted x_0 (eps)."""
        c = xt.shape[1]
        if self.learn_sigma:
            if output.shape[1] != 2 * c:
                raise ValueError(f"learned sigma needs {2 * c} output channels, got {output.shape[1]}")
            eps, v = output[:, :c], output[:, c:]
            frac = (v + 1) / 2
            clipped = self._at("posterior_log_variance_clipped", t, xt)
            log_var = frac * self._at("log_betas", t, xt) + (1 - frac) * clipped
        else:
            eps = output[:, :c]
            log_var = self._at("fixed_large_log_variance", t, xt).expand_as(xt)
        x0 = self._at("sqrt_recip_alphas_cumprod", t, xt) * xt - self._at("sqrt_recipm1_alphas_cumprod", t, xt) * eps
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean, _ = self.q_posterior(x0, xt, t)
        return {"mean": mean, "log_variance": log_var, "pred_xstart": x0, "eps": eps}

    def vb_terms_bpd(self, output: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(B,) variational-bound term in bits per dim: KL(q(x_{t-1}|x_t,x_0) || p) for t > 0, decoder NLL at t = 0."""
        true_mean, true_log_var = self.q_posterior(x0, xt, t)
        p = self.p_mean_variance(output, xt, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, p["mean"], 0.5 * p["log_variance"])) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model_fn: ModelFn, x0: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Per-sample losses (B,): 'mse' (eps), 'vb' (learned sigma only) and 'loss' = mse + vb."""
        xt = self.q_sample(x0, t, noise)
        output = model_fn(xt, self.model_timesteps(t))
        c = x0.shape[1]
        terms = {"mse": mean_flat((noise - output[:, :c]) ** 2)}
        if self.learn_sigma:
            # the VB term must train the variance only: the mean half enters it detached
            frozen = torch.cat((output[:, :c].detach(), output[:, c:]), dim=1)
            terms["vb"] = self.vb_terms_bpd(frozen, x0, xt, t)
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms

    # --- samplers ------------------------------------------------------------------------------
    def _steps(self, batch: int, device) -> Iterable[torch.Tensor]:
        for i in reversed(range(self.num_timesteps)):
            yield torch.full((batch,), i, device=device, dtype=torch.long)

    @torch.no_grad()
    def ddpm_sample(self, model_fn: ModelFn, noise: torch.Tensor, generator: Optional[torch.Generator] = None,
                    clip_denoised: bool = False, progress: bool = False) -> torch.Tensor:
        """Ancestral sampling from x_T = noise over every step of this process -> x_0."""
        x = noise
        for t in _progress(self._steps(len(x), x.device), self.num_timesteps, progress, "ddpm"):
            p = self.p_mean_variance(model_fn(x, self.model_timesteps(t)), x, t, clip_denoised)
            z = torch.randn(x.shape, generator=generator, device=x.device)
            nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
            x = p["mean"] + nonzero * torch.exp(0.5 * p["log_variance"]) * z
        return x

    @torch.no_grad()
    def ddim_sample(self, model_fn: ModelFn, noise: torch.Tensor, eta: float = 0.0,
                    generator: Optional[torch.Generator] = None, clip_denoised: bool = False,
                    progress: bool = False) -> torch.Tensor:
        """DDIM (eta 0: deterministic given the noise) over every step of this process -> x_0."""
        x = noise
        for t in _progress(self._steps(len(x), x.device), self.num_timesteps, progress, "ddim"):
            p = self.p_mean_variance(model_fn(x, self.model_timesteps(t)), x, t, clip_denoised)
            x0 = p["pred_xstart"]
            eps = (self._at("sqrt_recip_alphas_cumprod", t, x) * x - x0) / self._at("sqrt_recipm1_alphas_cumprod", t, x)
            a_bar, a_bar_prev = self._at("alphas_cumprod", t, x), self._at("alphas_cumprod_prev", t, x)
            sigma = eta * ((1 - a_bar_prev) / (1 - a_bar)).sqrt() * (1 - a_bar / a_bar_prev).sqrt()
            x = x0 * a_bar_prev.sqrt() + (1 - a_bar_prev - sigma ** 2).sqrt() * eps
            if eta > 0:
                nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))
                x = x + nonzero * sigma * torch.randn(x.shape, generator=generator, device=x.device)
        return x


def _progress(it, total: int, enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm import tqdm
    return tqdm(it, total=total, desc=desc, unit="step", dynamic_ncols=True)
