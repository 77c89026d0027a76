"""JSON, plot and table of a resolution sweep (`accuracy_by_resolution` results)."""
import json
import os
from typing import Dict, List, Optional


def save_resolution_report(results: List[Dict], out_dir: str, train_size: Optional[int] = None,
                           title: str = "") -> List[str]:
    """resolution.json and resolution.png: top-1 against input size; refused sizes are marked on the axis.

    results: one {'img_size', 'top1', 'top5', 'loss'} or {'img_size', 'error'} per size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    ok = [r for r in results if "error" not in r]
    refused = [r for r in results if "error" in r]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    if ok:
        ax.plot([r["img_size"] for r in ok], [r["top1"] for r in ok], "o-", label="top-1")
        for r in ok:
            ax.annotate(f"{r['top1']:.1f}", (r["img_size"], r["top1"]), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=7)
    if refused:
        ax.plot([r["img_size"] for r in refused], [0] * len(refused), "rx", label="refused by the model")
    if train_size:
        ax.axvline(train_size, color="gray", ls="--", label=f"training size {train_size}")
    ax.set_xlabel("input size (pixels)")
    ax.set_ylabel("top-1 (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{title + ': ' if title else ''}accuracy by input resolution, no retraining", fontsize=9)
    fig.tight_layout()
    png = os.path.join(out_dir, "resolution.png")
    fig.savefig(png, dpi=100)
    plt.close(fig)
    path = os.path.join(out_dir, "resolution.json")
    with open(path, "w") as f:
        json.dump({"train_size": train_size, "results": results}, f, indent=2)
    return [path, png]


def format_resolution_table(results: List[Dict]) -> str:
    """Top-1 per input size as a plain-text table."""
    lines = [f"{'size':>5} {'top-1':>7} {'top-5':>7} {'loss':>7}"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['img_size']:>5} refused: {r['error']}")
        else:
            lines.append(f"{r['img_size']:>5} {r['top1']:7.2f} {r['top5']:7.2f} {r['loss']:7.4f}")
    return "\n".join(lines)
