"""int8 post-training quantisation of the trained Fashion-MNIST iLLaMA: accuracy on the 10,000 test images
and serialised size, float32 vs int8 dynamic vs int8 static (every Linear; llamavit.eval.quantize).

Targets (issue 7): top-1 drop <= 0.5 points and size >= 3x smaller. Uses --checkpoint (default: the run of
bench/fmnist_illama.py, runs/fmnist_illama); with --train-epochs N it first trains the demo iLLaMA
(llamavit demo's recipe) for N epochs into --train-output and quantises that.

    python bench/quantize_illama.py                                   # ~1.5 min on 2 threads
    python bench/quantize_illama.py --train-epochs 1                  # + ~2.5 min of training (the demo model)
    python bench/quantize_illama.py --subset 500 --results /tmp/q     # smoke
"""
import argparse
import json
import os
import platform
import shutil
import time

import torch

from llamavit.eval.loaders import eval_loader
from llamavit.eval.quantize import analyze_quantization, format_quantization_table, save_quantization_report
from llamavit.train import model_from_checkpoint, read_meta

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="runs/fmnist_illama", help="llamavit run directory to quantise")
    ap.add_argument("--train-epochs", type=int, default=0, help="train the demo iLLaMA first (0 = no)")
    ap.add_argument("--train-output", default="runs/quantize_demo")
    ap.add_argument("--subset", type=int, default=0, help="first N test images (0 = all 10,000)")
    ap.add_argument("--calibration-batches", type=int, default=4, help="256-image training batches for static")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    ap.add_argument("--tag", default="quantize_illama")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    checkpoint = args.checkpoint
    if args.train_epochs:
        from llamavit.demo import run_demo
        shutil.rmtree(args.train_output, ignore_errors=True)
        run_demo(args.train_output, epochs=args.train_epochs)
        checkpoint = args.train_output
    model = model_from_checkpoint(checkpoint).eval()
    loader, data, n = eval_loader(checkpoint, None, args.subset, 256)
    calibration = eval_loader(checkpoint, data, 0, 256, split="train")[0]
    result = analyze_quantization(model, loader, calibration, calibration_batches=args.calibration_batches)
    rows = {r["method"]: r for r in result["results"]}
    checks = {m: {"top1_drop_le_0.5": rows[m].get("top1_drop", 99) <= 0.5, "size_ratio_ge_3": rows[m].get(
              "size_ratio", 0) >= 3.0} for m in ("int8_dynamic", "int8_static") if m in rows}
    result.update({"benchmark": args.tag, "checkpoint": checkpoint, "model": read_meta(checkpoint).get("model"),
                   "model_kwargs": read_meta(checkpoint).get("model_kwargs"), "data": data,
                   "calibration_images": args.calibration_batches * 256, "targets": checks,
                   "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                               "torch": torch.__version__},
                   "wall_clock_s": time.perf_counter() - start})
    os.makedirs(args.results, exist_ok=True)
    paths = save_quantization_report(result, args.results, title=f"{result['model']} ({checkpoint})")
    final = [os.path.join(args.results, f"{args.tag}{os.path.splitext(p)[1]}") for p in paths]
    for src, dst in zip(paths, final):
        os.replace(src, dst)
    print(f"{data} ({n} test images), engine {result['engine']}\n{format_quantization_table(result)}")
    print(f"targets (drop <= 0.5 points, size >= 3x): {json.dumps(checks)}")
    print(f"wrote {', '.join(final)} in {result['wall_clock_s']:.0f} s")


if __name__ == "__main__":
    main()
