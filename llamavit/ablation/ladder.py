"""An ablation ladder as data: rungs of model/training options, each trained with the same budget.

A ladder file (YAML, e.g. configs/ladder_illama.yaml) holds
    model: <registered name>      base_model: {options shared by every rung}
    train: {TrainConfig options shared by every rung}    rank_images: N
    rungs: [{name, change, model: {options}, train: {options}}, ...]
Rungs are cumulative: a rung's options update those of the rung above it. `train` may hold
`soft_mask_fraction`, the soft-mask cut-off as a fraction of the epochs (so the schedule scales with
the budget). Every rung and seed is trained by `llamavit.train.Trainer` into <output>/<rung>/seed<k>
(resumed if interrupted), then its attention-map ranks are measured on the first test images.
"""
import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch
import yaml

from ..eval.attention import attention_rank
from ..train import TrainConfig, Trainer


@dataclass
class Rung:
    """One rung: its name, what it changes, and its resolved (cumulative) model and training options."""
    name: str
    change: str
    model_kwargs: Dict[str, Any]       # resolved (cumulative) model options
    train: Dict[str, Any]              # resolved (cumulative) training options of this rung


@dataclass
class Ladder:
    """A ladder file, resolved: the model name, the rungs, the shared training options."""
    model: str
    rungs: List[Rung]
    train: Dict[str, Any] = field(default_factory=dict)
    rank_images: int = 64


def load_ladder(path: str) -> Ladder:
    """Read a ladder YAML file and resolve each rung's cumulative options."""
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    unknown = set(raw) - {"model", "base_model", "train", "rank_images", "rungs"}
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}")
    if not raw.get("rungs"):
        raise ValueError(f"{path}: no rungs")
    model_opts, train_opts, rungs = dict(raw.get("base_model") or {}), {}, []
    for i, r in enumerate(raw["rungs"]):
        if "name" not in r:
            raise ValueError(f"{path}: rung {i} has no name")
        extra = set(r) - {"name", "change", "model", "train"}
        if extra:
            raise ValueError(f"{path}: rung {r['name']!r} has unknown key(s) {sorted(extra)}")
        model_opts = {**model_opts, **(r.get("model") or {})}
        train_opts = {**train_opts, **(r.get("train") or {})}
        rungs.append(Rung(r["name"], r.get("change", ""), dict(model_opts), dict(train_opts)))
    names = [r.name for r in rungs]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: rung names repeat: {names}")
    return Ladder(raw.get("model", "ladder_vit_tiny_patch16_224"), rungs, dict(raw.get("train") or {}),
                  int(raw.get("rank_images", 64)))


def rung_train_config(ladder: Ladder, rung: Rung, seed: int, output: str, **overrides) -> TrainConfig:
    """The TrainConfig of one rung and seed: ladder train options < rung options < overrides (the budget)."""
    values = {**ladder.train, **rung.train, **{k: v for k, v in overrides.items() if v is not None}}
    fraction = values.pop("soft_mask_fraction", None)
    if fraction is not None:
        values["soft_mask_epochs"] = fraction * values.get("epochs", TrainConfig.epochs)
    return TrainConfig.from_dict({**values, "model": ladder.model, "model_kwargs": dict(rung.model_kwargs),
                                  "seed": seed, "output": os.path.join(output, rung.name, f"seed{seed}"),
                                  "resume": True})


def _rank_batch(trainer: Trainer, n: int) -> torch.Tensor:
    images = [trainer.val_set[i][0] for i in range(min(n, len(trainer.val_set)))]
    return torch.stack(images)


def final_attention(model) -> str:
    """'bidirectional' or 'causal' (incl. iLLaMA's soft mask at its final rate) of a trained model."""
    modes = {blk.attn.mask_mode for blk in model.blocks}
    rate = getattr(model, "soft_mask_rate", 1.0)
    if modes == {"bidirectional"} or (modes == {"soft"} and rate >= 1.0):
        return "bidirectional"
    return "causal" if rate == 0.0 or "causal" in modes else f"soft r={rate:.2f}"


def train_rung(ladder: Ladder, rung: Rung, seed: int, output: str, progress: bool = True, **budget) -> Dict[str, Any]:
    """Train one rung with one seed; returns params, top-1, final train loss, curves and attention ranks."""
    cfg = rung_train_config(ladder, rung, seed, output, progress=progress, **budget)
    start = time.perf_counter()
    trainer = Trainer(cfg)
    summary = trainer.fit()
    seconds = time.perf_counter() - start
    model = trainer.model.eval()
    ranks = attention_rank(model, _rank_batch(trainer, ladder.rank_images))
    curves = {"epoch": [r["epoch"] for r in trainer.history if "loss" in r],
              "loss": [r["loss"] for r in trainer.history if "loss" in r],
              "val_epoch": [r["epoch"] for r in trainer.history if "val_top1" in r],
              "val_top1": [r["val_top1"] for r in trainer.history if "val_top1" in r]}
    return {"rung": rung.name, "seed": seed, "params": sum(p.numel() for p in model.parameters()),
            "top1": summary.get("val_top1"), "top5": summary.get("val_top5"), "val_loss": summary.get("val_loss"),
            "final_train_loss": summary.get("final_train_loss"), "steps": summary["steps"],
            "epochs": summary["epochs"], "seconds": seconds,
            "resumed": summary.get("resumed", False),   # then `seconds` counts only what ran this time
            "attention": final_attention(model),
            "soft_mask_rate": getattr(model, "soft_mask_rate", None),
            "attention_rank": {k: ranks[k] for k in ("num_tokens", "mean_rank", "mean_effective_rank", "spectrum")},
            "curves": curves, "run_dir": cfg.output}


def run_ladder(ladder: Ladder, output: str, seeds: Sequence[int] = (0,), only: Optional[Sequence[str]] = None,
               progress: bool = True, log=print, **budget) -> Dict[str, Any]:
    """Train every rung (or those named in `only`) for every seed with the same budget.

    budget: TrainConfig overrides applied to every rung (epochs, max_steps, train_subset, val_subset,
    batch_size...). Returns the ladder result (also the input of report.save_ladder_report)."""
    rungs = ladder.rungs if not only else [r for r in ladder.rungs if r.name in set(only)]
    missing = set(only or []) - {r.name for r in ladder.rungs}
    if missing:
        raise ValueError(f"unknown rung(s) {sorted(missing)}; the ladder has {[r.name for r in ladder.rungs]}")
    runs = []
    for rung in rungs:
        for seed in seeds:
            log(f"[{rung.name} seed {seed}] {rung.change}")
            runs.append(train_rung(ladder, rung, seed, output, progress=progress, **budget))
            r = runs[-1]
            log(f"[{rung.name} seed {seed}] top-1 {r['top1']:.2f}  final train loss {r['final_train_loss']:.4f}  "
                f"attention {r['attention']}, mean rank {r['attention_rank']['mean_rank']:.1f} / "
                f"{r['attention_rank']['num_tokens']}, effective {r['attention_rank']['mean_effective_rank']:.2f}  "
                f"({r['seconds']:.0f} s)")
    example = rung_train_config(ladder, rungs[0], seeds[0], output, **budget)
    return {"model": ladder.model, "seeds": list(seeds),
            "budget": {"epochs": example.epochs, "max_steps": example.max_steps,
                       "train_images": example.train_subset or "all", "val_images": example.val_subset or "all",
                       "batch_size": example.batch_size, "data": example.data},
            "rungs": [dataclasses.asdict(r) for r in rungs], "runs": runs}

