"""Shape-texture bias (Geirhos et al., ICLR 2019) on grayscale item images such as Fashion-MNIST's.

A cue-conflict image keeps the *shape* of one item (class A) and the *texture* of another (class B != A):

1. the silhouette of A: its pixels brighter than `threshold` (the item on its dark background);
2. the texture of B: the `patch` x `patch` window of B with the most foreground pixels (ties: the first in
   row-major order), min-max scaled to [TEXTURE_FLOOR, 1] so the silhouette stays visible wherever B is dark,
   and tiled over the image with every other tile mirrored (seamless edges);
3. the image is the tiled texture inside A's silhouette and 0 outside.

Pairs are drawn once from a seeded generator (item i of the set gives the shape; its texture partner is a
uniformly drawn item of another class), so a set is a pure function of (images, labels, count, seed, threshold,
patch). A model's shape bias is shape decisions / (shape + texture decisions), over the images it classifies as
either A or B; the rest (neither class) are reported as their own fraction.
"""
import json
import os
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F

TEXTURE_FLOOR = 0.25


def silhouette(image: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """(H, W) image in [0, 1] -> (H, W) bool: the item's pixels."""
    return image > threshold


def texture_patch(image: torch.Tensor, patch: int = 8, threshold: float = 0.1) -> torch.Tensor:
    """(H, W) image in [0, 1] -> (patch, patch): its window with the most foreground, scaled to [TEXTURE_FLOOR, 1]."""
    h, w = image.shape
    if not 0 < patch <= min(h, w):
        raise ValueError(f"texture patch {patch} must be in 1..{min(h, w)} for {h}x{w} images")
    cover = F.avg_pool2d(silhouette(image, threshold)[None, None].float(), patch, stride=1)[0, 0]
    top, left = divmod(int(cover.flatten().argmax()), cover.shape[1])
    window = image[top:top + patch, left:left + patch].float()
    low, high = window.min(), window.max()
    scaled = (window - low) / (high - low) if high > low else torch.ones_like(window)
    return TEXTURE_FLOOR + (1 - TEXTURE_FLOOR) * scaled


def tile(patch: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(p, p) -> (height, width): the patch repeated, every other column / row of tiles mirrored."""
    pair = torch.cat((patch, patch.flip(1)), dim=1)
    block = torch.cat((pair, pair.flip(0)), dim=0)
    reps = (-(-height // block.shape[0]), -(-width // block.shape[1]))
    return block.repeat(*reps)[:height, :width]


def cue_conflict(shape_image: torch.Tensor, texture_image: torch.Tensor, threshold: float = 0.1,
                 patch: int = 8) -> torch.Tensor:
    """(H, W) images in [0, 1] -> (H, W): texture_image's texture inside shape_image's silhouette."""
    texture = tile(texture_patch(texture_image, patch, threshold), *shape_image.shape)
    return torch.where(silhouette(shape_image, threshold), texture, torch.zeros_like(texture))


def build_cue_conflict_set(images: torch.Tensor, labels: torch.Tensor, count: int, seed: int = 0,
                           threshold: float = 0.1, patch: int = 8) -> Dict[str, torch.Tensor]:
    """Cue-conflict images from items (N, H, W) in [0, 1] with labels (N,): the first `count` items give the
    shapes, each paired with a seeded draw of an item of another class. -> {'images' (count, 1, H, W),
    'shape_labels', 'texture_labels', 'shape_index', 'texture_index' (count,)}."""
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"expected images (N, H, W) and labels (N,), got {tuple(images.shape)} and "
                         f"{tuple(labels.shape)}")
    if not 0 < count <= len(images):
        raise ValueError(f"count must be in 1..{len(images)}, got {count}")
    if len(labels.unique()) < 2:
        raise ValueError("a cue-conflict set needs items of at least two classes")
    generator = torch.Generator().manual_seed(seed)
    partners = []
    for i in range(count):
        others = (labels != labels[i]).nonzero().flatten()
        partners.append(int(others[torch.randint(len(others), (1,), generator=generator)]))
    partner = torch.tensor(partners)
    out = torch.stack([cue_conflict(images[i], images[j], threshold, patch) for i, j in zip(range(count), partners)])
    return {"images": out[:, None], "shape_labels": labels[:count].clone(), "texture_labels": labels[partner],
            "shape_index": torch.arange(count), "texture_index": partner}


def shape_bias_score(predictions: torch.Tensor, shape_labels: torch.Tensor, texture_labels: torch.Tensor,
                     classes: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Geirhos et al.'s score from predicted classes (N,): shape / (shape + texture) decisions (None when the model
    took neither cue anywhere), the fractions of each decision, and the shape bias per shape class."""
    if not predictions.shape == shape_labels.shape == texture_labels.shape:
        raise ValueError(f"predictions, shape and texture labels differ in shape: {tuple(predictions.shape)}, "
                         f"{tuple(shape_labels.shape)}, {tuple(texture_labels.shape)}")
    if (shape_labels == texture_labels).any():
        raise ValueError("a cue-conflict image needs a shape class other than its texture class")
    shape, texture = predictions == shape_labels, predictions == texture_labels
    n = len(predictions)

    def bias(mask: torch.Tensor) -> Optional[float]:
        s, t = int((shape & mask).sum()), int((texture & mask).sum())
        return s / (s + t) if s + t else None
    per_class = {}
    for c in shape_labels.unique().tolist():
        name = classes[c] if classes else str(c)
        per_class[name] = bias(shape_labels == c)
    return {"images": n, "shape_decisions": int(shape.sum()), "texture_decisions": int(texture.sum()),
            "other_decisions": int(n - shape.sum() - texture.sum()), "shape_bias": bias(torch.ones_like(shape)),
            "cue_fraction": float((shape | texture).float().mean()), "shape_bias_per_class": per_class}


def save_shape_bias_report(result: Dict[str, Any], images: torch.Tensor, predictions: Dict[str, torch.Tensor],
                           out_dir: str, classes: Sequence[str], examples: int = 12) -> list:
    """shape_bias.json and shape_bias_examples.png (the first `examples` images with each model's answer)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "shape_bias.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=2)
    n = min(examples, len(images))
    cols = min(n, 6)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, (2.3 + 0.22 * (1 + len(predictions))) * rows),
                             squeeze=False)
    shape_labels, texture_labels = result["set"]["shape_labels"], result["set"]["texture_labels"]
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(images[i, 0].numpy(), cmap="gray", vmin=0, vmax=1)
        answers = "\n".join(f"{name}: {classes[int(p[i])]}" for name, p in predictions.items())
        ax.set_title(f"shape {classes[shape_labels[i]]} / texture {classes[texture_labels[i]]}\n{answers}",
                     fontsize=6)
    fig.tight_layout()
    png_path = os.path.join(out_dir, "shape_bias_examples.png")
    fig.savefig(png_path, dpi=130)
    plt.close(fig)
    return [json_path, png_path]
