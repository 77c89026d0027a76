"""Attention maps and their rank (iLLaMA's "causal attention raises attention-map rank").

Our Attention layer runs on fused SDPA, which never forms the probability matrix, so a forward hook
on every attention module takes its inputs and asks the layer for the matrix it applies to the values
(`Attention.probabilities`, the same q/k/RoPE/mask code as its forward):
    A = softmax(q k^T * scale + mask bias)       bidirectional / causal / explicit masks
    A = softmax(q k^T * scale) * M(r)            iLLaMA's soft mask (rows need not sum to one)
Supported modules: llamavit.layers.Attention (every mask mode, RoPE, grouped heads) and timm's ViT
Attention (timm: baselines).

Rank of an (N, N) map: the number of singular values above rtol * the largest (rtol None = torch's
default, N * float32 eps: the numerical rank). Effective rank: exp of the entropy of the singular
values normalised to sum to one (Roy & Vetterli 2007) — threshold-free, between 1 and N.
"""
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..layers import Attention, attention_weights

try:
    from timm.models.vision_transformer import Attention as TimmAttention
except ImportError:  # pragma: no cover
    TimmAttention = ()


# --- ranks ---------------------------------------------------------------------------------------
def singular_values(maps: torch.Tensor) -> torch.Tensor:
    """(..., N, N) -> (..., N) singular values, descending, float32."""
    return torch.linalg.svdvals(maps.float())


def matrix_ranks(maps: torch.Tensor, rtol: Optional[float] = None) -> torch.Tensor:
    """(..., N, N) -> (...,) numerical rank: singular values > rtol * largest (None: N * float32 eps)."""
    sv = singular_values(maps)
    tol = (rtol if rtol is not None else maps.shape[-1] * torch.finfo(torch.float32).eps) * sv[..., :1]
    return (sv > tol).sum(dim=-1)


def effective_ranks(maps: torch.Tensor) -> torch.Tensor:
    """(..., N, N) -> (...,) float exp(entropy of singular values / their sum): N for an orthogonal
    matrix, 1 for a rank-one matrix."""
    sv = singular_values(maps)
    p = sv / sv.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    entropy = -(p * p.clamp_min(1e-30).log()).sum(dim=-1)
    return entropy.exp()


