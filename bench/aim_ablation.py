"""AIM's ablations on Fashion-MNIST: every arm of configs/ablation_aim.yaml (targets, attention at pre-training and
probe time, head, the masked baseline, patch orders, width, 10 % of the data, a 2x schedule) pre-trained with the
file's budget and attentive-probed, 2 seeds, then the paper's seven claims judged against the seed spread.

The budget is the file's unless --epochs changes it (the arms that scale epochs scale that). fp32 unless --amp:
at this size bf16 autocast measured 1.75x slower per step even on an AVX512-BF16 CPU (302 vs 173 ms); the
machine and its flags go into the JSON.
Interrupted? Run the same command again: finished arms are kept, the others resume.
Writes bench/results/aim_ablation.{json,md,png}.

    python bench/aim_ablation.py                      # every arm, seeds 0 1
    python bench/aim_ablation.py --epochs 2 --arms baseline pixels
    python bench/aim_ablation.py --smoke              # every arm, tiny; results under the output dir
"""
import argparse
import os
import time

import torch
from machine import bf16_native, cpu_flags, cpu_model  # bench/ helper

from llamavit.ablation.aim import (SMOKE, format_aim_table, format_claims, load_aim_ablation, run_aim_ablation,
                                   save_aim_report)

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(HERE, "..", "configs", "ablation_aim.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--arms", nargs="+", help="only these arms (and those they reuse); the report keeps the rest")
    ap.add_argument("--epochs", type=int, help="epochs per arm (default: the file's)")
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False, help="bf16 autocast")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", default="runs/ablation_aim")
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    ap.add_argument("--smoke", action="store_true", help="tiny budget; results go to the output directory")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pretrain, probe, results = {"epochs": args.epochs, "amp": args.amp}, {}, args.results
    if args.smoke:
        pretrain, probe = {**pretrain, **SMOKE["pretrain"]}, dict(SMOKE["probe"])
        args.output, results = os.path.join(args.output, "smoke"), os.path.join(args.output, "smoke", "results")
    result = run_aim_ablation(load_aim_ablation(args.config), args.output, seeds=args.seeds, only=args.arms,
                              progress=False, pretrain_budget=pretrain, probe_budget=probe)
    result["machine"] = {"cpu": cpu_model(), "flags": cpu_flags(), "bf16_native": bf16_native(),
                         "threads": args.threads, "torch": torch.__version__, "amp": args.amp}
    result["wall_clock_s"] = time.perf_counter() - start
    result["smoke"] = args.smoke
    paths = save_aim_report(result, results)
    print(format_aim_table(result["summary"]))
    print(format_claims(result["claims"]))
    print(f"wrote {', '.join(paths)} in {result['wall_clock_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
