"""Training-curve plot from the JSONL log records."""
from typing import Any, Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(history: List[Dict[str, Any]], path: str, title: str = "") -> None:
    """Two panels: training loss vs epoch, and validation top-1 vs epoch (when present)."""
    train = [r for r in history if "loss" in r]
    val = [r for r in history if "val_top1" in r]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        ax_loss.plot([r["epoch"] for r in train], [r["loss"] for r in train], label="train loss")
    if val:
        ax_loss.plot([r["epoch"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss")
        ax_acc.plot([r["epoch"] for r in val], [r["val_top1"] for r in val], "o-", label="val top-1")
        if "val_ema_top1" in val[-1]:
            ax_acc.plot([r["epoch"] for r in val], [r["val_ema_top1"] for r in val], "s--", label="EMA top-1")
        ax_acc.legend()
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("top-1 (%)")
    ax_acc.grid(alpha=0.3)
    ax_loss.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
