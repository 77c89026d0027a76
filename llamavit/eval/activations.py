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

The quantitative part (the paper's §4 measures it with segmentation masks): when the images' foreground is
known (a boolean pixel mask, e.g. a Fashion-MNIST item's own pixels, `foreground_from_images`), every map is
scored as a detector of the foreground patches (a patch is foreground when at least half its pixels are):
- `foreground_ap`: the average precision (scikit-learn's) of the map's values ranking foreground patches above
  background ones, per image, then averaged (a constant or random map scores the share of foreground patches);
- `foreground_ratio`: the mean value on foreground patches over the mean on background patches.
A block that "filters information" towards the object raises both from its input to its output.
"""
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.metrics import average_precision_score


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


def foreground_from_images(images: torch.Tensor, mean, std, threshold: float = 0.1) -> torch.Tensor:
    """Normalised images (B, C, H, W) -> (B, H, W) bool: pixels brighter than `threshold` (in [0, 1] units, any
    channel) once the normalisation is undone: the object of a dark-background image (Fashion-MNIST)."""
    channels = images.shape[1]   # a 1-channel model's statistics are the first of three
    mean = torch.as_tensor(mean, dtype=images.dtype)[:channels].view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype)[:channels].view(1, -1, 1, 1)
    return ((images * std + mean) > threshold).any(dim=1)


def patch_foreground(foreground: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """(B, H, W) bool pixels -> (B, gh, gw) bool patches: at least half of the patch's pixels are foreground."""
    return F.adaptive_avg_pool2d(foreground[:, None].float(), grid)[:, 0] >= 0.5


def foreground_scores(value_map: torch.Tensor, foreground: torch.Tensor) -> Dict[str, float]:
    """A map (B, gh, gw) against foreground patches (B, gh, gw) bool -> {'foreground_ap', 'foreground_ratio'}
    (each the mean over the images that have both foreground and background patches)."""
    aps, ratios = [], []
    for values, fg in zip(value_map.float(), foreground):
        if fg.all() or not fg.any():
            continue
        aps.append(average_precision_score(fg.flatten().numpy(), values.flatten().numpy()))
        ratios.append((values[fg].mean() / values[~fg].mean().clamp_min(1e-12)).item())
    nan = float("nan")
    return {"foreground_ap": sum(aps) / len(aps) if aps else nan,
            "foreground_ratio": sum(ratios) / len(ratios) if ratios else nan,
            "foreground_share": foreground.float().mean().item(), "images_scored": len(aps)}


def analyze_activations(model: nn.Module, x: torch.Tensor, cfg: Optional[ActivationConfig] = None,
                        foreground: Optional[torch.Tensor] = None) -> dict:
    """Magnitude and frequency maps of every block for images x (B, C, H, W); with `foreground` (B, H, W) bool,
    each map's foreground scores too.

    Returns {'blocks': [name...], 'maps': {name: {'magnitude': (B, gh, gw), 'frequency': (B, gh, gw),
    'high_freq_energy': (B,)}}, and with a foreground 'foreground': {name: {'magnitude': scores,
    'frequency': scores}} (see foreground_scores)}."""
    cfg = cfg or ActivationConfig()
    model.eval()
    outputs = collect_block_outputs(model, x)
    maps = {}
    for name, tokens in outputs.items():
        grid = patch_grid(model, x, tokens)
        freq, share = frequency_map(grid, cfg.high_pass)
        maps[name] = {"magnitude": magnitude_map(grid), "frequency": freq, "high_freq_energy": share}
    result = {"blocks": list(outputs), "maps": maps}
    if foreground is not None:
        some = next(iter(maps.values()))["magnitude"]
        fg = patch_foreground(foreground, tuple(some.shape[1:]))
        result["foreground"] = {name: {kind: foreground_scores(m[kind], fg) for kind in ("magnitude", "frequency")}
                                for name, m in maps.items()}
    return result


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
    if "foreground" in result:
        summary["definitions"]["foreground"] = ("a patch is foreground when >= half its pixels are; foreground_ap: "
                                                "average precision of the map ranking those patches first; "
                                                "foreground_ratio: mean on foreground / mean on background")
        summary["foreground"] = result["foreground"]
    json_path = os.path.join(out_dir, "activations.json")
    with open(json_path, "w") as f:
        json.dump(summary, f)
    return paths + [json_path]


def format_foreground_table(result: dict) -> str:
    """Per block: the magnitude and frequency maps' foreground AP and ratio (needs result['foreground'])."""
    rows = [f"{'block':12s} {'magnitude AP':>12s} {'ratio':>6s} {'frequency AP':>12s} {'ratio':>6s}"]
    for name in result["blocks"]:
        mag, freq = result["foreground"][name]["magnitude"], result["foreground"][name]["frequency"]
        rows.append(f"{name:12s} {mag['foreground_ap']:12.3f} {mag['foreground_ratio']:6.2f} "
                    f"{freq['foreground_ap']:12.3f} {freq['foreground_ratio']:6.2f}")
    share = next(iter(result["foreground"].values()))["magnitude"]["foreground_share"]
    return "\n".join(rows + [f"(foreground patches: {100 * share:.1f} %, the AP of a random map)"])
