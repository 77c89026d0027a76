"""A fair Fashion-MNIST race: the same wall clock, the same machine and the same precision policy for every arm.

Arms (each a TrainConfig YAML plus overrides):
  illama          configs/fmnist_illama.yaml: the iLLaMA recipe of bench/fmnist_illama.py
  vit_peer        configs/fmnist_vit_peer.yaml: the timm ViT of ../shared/BASELINES.md with its stated recipe
                  (patch 7, 192 wide, 6 deep, avg pool, batch 256, ±2 px shift + flip)
  vit_our_recipe  timm's VisionTransformer (DeiT-style: LayerNorm, GELU MLP, learned positions, class token first)
                  at the iLLaMA's size (patch 4, 96 wide, 6 deep, 3 heads, MLP 4x), trained with the iLLaMA recipe
                  minus the soft mask: is it the model or the recipe?

Every arm runs through llamavit's one training loop (the same data pipeline for all) with `amp: true`, which trains
in bf16 only where this CPU's bf16 matmuls are faster (else float32, said in the log). Arms run side by side, one
thread each (--jobs 2 on 2 cores), in the order given, so each gets one core for the same wall clock. An arm's budget
counts from its process start to the end of its final test evaluation. Its cosine schedule is re-planned at every
epoch end, in optimiser steps: the steps left are those that still fit the budget at the slowest pace measured so far
(+3 %), so the last epoch is usually a fraction; the soft-mask cut-off stays the recipe's fraction (2 of 12) of the
planned schedule and the peer's warm-up its 3 %. Writes bench/results/fmnist_race.json and fmnist_race.png
(training loss over wall clock, test top-1 per arm).

    python bench/fmnist_race.py --budget-min 15 --seeds 0           # the three arms, side by side in pairs
    python bench/fmnist_race.py --budget-min 1 --smoke              # the pipeline on 2,048 images
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from sizing import seconds_per_step  # noqa: E402  (bench/ helper)
CONFIGS = os.path.join(HERE, "..", "configs")
SOFT_MASK_FRACTION = 2 / 12   # configs/fmnist_illama.yaml: linear soft mask over 2 of 12 epochs
ARMS: Dict[str, Dict[str, Any]] = {
    "illama": {"config": "fmnist_illama.yaml", "overrides": {}},
    "vit_peer": {"config": "fmnist_vit_peer.yaml", "overrides": {}},
    "vit_our_recipe": {"config": "fmnist_illama.yaml", "overrides": {
        "model": "timm:vit_tiny_patch16_224", "soft_mask": "none", "soft_mask_epochs": 0.0,
        "model_kwargs": {"patch_size": 4, "embed_dim": 96, "depth": 6, "num_heads": 3, "mlp_ratio": 4.0}}},
}
SMOKE = {"train_subset": 2048, "val_subset": 1000}


def arm_config(arm: str, seed: int, output: str, smoke: bool):
    """The TrainConfig of one arm and seed (its epochs still to be planned)."""
    from llamavit.train import TrainConfig
    spec = ARMS[arm]
    overrides = {**spec["overrides"], "seed": seed, "output": os.path.join(output, arm, f"seed{seed}"),
                 "progress": False, "amp": True, "eval_every": 10_000, "keep_checkpoints": 1,
                 **(SMOKE if smoke else {})}
    return TrainConfig.from_yaml(os.path.join(CONFIGS, spec["config"]), **overrides)


def plan_steps(done: int, left_s: float, step_s: float, eval_s: float) -> int:
    """Optimiser steps the schedule should span: those done plus those of `step_s` seconds that still fit `left_s`
    after the final evaluation (`eval_s`)."""
    return done + max(0, int((left_s - eval_s) // step_s))


def run_arm(arm: str, seed: int, budget_s: float, output: str, smoke: bool, t0: float) -> Dict[str, Any]:
    """Train one arm to its wall-clock budget, re-planning the schedule (a fractional number of epochs) at every
    epoch end; -> its record."""
    from llamavit.train import TrainConfig, Trainer
    cfg = arm_config(arm, seed, output, smoke)
    if os.path.exists(cfg.output):
        os.replace(cfg.output, cfg.output + f".earlier-{int(time.time())}")
    probe = Trainer(TrainConfig.from_dict({**cfg.to_dict(), "output": cfg.output + "-probe", "epochs": 1}))
    step_s = seconds_per_step(probe, steps=8)
    steps_per_epoch = probe.steps_per_epoch
    del probe
    shutil.rmtree(cfg.output + "-probe", ignore_errors=True)
    n_val = cfg.val_subset or 10000
    eval_s = step_s * n_val / cfg.batch_size / 3 * 1.5   # forward only, ~1/3 of a training step per image
    step_s *= 1.15   # the provisional margin: the full loop runs slower than the probe
    plans, segments, done, summary, trainer = [], [], 0, {}, None
    while True:
        total = plan_steps(done, budget_s - (time.perf_counter() - t0), step_s, eval_s)
        if trainer is None:   # a budget too small for one epoch still trains a few steps (smoke runs)
            total = max(total, 2)
        if total <= done:
            break
        epochs = total / steps_per_epoch
        plans.append(round(epochs, 3))
        values = {**cfg.to_dict(), "epochs": epochs, "max_steps": min(total, done + steps_per_epoch - done %
                                                                         steps_per_epoch),
                  "resume": done > 0, "allow_config_change": True}
        if arm == "vit_peer":   # the peer's warm-up: 3 % of the schedule
            values["warmup_epochs"] = 0.03 * epochs
        if cfg.soft_mask != "none":
            values["soft_mask_epochs"] = SOFT_MASK_FRACTION * epochs
        trainer = Trainer(TrainConfig.from_dict(values))
        began, before = time.perf_counter(), done
        summary = trainer.fit()
        done = trainer.step
        segments.append({"steps": done - before, "seconds": time.perf_counter() - began,   # incl. a final evaluation
                         "evaluated": done == total})
        step_s = 1.03 * max(g["seconds"] / g["steps"] for g in segments if not g["evaluated"]) if any(
            not g["evaluated"] for g in segments) else step_s
        if done == total and plan_steps(done, budget_s - (time.perf_counter() - t0), step_s, eval_s) <= done:
            break
    if "val_top1" not in summary:   # the last re-plan shortened the run: it ended without its final evaluation
        summary = {**summary, **trainer.evaluate()}
    history = trainer.history
    return {"arm": arm, "seed": seed, "model": cfg.model, "model_kwargs": cfg.model_kwargs,
            "params": trainer.parameters_report["total"], "batch_size": cfg.batch_size,
            "amp_in_effect": trainer.run_config().get("amp_in_effect"), "steps_per_epoch": steps_per_epoch,
            "planned_epochs": plans, "steps": done, "epochs": done / steps_per_epoch, "segments": segments,
            "wall_clock_s": time.perf_counter() - t0, "budget_s": budget_s,
            "test_top1": summary.get("val_top1"), "test_loss": summary.get("val_loss"),
            "final_train_loss": summary.get("final_train_loss"), "run_dir": cfg.output,
            "curve": {"epoch": [r["epoch"] for r in history if "loss" in r],
                      "loss": [r["loss"] for r in history if "loss" in r]}}


def plot(records: List[Dict[str, Any]], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_top1) = plt.subplots(1, 2, figsize=(11, 4))
    colours = {arm: f"C{i}" for i, arm in enumerate(ARMS)}
    for r in records:
        minutes = [e * r["wall_clock_s"] / 60 / max(r["epochs"], 1) for e in r["curve"]["epoch"]]
        ax_loss.plot(minutes, r["curve"]["loss"], color=colours[r["arm"]], alpha=0.8,
                     label=f"{r['arm']} seed {r['seed']}")
    ax_loss.set(xlabel="wall clock (min, epochs spread evenly)", ylabel="training loss (label-smoothed CE)",
                title="training loss")
    ax_loss.legend(fontsize=8)
    arms = [a for a in ARMS if any(r["arm"] == a for r in records)]
    for i, arm in enumerate(arms):
        top1 = [r["test_top1"] for r in records if r["arm"] == arm]
        ax_top1.scatter([i] * len(top1), top1, color=colours[arm])
    ax_top1.set_xticks(range(len(arms)), arms)
    ax_top1.set(ylabel="test top-1 (%)", title="Fashion-MNIST test top-1, same wall clock")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarise(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Per-arm mean / std of test top-1 and the two questions of the race."""
    arms = {}
    for arm in ARMS:
        top1 = [r["test_top1"] for r in records if r["arm"] == arm]
        if top1:
            arms[arm] = {"test_top1_mean": statistics.fmean(top1),
                         "test_top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                         "seeds": len(top1), "epochs": [r["epochs"] for r in records if r["arm"] == arm]}
    verdicts = {}
    if "illama" in arms and "vit_peer" in arms:
        gain = arms["illama"]["test_top1_mean"] - arms["vit_peer"]["test_top1_mean"]
        verdicts["illama_vs_peer"] = {"difference": gain, "target": 4.0, "met": gain >= 4.0}
    if "illama" in arms and "vit_our_recipe" in arms:
        gain = arms["illama"]["test_top1_mean"] - arms["vit_our_recipe"]["test_top1_mean"]
        spread = max(arms["illama"]["test_top1_std"], arms["vit_our_recipe"]["test_top1_std"])
        verdicts["illama_vs_same_recipe_vit"] = {"difference": gain, "spread": spread, "met": gain >= 0.0,
                                                 "beyond_spread": abs(gain) > spread > 0}
    return {"arms": arms, "targets": verdicts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--runs", nargs="+", metavar="ARM:SEED", help="these runs, in this order (instead of every arm "
                                                                   "of --arms for every seed)")
    ap.add_argument("--budget-min", type=float, default=15.0, help="wall clock per arm (minutes, all included)")
    ap.add_argument("--jobs", type=int, default=2, help="arms side by side (one thread each)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per arm")
    ap.add_argument("--output", default="runs/fmnist_race")
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    ap.add_argument("--tag", default="fmnist_race")
    ap.add_argument("--smoke", action="store_true", help="2,048 training / 1,000 test images: the pipeline only")
    ap.add_argument("--worker", nargs=2, metavar=("ARM", "SEED"), help=argparse.SUPPRESS)
    ap.add_argument("--collect-only", action="store_true", help="rewrite the JSON / PNG from finished arms")
    args = ap.parse_args()
    if args.worker:   # one arm in this process
        t0 = time.perf_counter()
        import torch
        torch.set_num_threads(args.threads)
        arm, seed = args.worker[0], int(args.worker[1])
        record = run_arm(arm, seed, args.budget_min * 60, args.output, args.smoke, t0)
        with open(os.path.join(args.output, arm, f"seed{seed}", "race.json"), "w") as f:
            json.dump(record, f, indent=2)
        print(f"[{arm} seed {seed}] test top-1 {record['test_top1']:.2f} % after {record['epochs']:.2f} epochs in "
              f"{record['wall_clock_s'] / 60:.1f} min (plans {record['planned_epochs']})")
        return

    jobs = [(arm, seed) for seed in args.seeds for arm in args.arms]
    if args.runs:
        jobs = [(run.split(":")[0], int(run.split(":")[1])) for run in args.runs]
        unknown = sorted({arm for arm, _ in jobs} - set(ARMS))
        if unknown:
            ap.error(f"--runs: unknown arm(s) {unknown}; the arms are {list(ARMS)}")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    running: List[subprocess.Popen] = []
    if not args.collect_only:
        for arm, seed in jobs:
            while len(running) >= args.jobs:
                running = [p for p in running if p.poll() is None] or running
                if len(running) >= args.jobs:
                    time.sleep(2)
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", arm, str(seed), "--budget-min",
                   str(args.budget_min), "--threads", str(args.threads), "--output", args.output]
            running.append(subprocess.Popen(cmd + (["--smoke"] if args.smoke else []), env=env))
        failed = [p.args for p in running if p.wait() != 0]
        if failed:
            sys.exit(f"fmnist_race: {len(failed)} arm(s) failed: {failed}")
    records = []
    for arm, seed in jobs:
        path = os.path.join(args.output, arm, f"seed{seed}", "race.json")
        if os.path.exists(path):
            records.append(json.load(open(path)))
    from machine import cpu_flags, cpu_model
    result = {"benchmark": args.tag, "smoke": args.smoke,
              "machine": {"cpu": cpu_model(), "flags": cpu_flags(), "threads_per_arm": args.threads,
                          "arms_side_by_side": args.jobs, "cores": os.cpu_count()},
              "budget_min": args.budget_min, "runs": records, **summarise(records)}
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, f"{args.tag}.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(records, os.path.join(args.results, f"{args.tag}.png"))
    for arm, row in result["arms"].items():
        print(f"{arm:16s} {row['test_top1_mean']:6.2f} ± {row['test_top1_std']:.2f} %  epochs "
              f"{[round(e, 2) for e in row['epochs']]}")
    print(json.dumps(result["targets"], indent=1))


if __name__ == "__main__":
    main()
