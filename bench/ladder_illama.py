"""The iLLaMA ablation ladder on Fashion-MNIST: every rung of configs/ladder_illama.yaml (plain ViT -> iLLaMA,
one ingredient at a time) trained with the same budget for 2 seeds, then attention ranks of every rung.

Budget (the ladder file's): 3 epochs of the 60,000 training images per rung and seed, batch 128, tested on
the 10,000 test images; 9 rungs x 2 seeds = 18 runs of ~1,400 steps. On 2 free CPU threads a step of this
674k-parameter model takes ~0.25 s, so ~6-7 min per run and ~2 h in all (twice that on 1 thread).
Interrupted? Run the same command again: finished runs are reused and the others resume.
Writes bench/results/ladder_illama.{json,md} and ladder_illama_{curves,attention_spectrum}.png.

    python bench/ladder_illama.py                 # the full ladder (~2 h on 2 threads)
    python bench/ladder_illama.py --smoke         # 1 epoch of 256 images per rung, results under the output dir
"""
import argparse
import os
import platform
import time

import torch

from llamavit.ablation import format_ladder_table, load_ladder, run_ladder, save_ladder_report, summarize_ladder

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(HERE, "..", "configs", "ladder_illama.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--epochs", type=int, help="epochs per rung (default: the ladder file's, 3)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", default="runs/ladder_illama")
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    ap.add_argument("--smoke", action="store_true", help="tiny budget; results go to the output directory")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    ladder = load_ladder(args.config)
    budget = {"epochs": args.epochs}
    results_dir, prefix = args.results, "ladder_illama"
    if args.smoke:
        budget = {"epochs": 1, "train_subset": 256, "val_subset": 200, "batch_size": 64}
        results_dir = os.path.join(args.output, "results")
    result = run_ladder(ladder, args.output, seeds=args.seeds, progress=True, **budget)
    result["machine"] = {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                         "torch": torch.__version__}
    result["wall_clock_s"] = time.perf_counter() - start
    paths = save_ladder_report(result, results_dir, prefix=prefix)
    print(format_ladder_table(summarize_ladder(result), markdown=False))
    print(f"wrote {', '.join(paths)} in {result['wall_clock_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
