"""Report of a ladder run: per-rung means over seeds as JSON + markdown, curves and attention spectra PNGs."""
import json
import os
import statistics
from typing import Any, Dict, List, Optional

from ..eval.attention import plot_spectra


def read_json(path: str) -> Optional[Dict[str, Any]]:
    """The JSON object of a finished run's file (summary.json, ...), or None when it is not written yet."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def mean_std(values: List[float]) -> Dict[str, float]:
    """{'mean', 'std' (sample std, 0 for one value)} of the values that are not None ({None, None} if none)."""
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def gap(rows: Dict[str, Dict[str, Any]], a: str, b: str, key: str) -> Dict[str, Any]:
    """rows[a][key] - rows[b][key] (each a mean_std with the row's `seeds`) and whether it exceeds the larger std
    of the two (never with one seed): what an ablation's claim rests on."""
    sa, sb = rows[a][key], rows[b][key]
    if sa["mean"] is None or sb["mean"] is None:
        return {"between": [a, b], "on": key, "difference": None, "spread": None, "beyond_spread": False}
    spread = max(sa["std"], sb["std"])
    diff = sa["mean"] - sb["mean"]
    seeds = min(len(rows[a]["seeds"]), len(rows[b]["seeds"]))
    return {"between": [a, b], "on": key, "difference": diff, "spread": spread,
            "beyond_spread": seeds > 1 and abs(diff) > spread}


def summarize_ladder(result: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per rung: params, top-1 / final train loss / attention ranks as mean and std over seeds."""
    rows = []
    for rung in result["rungs"]:
        runs = [r for r in result["runs"] if r["rung"] == rung["name"]]
        if not runs:
            continue
        rows.append({"rung": rung["name"], "change": rung["change"], "params": runs[0]["params"],
                     "attention": runs[0]["attention"], "seeds": [r["seed"] for r in runs],
                     "top1": mean_std([r["top1"] for r in runs]),
                     "final_train_loss": mean_std([r["final_train_loss"] for r in runs]),
                     "attention_rank": mean_std([r["attention_rank"]["mean_rank"] for r in runs]),
                     "effective_rank": mean_std([r["attention_rank"]["mean_effective_rank"] for r in runs]),
                     "num_tokens": runs[0]["attention_rank"]["num_tokens"],
                     # wall time of runs trained start to finish here (a resumed run's counts only its tail)
                     "seconds": statistics.fmean(fresh) if (fresh := [r["seconds"] for r in runs
                                                                      if not r.get("resumed")]) else None})
    return rows


def plus_minus(stat: Dict[str, float], digits: int) -> str:
    """'mean ± std' with `digits` decimals, '-' without a mean."""
    if stat["mean"] is None:
        return "-"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def format_ladder_table(rows: List[Dict[str, Any]], markdown: bool = True) -> str:
    """The ladder summary as a table (markdown or plain text), one row per rung."""
    header = ["rung", "change", "params", "top-1 (%)", "final train loss", "attention", "attn rank",
              "effective rank", "s / run (not resumed)"]
    lines = []
    for r in rows:
        lines.append([r["rung"], r["change"], f"{r['params']:,}", plus_minus(r["top1"], 2),
                      plus_minus(r["final_train_loss"], 4),
                      r["attention"], f"{plus_minus(r['attention_rank'], 1)} / {r['num_tokens']}",
                      plus_minus(r["effective_rank"], 2), "-" if r["seconds"] is None else f"{r['seconds']:.0f}"])
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(out + ["| " + " | ".join(row) + " |" for row in lines])
    keep = [0, 2, 3, 4, 5, 6, 7]
    widths = [max(len(header[i]), *(len(row[i]) for row in lines)) for i in keep]
    fmt = lambda row: "  ".join(row[i].ljust(w) for i, w in zip(keep, widths))  # noqa: E731
    return "\n".join([fmt(header)] + [fmt(row) for row in lines])


def rank_comparison(rows: List[Dict[str, Any]]) -> Dict[str, Dict[str, float]]:
    """Mean attention rank / effective rank of the causal rungs vs the bidirectional rungs."""
    out = {}
    for kind in ("bidirectional", "causal"):
        group = [r for r in rows if r["attention"] == kind and r["attention_rank"]["mean"] is not None]
        if group:
            out[kind] = {"rungs": [r["rung"] for r in group],
                         "mean_rank": statistics.fmean(r["attention_rank"]["mean"] for r in group),
                         "mean_effective_rank": statistics.fmean(r["effective_rank"]["mean"] for r in group),
                         "num_tokens": group[0]["num_tokens"]}
    return out


def plot_ladder_curves(result: Dict[str, Any], path: str) -> None:
    """Left: training loss against epoch, one colour per rung, one line per seed. Right: each rung's final
    validation top-1, one marker per seed and a bar at the mean."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in result["rungs"]]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, name in enumerate(names):
        colour = plt.cm.tab10(i % 10)
        runs = [r for r in result["runs"] if r["rung"] == name]
        for j, run in enumerate(runs):
            c = run["curves"]
            ax_loss.plot(c["epoch"], c["loss"], color=colour, alpha=0.8, lw=1, label=name if j == 0 else None,
                         ls="-" if j == 0 else "--")
        if runs:
            top1 = [r["top1"] for r in runs]
            ax_acc.bar(i, sum(top1) / len(top1), color=colour, alpha=0.35)
            ax_acc.plot([i] * len(top1), top1, "o", color=colour, ms=4)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_loss.legend(fontsize=7, loc="upper right")
    ax_acc.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
    ax_acc.set_ylabel("final validation top-1 (%)")
    finals = [r["top1"] for r in result["runs"]]
    if finals:
        ax_acc.set_ylim(max(0.0, min(finals) - 5), min(100.0, max(finals) + 2))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    budget = result["budget"]
    fig.suptitle(f"{result['model']} ladder on {budget['data']}: {budget['epochs']} epoch(s), "
                 f"train images {budget['train_images']}, seeds {result['seeds']} (solid: first seed; dots: seeds, "
                 f"bars: mean)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_ladder_report(result: Dict[str, Any], out_dir: str, prefix: str = "ladder") -> List[str]:
    """<prefix>.json (every run + per-rung summary + rank comparison), <prefix>.md, <prefix>_curves.png,
    <prefix>_attention_spectrum.png. Returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    rows = summarize_ladder(result)
    comparison = rank_comparison(rows)
    paths = [os.path.join(out_dir, f"{prefix}{ext}") for ext in (".json", ".md", "_curves.png",
                                                                  "_attention_spectrum.png")]
    with open(paths[0], "w") as f:
        json.dump({**result, "summary": rows, "attention_rank_comparison": comparison}, f, indent=2)
    budget = result["budget"]
    text = [f"# {result['model']} ablation ladder", "",
            f"Budget per rung and seed: {budget['epochs']} epoch(s)" +
            (f", at most {budget['max_steps']} steps" if budget["max_steps"] else "") +
            f", batch {budget['batch_size']}, training images: {budget['train_images']}, test images: "
            f"{budget['val_images']} ({budget['data']}); seeds {result['seeds']}. Mean ± std over seeds.", "",
            format_ladder_table(rows), "",
            "Attention rank: numerical rank (singular values > N·eps·σ₁) and effective rank (exp entropy of the "
            "normalised singular values) of every layer's and head's attention map, averaged.", ""]
    for kind, c in comparison.items():
        text.append(f"- {kind} rungs ({', '.join(c['rungs'])}): rank {c['mean_rank']:.1f} / {c['num_tokens']}, "
                    f"effective rank {c['mean_effective_rank']:.2f}")
    with open(paths[1], "w") as f:
        f.write("\n".join(text) + "\n")
    plot_ladder_curves(result, paths[2])
    spectra = {}
    for row in rows:
        runs = [r for r in result["runs"] if r["rung"] == row["rung"]]
        spectra[f"{row['rung']} ({row['attention']})"] = [sum(v) / len(runs) for v in
                                                          zip(*(r["attention_rank"]["spectrum"] for r in runs))]
    plot_spectra(spectra, paths[3], title="attention-map singular values of the trained rungs\n"
                                          "(mean over layers, heads, images, seeds)")
    return paths
