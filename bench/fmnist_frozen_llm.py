"""Does a frozen LLM block help a small ViT on Fashion-MNIST, which of its layers, and does it filter information
towards the object? (Pang et al.'s claims, at toy scale.)

Runs the ablation of configs/ablation_frozen_llm.yaml through the library (`llamavit ablate llm-layers` is the
same): the same DeiT-style ViT (patch 7 on 28x28 -> 16 patches + class token, D=96, depth 6, 3 heads) trained
alone, with a frozen random block of SmolLM2-135M's shape (the paper's control), with one SmolLM2 layer (0, 7, 15,
22, 29 = the last) and with its last 2 and 4 layers stacked; every arm with the same recipe, epochs and seeds,
`--jobs` runs side by side with `--threads` threads each (default 2 x 1 on a 2-core machine). Each trained model's
activation magnitude is scored as a detector of the item's patches on 1,000 test images, before and after the
frozen block. It also measures reading one layer from the SmolLM2 GGUF in a fresh process (wall time, extra RSS).
Writes bench/results/fmnist_frozen_llm.{json,md,png}.

    python bench/fmnist_frozen_llm.py                          # every arm, 2 seeds, the file's epochs
    python bench/fmnist_frozen_llm.py --epochs 4 --arms vit random layer_29
    python bench/fmnist_frozen_llm.py --smoke                  # every arm, tiny: checks the script
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch
from machine import cpu_flags, cpu_model  # bench/ helper

from llamavit.ablation.frozen_llm import (SMOKE, format_llm_claims, format_llm_table, load_llm_ablation,
                                          run_llm_ablation, save_llm_report)

HERE = os.path.dirname(os.path.abspath(__file__))

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(HERE, "..", "configs", "ablation_frozen_llm.yaml"))
    ap.add_argument("--epochs", type=int, help="epochs per run (default: the file's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--arms", nargs="+", help="only these arms (finished others are reported too)")
    ap.add_argument("--jobs", type=int, default=2, help="runs side by side")
    ap.add_argument("--threads", type=int, default=1, help="threads per run")
    ap.add_argument("--output", default="runs/fmnist_frozen_llm")
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    ap.add_argument("--tag", default="fmnist_frozen_llm")
    ap.add_argument("--smoke", action="store_true", help="tiny budget, seed 0; results go to the output directory")
    args = ap.parse_args()
    start = time.perf_counter()

    gguf = measure_gguf_read()
    print(f"SmolLM2 GGUF, read layer {gguf['layer']}: {gguf['wall_s']:.3f} s, +{gguf['extra_rss_mb']:.0f} MB RSS "
          f"(peak +{gguf['extra_peak_rss_mb']:.0f} MB)")
    ablation = load_llm_ablation(args.config)
    budget, seeds, results = {"epochs": args.epochs}, args.seeds, args.results
    if args.smoke:
        budget, seeds = {**budget, **SMOKE["train"]}, [0]
        ablation.score_images = SMOKE["score_images"]
        args.output, results = os.path.join(args.output, "smoke"), os.path.join(args.output, "smoke", "results")
    result = run_llm_ablation(ablation, args.output, seeds=seeds, only=args.arms, jobs=args.jobs,
                              threads=args.threads, **budget)
    result.update(benchmark=args.tag, smoke=args.smoke, gguf_read=gguf, wall_clock_s=time.perf_counter() - start,
                  machine={"cpu": cpu_model(), "flags": cpu_flags(), "cores": os.cpu_count(),
                           "torch": torch.__version__})
    paths = save_llm_report(result, results, prefix=args.tag)
    print(format_llm_table(result["summary"]))
    print(format_llm_claims(result["claims"]))
    print(f"wrote {', '.join(paths)} in {result['wall_clock_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
