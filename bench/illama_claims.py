"""iLLaMA's remaining claims on Fashion-MNIST, each judged holds / does not hold at this scale with the seed spread.

  soft-mask   the iLLaMA of configs/fmnist_illama.yaml with no soft mask, the constant and the linear schedule
              (configs/soft_mask_illama.yaml, the official 1/6 cut-off), 3 seeds: training-loss curves and top-1.
              The paper: the soft mask eases early optimisation and ends higher.
  shape-bias  Geirhos et al.'s shape bias (`llamavit analyze shape-bias`, cue-conflict images from Fashion-MNIST test
              items) of the iLLaMA and of the DeiT-style timm ViT of the same size trained by the same recipe and
              wall clock (bench/fmnist_race.py's arms `illama` and `vit_our_recipe`, seeds 0 and 1).
              The paper: iLLaMA is more shape-biased than DeiT.
  transfer    those trunks fine-tuned on scikit-learn's digits (1,347 train / 450 test real 8x8 images, upscaled to
              28x28): every weight, a linear probe, LoRA; against the same models trained from scratch for the same
              steps. The paper: the trunks transfer (CIFAR).
Each part merges its numbers and verdict into bench/results/illama_claims.json (`claims`: soft_mask, shape_bias,
transfer) and writes its PNG beside it. Runs go under runs/illama_claims/ and resume where they stopped.

    python bench/illama_claims.py soft-mask --seeds 0 1 2 --jobs 2     # 9 runs of one epoch, side by side
    python bench/illama_claims.py shape-bias                          # after bench/fmnist_race.py --seeds 0 1
    python bench/illama_claims.py transfer --seeds 0 1 --jobs 2
    python bench/illama_claims.py all --smoke                         # the three pipelines on tiny subsets
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
RESULTS_DIR = os.path.join(HERE, "results")
SOFT_MASK_CONFIG = os.path.join(ROOT, "configs", "soft_mask_illama.yaml")
RACE_ARMS = {"illama": "illama", "vit": "vit_our_recipe"}   # shape bias and transfer: the race's same-recipe pair
FASHION_MNIST_STATS = {"mean": [0.2860], "std": [0.3530]}
# fine-tuning on digits: each mode's learning rate; the same steps, augmentation and schedule for all
TRANSFER_MODES = {"full": {"lr": 5e-4}, "linear": {"lr": 5e-3, "trainable": ["head.*"]},
                  "lora": {"lr": 2e-3, "lora_rank": 8, "lora_targets": ["qkv", "proj", "mlp"]},
                  "scratch": {"lr": 2e-3}}
TRANSFER_RECIPE = {"data": "digits", "img_size": 28, "in_chans": 1, "scale": [0.75, 1.0], "hflip": 0.0,
                   "crop_pct": 1.0, "batch_size": 64, "epochs": 8, "warmup_epochs": 1.0, "min_lr": 1e-6,
                   "weight_decay": 0.05, "betas": [0.9, 0.99], "clip_grad": 1.0, "label_smoothing": 0.1,
                   "log_every": 7, "keep_checkpoints": 1, "progress": False, **FASHION_MNIST_STATS}


def mean_std(values: List[Optional[float]]) -> Optional[Dict[str, float]]:
    """Mean, std and count of the values that exist (None where none does)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def verdict(a: Dict[str, float], b: Dict[str, float], better: str = "higher") -> Dict[str, Any]:
    """Whether a beats b: the difference of the means, the larger seed spread, and 'holds' (beyond the spread),
    'does not hold' (the other way beyond the spread) or 'not established' (within it)."""
    if a is None or b is None:
        return {"difference": None, "spread": None, "verdict": "not measured"}
    diff = a["mean"] - b["mean"] if better == "higher" else b["mean"] - a["mean"]
    spread = max(a["std"], b["std"])
    if min(a["n"], b["n"]) < 2:
        return {"difference": diff, "spread": None, "verdict": "not established (one seed)"}
    state = "holds" if diff > spread else "does not hold" if diff < -spread else "not established (within spread)"
    return {"difference": diff, "spread": spread, "verdict": state}


