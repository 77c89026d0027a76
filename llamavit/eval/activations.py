"""Information filtering (Pang et al., section 4): where do the features respond, after each block?

For every block (ViT blocks, and for ViT + frozen LLM models each LLM layer and the LLM path's
output) and every patch token:
- magnitude: ||f_t - mean_t' f_t'||_2, the L2 norm of the token's feature after subtracting the
  image's mean token feature ("centred features");
- frequency: the same norm of the high-frequency part of the centred feature map. The map
  (gh, gw, D) is Fourier transformed over the two spatial axes per channel, frequencies with
  radius sqrt(fy^2 + fx^2) <= `high_pass` (cycles per token; 0.5 is Nyquist) are removed, the
  rest is transformed back. A token scores high where the features change sharply around it.
Per block the JSON also gives `high_freq_energy`, the share of the centred map's spectral energy
above the cut-off. The official repository has no code for this analysis; these are our definitions.
Heat maps (PNG, one per image) show both maps for every block over the input image.
"""
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn


@dataclass
class ActivationConfig:
    """Options of the activation maps: the high-pass cut-off in cycles per token."""
    high_pass: float = 0.25     # cut-off radius in cycles per token (0.5 = Nyquist)
    alpha: float = 0.6          # heat-map opacity over the image


def _named_blocks(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The modules whose outputs are analysed, in forward order."""
    out = [(f"block{i}", blk) for i, blk in enumerate(getattr(model, "blocks", []))]
    llama = getattr(model, "llama", None)
    if llama is not None:
        out += [(f"llm_layer{i}", layer) for i, layer in enumerate(llama.layers)]
        out.append(("llm_out", model.llama_dim_mapper2))   # the LLM path mapped back to the ViT width
    if not out:
        raise ValueError(f"{type(model).__name__} has no `blocks` to analyse")
    return out


def collect_block_outputs(model: nn.Module, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Run the model once; {block name: its output tokens (B, N, D_block)} in forward order."""
    outputs: Dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: outputs.__setitem__(name, out.detach()))
             for name, m in _named_blocks(model)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return outputs


def patch_grid(model: nn.Module, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Patch tokens of (B, N, D) as a (B, gh, gw, D) map, whatever the class-token position."""
    ph, pw = model.patch_embed.patch_size
    gh, gw = x.shape[-2] // ph, x.shape[-1] // pw
    start = getattr(model, "num_prefix_tokens", 0)   # ViT: class token first; iLLaMA: last (prefix 0)
    return tokens[:, start:start + gh * gw].reshape(tokens.shape[0], gh, gw, -1).float()


def magnitude_map(grid: torch.Tensor) -> torch.Tensor:
    """(B, gh, gw, D) -> (B, gh, gw): L2 norm of each token's feature minus the image's mean feature."""
    return (grid - grid.mean(dim=(1, 2), keepdim=True)).norm(dim=-1)


def frequency_map(grid: torch.Tensor, high_pass: float = 0.25) -> Tuple[torch.Tensor, torch.Tensor]:
    """(B, gh, gw, D) -> ((B, gh, gw) norm of the high-pass-filtered centred features,
    (B,) share of spectral energy above the cut-off)."""
    centred = grid - grid.mean(dim=(1, 2), keepdim=True)
    spec = torch.fft.fft2(centred, dim=(1, 2))
    fy = torch.fft.fftfreq(grid.shape[1]).view(-1, 1)
    fx = torch.fft.fftfreq(grid.shape[2]).view(1, -1)
    keep = ((fy ** 2 + fx ** 2).sqrt() > high_pass).to(spec.real.dtype)[None, :, :, None]
    high = torch.fft.ifft2(spec * keep, dim=(1, 2)).real
    energy = spec.abs().square()
    share = (energy * keep).sum(dim=(1, 2, 3)) / energy.sum(dim=(1, 2, 3)).clamp_min(1e-30)
    return high.norm(dim=-1), share


def analyze_activations(model: nn.Module, x: torch.Tensor, cfg: Optional[ActivationConfig] = None) -> dict:
    """Magnitude and frequency maps of every block for images x (B, C, H, W).

    Returns {'blocks': [name...], 'maps': {name: {'magnitude': (B, gh, gw), 'frequency': (B, gh, gw),
    'high_freq_energy': (B,)}}}."""
    cfg = cfg or ActivationConfig()
    model.eval()
    outputs = collect_block_outputs(model, x)
    maps = {}
    for name, tokens in outputs.items():
        grid = patch_grid(model, x, tokens)
        freq, share = frequency_map(grid, cfg.high_pass)
        maps[name] = {"magnitude": magnitude_map(grid), "frequency": freq, "high_freq_energy": share}
    return {"blocks": list(outputs), "maps": maps}


def _display(img: torch.Tensor):
    """(C, H, W) normalised image -> (H, W) or (H, W, 3) in [0, 1] for imshow."""
    img = img.float()
    img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-12)
    return img[0].numpy() if img.shape[0] == 1 else img[:3].permute(1, 2, 0).numpy()


def save_activation_report(result: dict, images: torch.Tensor, out_dir: str, labels=None,
                           cfg: Optional[ActivationConfig] = None) -> List[str]:
    """One PNG per image (rows: magnitude, frequency; columns: image, then every block) and
    activations.json (per-block means, high-frequency energy, and the per-token maps). Returns paths."""
    cfg = cfg or ActivationConfig()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    names, maps = result["blocks"], result["maps"]
    h, w = images.shape[-2:]
    paths = []
    for b in range(images.shape[0]):
        fig, axes = plt.subplots(2, len(names) + 1, figsize=(1.6 * (len(names) + 1), 3.4), squeeze=False)
        bg = _display(images[b])
        for row, kind in enumerate(("magnitude", "frequency")):
            axes[row, 0].imshow(bg, cmap="gray")
            axes[row, 0].set_title(kind if labels is None else f"{labels[b]}\n{kind}", fontsize=7)
            for col, name in enumerate(names, start=1):
                m = maps[name][kind][b]
                ax = axes[row, col]
                ax.imshow(bg, cmap="gray")
                ax.imshow((m / m.max().clamp_min(1e-12)).numpy(), cmap="jet", alpha=cfg.alpha,
                          extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="nearest")
                if row == 0:
                    ax.set_title(name, fontsize=7)
        for ax in axes.flat:
            ax.axis("off")
        fig.tight_layout()
        path = os.path.join(out_dir, f"image{b:03d}_activations.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    summary = {
        "definitions": {"magnitude": "L2 norm of the token feature minus the image's mean token feature",
                        "frequency": f"L2 norm of the centred feature map after removing spatial frequencies "
                                     f"with radius <= {cfg.high_pass} cycles/token (2D FFT over the patch grid)",
                        "high_freq_energy": "share of the centred map's spectral energy above that radius"},
        "blocks": names,
        "per_block": {n: {"mean_magnitude": maps[n]["magnitude"].mean().item(),
                          "mean_frequency": maps[n]["frequency"].mean().item(),
                          "high_freq_energy": maps[n]["high_freq_energy"].mean().item()} for n in names},
        "maps": {n: {k: [[[round(v, 5) for v in row] for row in img] for img in maps[n][k].tolist()]
                     for k in ("magnitude", "frequency")} for n in names},
        "labels": labels,
    }
    json_path = os.path.join(out_dir, "activations.json")
    with open(json_path, "w") as f:
        json.dump(summary, f)
    return paths + [json_path]
