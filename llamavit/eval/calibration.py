"""Calibration: expected calibration error (ECE) and the reliability diagram.

A prediction's confidence is its top softmax probability. Confidences are put in `num_bins` equal-width
bins over [0, 1] (bin b holds (b/n, (b+1)/n], the first also holds 0);
    ECE = sum_b (|bin b| / N) * |accuracy(bin b) - mean confidence(bin b)|,
reported in [0, 1] (multiply by 100 for points). A perfectly calibrated model has ECE 0.
"""
import json
import os
from typing import Dict, List, Tuple

import torch
import torch.nn as nn


@torch.no_grad()
def collect_logits(model: nn.Module, loader, device: str = "cpu") -> Tuple[torch.Tensor, torch.Tensor]:
    """Run `model` over `loader`; returns (logits (N, C) float32 on CPU, targets (N,) int64)."""
    was_training = model.training
    model.eval()
    logits, targets = [], []
    for images, labels in loader:
        logits.append(model(images.to(device)).float().cpu())
        targets.append(labels.cpu())
    model.train(was_training)
    if not logits:
        raise ValueError("evaluation set is empty")
    return torch.cat(logits), torch.cat(targets)


def calibration_bins(probs: torch.Tensor, targets: torch.Tensor, num_bins: int = 15) -> List[Dict[str, float]]:
    """Per-bin statistics of probs (N, C) against targets (N,).

    Returns num_bins dicts {'lower', 'upper', 'count', 'confidence', 'accuracy'} (confidence and accuracy
    are means over the bin, 0 for an empty bin)."""
    if probs.ndim != 2 or targets.shape != probs.shape[:1]:
        raise ValueError(f"expected probs (N, C) and targets (N,), got {tuple(probs.shape)} and {tuple(targets.shape)}")
    confidence, predicted = probs.float().max(dim=1)
    correct = (predicted == targets).float()
    index = (torch.ceil(confidence * num_bins).long() - 1).clamp(0, num_bins - 1)
    count = torch.bincount(index, minlength=num_bins).float()
    conf_sum = torch.zeros(num_bins).index_add_(0, index, confidence)
    acc_sum = torch.zeros(num_bins).index_add_(0, index, correct)
    safe = count.clamp_min(1)
    return [{"lower": b / num_bins, "upper": (b + 1) / num_bins, "count": int(count[b]),
             "confidence": (conf_sum[b] / safe[b]).item(), "accuracy": (acc_sum[b] / safe[b]).item()}
            for b in range(num_bins)]


def expected_calibration_error(probs: torch.Tensor, targets: torch.Tensor, num_bins: int = 15) -> float:
    """ECE in [0, 1] of probs (N, C) (rows sum to one) against targets (N,)."""
    bins = calibration_bins(probs, targets, num_bins)
    total = sum(b["count"] for b in bins)
    return sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins)


def analyze_calibration(logits: torch.Tensor, targets: torch.Tensor, num_bins: int = 15) -> dict:
    """ECE, accuracy, mean confidence, NLL and the bins of logits (N, C) against targets (N,)."""
    probs = logits.float().softmax(dim=1)
    bins = calibration_bins(probs, targets, num_bins)
    total = len(targets)
    return {"num_images": total, "num_bins": num_bins,
            "ece": sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in bins),
            "top1": (probs.argmax(1) == targets).float().mean().item() * 100,
            "mean_confidence": probs.max(1).values.mean().item(),
            "nll": torch.nn.functional.cross_entropy(logits.float(), targets).item(), "bins": bins}


def save_calibration_report(result: dict, out_dir: str, title: str = "") -> List[str]:
    """calibration.json and reliability.png (accuracy per confidence bin vs the diagonal, bin counts below)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    bins = result["bins"]
    width = 1.0 / len(bins)
    centres = [b["lower"] + width / 2 for b in bins]
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(5, 6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    full = [(c, b) for c, b in zip(centres, bins) if b["count"]]
    ax.bar([c for c, _ in full], [b["accuracy"] for _, b in full], width=width, edgecolor="black", color="tab:blue",
           label="accuracy")
    ax.plot([c for c, _ in full], [b["confidence"] for _, b in full], "_", color="tab:red", ms=14, mew=2.5,
            label="mean confidence")
    ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    ax.set_title(f"{title + ': ' if title else ''}ECE {100 * result['ece']:.2f} ({result['num_bins']} bins, "
                 f"{result['num_images']} images)", fontsize=9)
    ax_n.bar(centres, [b["count"] for b in bins], width=width, edgecolor="black", color="gray")
    ax_n.set_xlabel("confidence (top softmax probability)")
    ax_n.set_ylabel("images")
    fig.tight_layout()
    png = os.path.join(out_dir, "reliability.png")
    fig.savefig(png, dpi=100)
    plt.close(fig)
    path = os.path.join(out_dir, "calibration.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return [path, png]


def format_calibration_table(result: dict) -> str:
    """ECE and accuracy per confidence bin as a plain-text table."""
    lines = [f"ECE {100 * result['ece']:.2f} points ({result['num_bins']} bins), top-1 {result['top1']:.2f}%, "
             f"mean confidence {100 * result['mean_confidence']:.2f}%, NLL {result['nll']:.4f}",
             f"{'bin':>11} {'images':>7} {'confidence':>10} {'accuracy':>9}"]
    for b in result["bins"]:
        if b["count"]:
            lines.append(f"{b['lower']:.2f}-{b['upper']:.2f} {b['count']:7d} {b['confidence']:10.3f} "
                         f"{b['accuracy']:9.3f}")
    return "\n".join(lines)