def results_dir(args) -> str:
    """bench/results, or (--smoke) the output directory: a smoke run never overwrites the measured claims."""
    return args.output if args.smoke else RESULTS_DIR


def merge_result(args, part: str, record: Dict[str, Any]) -> None:
    """Put one claim's record into illama_claims.json, keeping the others."""
    sys.path.insert(0, HERE)
    from machine import cpu_flags, cpu_model
    path = os.path.join(results_dir(args), "illama_claims.json")
    result = json.load(open(path)) if os.path.exists(path) else {"benchmark": "illama_claims", "claims": {}}
    result["claims"][part] = {**record, "machine": {"cpu": cpu_model(), "flags": cpu_flags()}}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)


def run_side_by_side(commands: List[List[str]], jobs: int) -> None:
    """Run the commands `jobs` at a time, one thread each; exit with the failed ones."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pending, running, failed = list(commands), [], []
    while pending or running:
        while pending and len(running) < jobs:
            running.append(subprocess.Popen(pending.pop(0), env=env))
        running[0].wait()
        failed += [p.args for p in running if p.poll() not in (None, 0)]
        running = [p for p in running if p.poll() is None]
    if failed:
        sys.exit(f"illama_claims: {len(failed)} run(s) failed: {failed}")


# ---- soft mask ------------------------------------------------------------------------------------------------

def windows(curve: Dict[str, list], total_epochs: float) -> Dict[str, Optional[float]]:
    """Mean training loss in the sixths of training that matter: the soft phase (first 1/6), the sixth after it
    (every arm causal) and the last sixth."""
    def mean_in(lo: float, hi: float) -> Optional[float]:
        vals = [v for e, v in zip(curve["epoch"], curve["loss"]) if lo * total_epochs < e <= hi * total_epochs]
        return statistics.fmean(vals) if vals else None
    return {"loss_first_sixth": mean_in(0, 1 / 6), "loss_second_sixth": mean_in(1 / 6, 2 / 6),
            "loss_last_sixth": mean_in(5 / 6, 1)}


def soft_mask(args) -> None:
    from llamavit.ablation import load_ladder, save_ladder_report
    out = os.path.join(args.output, "soft_mask")
    budget = ["--train-subset", "2048", "--val-subset", "500"] if args.smoke else []
    done = [s for s in args.seeds if os.path.exists(os.path.join(out, f"seed{s}", "ladder.json"))]
    commands = [[sys.executable, "-m", "llamavit.cli", "ablate", "illama-ladder", "--config", SOFT_MASK_CONFIG,
                 "--seeds", str(s), "--output", os.path.join(out, f"seed{s}"), "--threads", "1", "--no-progress",
                 *budget] for s in args.seeds if s not in done]   # a seed's ladder.json: all its rungs finished
    run_side_by_side(commands, args.jobs)
    parts = [json.load(open(os.path.join(out, f"seed{s}", "ladder.json"))) for s in args.seeds]
    merged = {**{k: v for k, v in parts[0].items() if k not in ("summary", "attention_rank_comparison")},
              "seeds": list(args.seeds), "runs": [r for p in parts for r in p["runs"]]}
    save_ladder_report(merged, out, prefix="soft_mask")
    ladder = load_ladder(SOFT_MASK_CONFIG)
    rows = {}
    for rung in ladder.rungs:
        runs = [r for r in merged["runs"] if r["rung"] == rung.name]
        per_run = [windows(r["curves"], r["epochs"]) for r in runs]
        rows[rung.name] = {"change": rung.change, "top1": mean_std([r["top1"] for r in runs]),
                           "top1_per_seed": [r["top1"] for r in runs],
                           **{k: mean_std([w[k] for w in per_run]) for k in per_run[0]}}
    claims = {}
    for arm in ("soft_constant", "soft_linear"):
        claims[arm] = {"lower_loss_after_cutoff": verdict(rows[arm]["loss_second_sixth"],
                                                          rows["no_soft_mask"]["loss_second_sixth"], "lower"),
                       "higher_top1": verdict(rows[arm]["top1"], rows["no_soft_mask"]["top1"])}
    held = [c["higher_top1"]["verdict"] == "holds" for c in claims.values()]
    plot_soft_mask(merged, os.path.join(results_dir(args), "illama_claims_soft_mask.png"))
    merge_result(args, "soft_mask", {
        "claim": "the soft mask (constant or linear, cut-off 1/6) eases early optimisation and ends with a higher "
                 "top-1 than causal attention from the start",
        "holds": "holds" if all(held) else "partly" if any(held) else "does not hold",
        "budget": merged["budget"], "seeds": list(args.seeds), "arms": rows, "comparisons": claims,
        "smoke": args.smoke, "runs_dir": out})
    for name, row in rows.items():
        losses = " / ".join("-" if row[k] is None else f"{row[k]['mean']:.4f}"
                            for k in ("loss_first_sixth", "loss_second_sixth", "loss_last_sixth"))
        print(f"{name:14s} top-1 {row['top1']['mean']:.2f} ± {row['top1']['std']:.2f}  loss 1st/2nd/last sixth "
              f"{losses}")
    print(json.dumps(claims, indent=1))


def plot_soft_mask(merged: Dict[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, ax_top1) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 1]})
    names = []
    for run in sorted(merged["runs"], key=lambda r: r["rung"]):
        colour = {"no_soft_mask": "C0", "soft_constant": "C1", "soft_linear": "C2"}.get(run["rung"], "C3")
        label = run["rung"] if run["rung"] not in names else None
        names.append(run["rung"])
        ax.plot(run["curves"]["epoch"], run["curves"]["loss"], color=colour, alpha=0.6, lw=1, label=label)
        ax_top1.scatter([sorted(set(r["rung"] for r in merged["runs"])).index(run["rung"])], [run["top1"]],
                        color=colour)
    ax.axvline(merged["runs"][0]["epochs"] / 6, color="grey", ls="--", lw=0.8)
    ax.set(xlabel="epoch (dashed: the 1/6 cut-off)", ylabel="training loss",
           title="iLLaMA, Fashion-MNIST: the soft mask")
    ax.legend()
    rungs = sorted(set(r["rung"] for r in merged["runs"]))
    ax_top1.set_xticks(range(len(rungs)), [r.replace("_", "\n") for r in rungs], fontsize=8)
    ax_top1.set(ylabel="test top-1 (%)", title="per seed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- shape bias -----------------------------------------------------------------------------------------------

def race_run(arm: str, seed: int, race_dir: str) -> str:
    path = os.path.join(race_dir, RACE_ARMS[arm], f"seed{seed}")
    if not os.path.exists(os.path.join(path, "summary.json")):
        sys.exit(f"illama_claims: {path} is not a finished run; train it first: python bench/fmnist_race.py "
                 f"--runs {RACE_ARMS[arm]}:{seed}")
    return path


def shape_bias(args) -> None:
    out = os.path.join(args.output, "shape_bias")
    checkpoints = [race_run(arm, s, args.race_dir) for arm in RACE_ARMS for s in args.seeds]
    count = 500 if args.smoke else 2000
    subprocess.run([sys.executable, "-m", "llamavit.cli", "analyze", "shape-bias", "--checkpoint", *checkpoints,
                    "--count", str(count), "--output", out], check=True)
    report = json.load(open(os.path.join(out, "shape_bias.json")))
    by_path = {m["checkpoint"]: m for m in report["models"].values()}
    arms = {}
    for arm in RACE_ARMS:
        models = [by_path[race_run(arm, s, args.race_dir)] for s in args.seeds]
        arms[arm] = {"shape_bias": mean_std([m["shape_bias"] for m in models]),
                     "shape_bias_per_seed": [m["shape_bias"] for m in models],
                     "cue_fraction": mean_std([m["cue_fraction"] for m in models]),
                     "test_top1_per_seed": [json.load(open(os.path.join(m["checkpoint"], "summary.json")))["val_top1"]
                                            for m in models]}
    comparison = verdict(arms["illama"]["shape_bias"], arms["vit"]["shape_bias"])
    png = os.path.join(results_dir(args), "illama_claims_shape_bias.png")
    os.replace(os.path.join(out, "shape_bias_examples.png"), png)
    cue_set = {k: v for k, v in report["set"].items() if not k.endswith("_labels")}
    merge_result(args, "shape_bias", {
        "claim": "iLLaMA is more shape-biased than a DeiT-style ViT (same size, recipe and wall clock)",
        "holds": comparison["verdict"], "comparison": comparison, "arms": arms, "set": cue_set,
        "seeds": list(args.seeds), "smoke": args.smoke, "examples_png": os.path.basename(png)})
    for arm, row in arms.items():
        print(f"{arm:8s} shape bias {row['shape_bias']['mean']:.3f} ± {row['shape_bias']['std']:.3f}  "
              f"(cue decisions {row['cue_fraction']['mean']:.2f})")
    print(json.dumps(comparison))


# ---- transfer -------------------------------------------------------------------------------------------------

def transfer_worker(arm: str, seed: int, mode: str, out: str, race_dir: str, smoke: bool) -> None:
    """One fine-tuning (or from-scratch) run on digits; writes <run>/transfer.json."""
    import torch

    from llamavit.train import TrainConfig, Trainer, finetune, finetune_config
    torch.set_num_threads(1)
    run_dir = os.path.join(out, f"{arm}_seed{seed}", mode)
    options = {**TRANSFER_RECIPE, **TRANSFER_MODES[mode], "seed": seed,
               "output": run_dir, "resume": True, **({"epochs": 1} if smoke else {})}
    if mode == "scratch":   # the race arm's own model and attention schedule, fresh weights
        race_cfg = json.load(open(os.path.join(race_run(arm, seed, race_dir), "config.json")))
        race_cfg = race_cfg.get("config", race_cfg)
        options.update(model=race_cfg["model"], model_kwargs=race_cfg["model_kwargs"],
                       soft_mask=race_cfg.get("soft_mask", "none"),
                       soft_mask_epochs=(2 / 12) * options["epochs"] if race_cfg.get("soft_mask", "none") != "none"
                       else 0.0)
        summary = Trainer(TrainConfig.from_dict(options)).fit()
    else:   # the trunk keeps the attention it was trained with: iLLaMA stays causal (rate 0 from the first step)
        options.update(soft_mask="constant", soft_mask_epochs=0.0)
        summary = finetune(finetune_config(race_run(arm, seed, race_dir), **options))
    record = {"arm": arm, "seed": seed, "mode": mode, "top1": summary.get("val_top1"), "steps": summary["steps"],
              "trainable_parameters": summary.get("trainable_parameters"),
              "total_parameters": summary.get("total_parameters"), "train_seconds": summary["train_seconds"]}
    with open(os.path.join(run_dir, "transfer.json"), "w") as f:
        json.dump(record, f, indent=2)
    print(f"[transfer {arm} seed {seed} {mode}] digits top-1 {record['top1']:.2f} % ({record['steps']} steps)")


def transfer(args) -> None:
    out = os.path.join(args.output, "transfer")
    runs = [(arm, s, mode) for s in args.seeds for arm in RACE_ARMS for mode in TRANSFER_MODES]
    todo = [r for r in runs if not os.path.exists(os.path.join(out, f"{r[0]}_seed{r[1]}", r[2], "transfer.json"))]
    for arm, s, _ in todo:
        race_run(arm, s, args.race_dir)
    run_side_by_side([[sys.executable, os.path.abspath(__file__), "transfer-worker", arm, str(s), mode, "--output",
                       args.output, "--race-dir", args.race_dir] + (["--smoke"] if args.smoke else [])
                      for arm, s, mode in todo], args.jobs)
    records = [json.load(open(os.path.join(out, f"{arm}_seed{s}", mode, "transfer.json"))) for arm, s, mode in runs]
    table = {arm: {mode: mean_std([r["top1"] for r in records if r["arm"] == arm and r["mode"] == mode])
                   for mode in TRANSFER_MODES} for arm in RACE_ARMS}
    comparisons = {arm: {mode: verdict(table[arm][mode], table[arm]["scratch"]) for mode in ("full", "linear", "lora")}
                   for arm in RACE_ARMS}
    comparisons["illama_vs_vit_full"] = verdict(table["illama"]["full"], table["vit"]["full"])
    held = [comparisons[arm]["full"]["verdict"] == "holds" for arm in RACE_ARMS]
    plot_transfer(table, os.path.join(results_dir(args), "illama_claims_transfer.png"))
    merge_result(args, "transfer", {
        "claim": "a Fashion-MNIST-trained trunk fine-tuned on digits beats the same model trained from scratch for "
                 "the same steps",
        "holds": "holds" if all(held) else "partly" if any(held) else "does not hold",
        "recipe": TRANSFER_RECIPE, "modes": TRANSFER_MODES, "table": table, "comparisons": comparisons,
        "runs": records, "seeds": list(args.seeds), "smoke": args.smoke})
    for arm in RACE_ARMS:
        print(f"{arm:8s} " + "  ".join(f"{m} {table[arm][m]['mean']:.2f} ± {table[arm][m]['std']:.2f}"
                                       for m in TRANSFER_MODES))
    print(json.dumps(comparisons, indent=1))


def plot_transfer(table: Dict[str, Dict[str, Dict[str, float]]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    width = 0.38
    for i, arm in enumerate(table):
        means = [table[arm][m]["mean"] for m in TRANSFER_MODES]
        stds = [table[arm][m]["std"] for m in TRANSFER_MODES]
        ax.bar([x + (i - 0.5) * width for x in range(len(TRANSFER_MODES))], means, width, yerr=stds, capsize=3,
               label=arm)
    ax.set_xticks(range(len(TRANSFER_MODES)), list(TRANSFER_MODES))
    ax.set(ylabel="digits test top-1 (%)", title="transfer from Fashion-MNIST, equal steps")
    ax.set_ylim(bottom=max(0, min(table[a][m]["mean"] for a in table for m in TRANSFER_MODES) - 10))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["soft-mask", "shape-bias", "transfer", "all", "transfer-worker"])
    ap.add_argument("worker", nargs="*", help=argparse.SUPPRESS)
    ap.add_argument("--seeds", type=int, nargs="+", help="default: 0 1 2 (soft-mask), 0 1 (the others)")
    ap.add_argument("--jobs", type=int, default=2, help="runs side by side, one thread each")
    ap.add_argument("--output", default="runs/illama_claims")
    ap.add_argument("--race-dir", default="runs/fmnist_race", help="bench/fmnist_race.py's runs")
    ap.add_argument("--smoke", action="store_true", help="tiny subsets: the pipelines only")
    args = ap.parse_args()
    if args.part == "transfer-worker":
        arm, seed, mode = args.worker
        return transfer_worker(arm, int(seed), mode, os.path.join(args.output, "transfer"), args.race_dir, args.smoke)
    seeds = args.seeds
    if args.part in ("soft-mask", "all"):
        args.seeds = seeds or [0, 1, 2]
        soft_mask(args)
    if args.part in ("shape-bias", "all"):
        args.seeds = seeds or [0, 1]
        shape_bias(args)
    if args.part in ("transfer", "all"):
        args.seeds = seeds or [0, 1]
        transfer(args)


if __name__ == "__main__":
    main()