# --- probabilities from q and k ------------------------------------------------------------------
def attention_probabilities(module: nn.Module, x: torch.Tensor,
                            rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                            attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False) -> torch.Tensor:
    """The (B, heads, N, N) matrix `module` applies to its values for input x (B, N, D)."""
    if isinstance(module, Attention):
        return module.probabilities(x, rope, attn_mask)
    if TimmAttention and isinstance(module, TimmAttention):
        b, n, _ = x.shape
        q, k, _ = module.qkv(x).reshape(b, n, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = module.q_norm(q), module.k_norm(k)   # timm scales by head_dim ** -0.5, as attention_weights does
        return attention_weights(q, k, "causal" if is_causal else "bidirectional", attn_mask=attn_mask)
    raise TypeError(f"cannot compute attention probabilities of {type(module).__name__}")


def attention_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The supported attention modules of `model`, in forward (registration) order."""
    found = [(name, m) for name, m in model.named_modules()
             if type(m) is Attention or (TimmAttention and isinstance(m, TimmAttention))]   # not per-window maps
    if not found:
        raise ValueError(f"{type(model).__name__} has no attention module this analysis supports "
                         f"(llamavit.layers.Attention or timm's ViT Attention)")
    return found


@torch.no_grad()
def collect_attention(model: nn.Module, x: torch.Tensor,
                      layers: Optional[Sequence[int]] = None) -> Dict[int, torch.Tensor]:
    """Run the model once on x (B, C, H, W); {layer index: probabilities (B, heads, N, N)} for the chosen
    attention layers (indices into attention_modules(model), negative allowed; None = all)."""
    modules = attention_modules(model)
    chosen = range(len(modules)) if layers is None else [i % len(modules) for i in layers]
    bad = [i for i in (layers or []) if not -len(modules) <= i < len(modules)]
    if bad:
        raise ValueError(f"layer(s) {bad} out of range: the model has {len(modules)} attention layers")
    maps: Dict[int, torch.Tensor] = {}

    def hook(index):
        def fn(module, args, kwargs, output):
            x_in = args[0] if args else kwargs["x"]
            if isinstance(module, Attention):
                rope = args[1] if len(args) > 1 else kwargs.get("rope")
                mask = args[2] if len(args) > 2 else kwargs.get("attn_mask")
                maps[index] = attention_probabilities(module, x_in, rope, mask)
            else:
                mask = args[1] if len(args) > 1 else kwargs.get("attn_mask")
                maps[index] = attention_probabilities(module, x_in, attn_mask=mask,
                                                      is_causal=bool(kwargs.get("is_causal", False)))
        return fn

    handles = [modules[i][1].register_forward_hook(hook(i), with_kwargs=True) for i in chosen]
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return maps


def rank_summary(maps: Dict[int, torch.Tensor], rtol: Optional[float] = None) -> dict:
    """Ranks of every (image, head) map per layer and over all layers.

    Returns {'num_tokens', 'mean_rank', 'mean_effective_rank', 'spectrum' (mean over layers, heads and
    images of sigma_i / sigma_1), 'layers': {index: {'mean_rank', 'mean_effective_rank', 'head_ranks'
    (per head, mean over images), 'head_effective_ranks', 'spectrum'}}}."""
    layers, all_ranks, all_eff, spectra = {}, [], [], []
    for index, probs in sorted(maps.items()):
        ranks = matrix_ranks(probs, rtol).float()          # (B, H)
        eff = effective_ranks(probs)                       # (B, H)
        sv = singular_values(probs)
        spectrum = (sv / sv[..., :1].clamp_min(1e-30)).mean(dim=(0, 1))
        layers[index] = {"mean_rank": ranks.mean().item(), "mean_effective_rank": eff.mean().item(),
                         "head_ranks": ranks.mean(0).tolist(), "head_effective_ranks": eff.mean(0).tolist(),
                         "spectrum": spectrum.tolist()}
        all_ranks.append(ranks.mean())
        all_eff.append(eff.mean())
        spectra.append(spectrum)
    return {"num_tokens": next(iter(maps.values())).shape[-1], "rtol": rtol,
            "mean_rank": torch.stack(all_ranks).mean().item(),
            "mean_effective_rank": torch.stack(all_eff).mean().item(),
            "spectrum": torch.stack(spectra).mean(0).tolist(), "layers": layers}


def attention_rank(model: nn.Module, images: torch.Tensor, rtol: Optional[float] = None) -> dict:
    """rank_summary of every attention layer of `model` on images (B, C, H, W)."""
    return rank_summary(collect_attention(model, images), rtol)


# --- maps over the image -------------------------------------------------------------------------
def class_token_index(model: nn.Module) -> Optional[int]:
    """Token index of the class token (0 first, -1 last), None when the model has none."""
    if getattr(model, "cls_token", None) is None:
        return None
    return 0 if getattr(model, "num_prefix_tokens", 0) >= 1 else -1


def patch_attention_maps(model: nn.Module, probs: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """(B, H, N, N) -> (B, H, gh, gw): the class token's attention over the patch tokens, or (no class
    token) the attention each patch receives, averaged over queries."""
    start = getattr(model, "num_prefix_tokens", 0)
    patches = slice(start, start + grid[0] * grid[1])
    cls = class_token_index(model)
    rows = probs[:, :, cls] if cls is not None else probs.mean(dim=2)
    return rows[..., patches].reshape(*probs.shape[:2], *grid)


def analyze_attention(model: nn.Module, images: torch.Tensor, layers: Optional[Sequence[int]] = None,
                      heads: Optional[Sequence[int]] = None, rtol: Optional[float] = None) -> dict:
    """Attention of the chosen layers (default: all) and heads (default: all) on images (B, C, H, W).

    Returns {'layers', 'heads', 'names', 'query', 'maps': {layer: (B, len(heads), gh, gw)}, 'ranks':
    rank_summary over the chosen layers and ALL heads}."""
    probs = collect_attention(model, images, layers)
    names = [n for n, _ in attention_modules(model)]
    num_heads = next(iter(probs.values())).shape[1]
    heads = list(range(num_heads)) if heads is None else list(heads)
    if any(not 0 <= h < num_heads for h in heads):
        raise ValueError(f"head(s) {heads} out of range: the layers have {num_heads} heads")
    ph, pw = model.patch_embed.patch_size
    grid = (images.shape[-2] // ph, images.shape[-1] // pw)
    maps = {i: patch_attention_maps(model, p, grid)[:, heads] for i, p in sorted(probs.items())}
    cls = class_token_index(model)
    query = "mean over queries" if cls is None else f"class token ({'first' if cls == 0 else 'last'})"
    return {"layers": sorted(probs), "heads": heads, "names": {i: names[i] for i in probs}, "query": query,
            "maps": maps, "ranks": rank_summary(probs, rtol)}


def _display(img: torch.Tensor):
    img = img.float()
    img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-12)
    return img[0].numpy() if img.shape[0] == 1 else img[:3].permute(1, 2, 0).numpy()


def save_attention_report(result: dict, images: torch.Tensor, out_dir: str, labels=None) -> List[str]:
    """One PNG per image (rows: layers; columns: the image, then each head's map with its rank), a
    spectrum PNG (mean sigma_i / sigma_1 per layer) and attention.json. Returns the paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    layers, heads, ranks = result["layers"], result["heads"], result["ranks"]["layers"]
    h, w = images.shape[-2:]
    paths = []
    for b in range(images.shape[0]):
        fig, axes = plt.subplots(len(layers), len(heads) + 1, figsize=(1.7 * (len(heads) + 1), 1.8 * len(layers)),
                                 squeeze=False)
        bg = _display(images[b])
        for row, layer in enumerate(layers):
            axes[row, 0].imshow(bg, cmap="gray")
            axes[row, 0].set_title(f"layer {layer}" + (f"\n{labels[b]}" if labels and row == 0 else ""), fontsize=7)
            for col, head in enumerate(heads, start=1):
                m = result["maps"][layer][b, col - 1]
                ax = axes[row, col]
                ax.imshow(bg, cmap="gray")
                ax.imshow((m / m.max().clamp_min(1e-12)).numpy(), cmap="jet", alpha=0.6,
                          extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="nearest")
                ax.set_title(f"L{layer} h{head} rank {ranks[layer]['head_ranks'][head]:.0f}", fontsize=7)
        for ax in axes.flat:
            ax.axis("off")
        fig.suptitle(f"attention of the {result['query']} over the patches", fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"image{b:03d}_attention.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    spectrum_png = os.path.join(out_dir, "attention_spectrum.png")
    plot_spectra({f"layer {i}": ranks[i]["spectrum"] for i in layers}, spectrum_png,
                 title=f"mean normalised singular values ({result['ranks']['num_tokens']} tokens)")
    summary = {"layers": layers, "heads": heads, "names": result["names"], "query": result["query"],
               "ranks": result["ranks"],
               "maps": {i: [[[[round(v, 5) for v in row] for row in hm] for hm in img] for img in
                            result["maps"][i].tolist()] for i in layers}, "labels": labels}
    json_path = os.path.join(out_dir, "attention.json")
    with open(json_path, "w") as f:
        json.dump(summary, f)
    return paths + [spectrum_png, json_path]


def plot_spectra(spectra: Dict[str, Sequence[float]], path: str, title: str = "") -> None:
    """Singular-value spectra (sigma_i / sigma_1 against i, log scale), one curve per entry."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, (label, values) in enumerate(spectra.items()):
        ax.plot(range(1, len(values) + 1), values, label=label, color=plt.cm.viridis(i / max(len(spectra) - 1, 1))
                if len(spectra) > 10 else None)
    ax.set_yscale("log")
    ax.set_xlabel("singular value index i")
    ax.set_ylabel("sigma_i / sigma_1")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=1 + len(spectra) // 8)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_rank_table(result: dict) -> str:
    """Attention ranks per layer as a plain-text table."""
    ranks = result["ranks"]
    lines = [f"{'layer':<28} {'mean rank':>9} {'eff. rank':>9}   (of {ranks['num_tokens']} tokens)"]
    for i in result["layers"]:
        lines.append(f"{i:>3} {result['names'][i]:<24} {ranks['layers'][i]['mean_rank']:9.2f} "
                     f"{ranks['layers'][i]['mean_effective_rank']:9.2f}")
    lines.append(f"{'all chosen layers':<28} {ranks['mean_rank']:9.2f} {ranks['mean_effective_rank']:9.2f}")
    return "\n".join(lines)


__all__ = ["singular_values", "matrix_ranks", "effective_ranks", "attention_probabilities", "attention_modules",
           "collect_attention", "rank_summary", "attention_rank", "analyze_attention", "save_attention_report",
           "plot_spectra", "format_rank_table"]
