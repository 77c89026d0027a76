"""CPU eval throughput of VisionLLaMA against timm's nearest models, side by side in one process.

- plain: llamavit `visionllama_small_patch16_224` vs timm `vit_small_patch16_224` (learned positions) and
  `vit_small_patch16_rope_224` (a 2D-RoPE ViT); target: >= 1.0x the RoPE ViT;
- pyramid: llamavit `visionllama_pyramid_small_224` vs timm `twins_svt_small` (the architecture it
  modifies: PEG instead of RoPE, GELU MLP).
fp32, eval, torch.inference_mode, random weights, interleaved rounds (timing helpers of
bench/throughput.py: medians over the rounds where other processes were quiet), FLOPs per image from
torch.utils.flop_counter, and the fraction of a measured fp32 matmul peak.

    python bench/throughput_visionllama.py            # ~3 min on a quiet 2-core machine
    python bench/throughput_visionllama.py --quick    # smoke run
"""
import argparse
import json
import os
import sys
import time

import timm
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import flops_per_image, load_average, machine_info, matmul_peak, timed  # noqa: E402

import llamavit  # noqa: E402

GROUPS = {
    "plain": ("visionllama_small_patch16_224", ["vit_small_patch16_224", "vit_small_patch16_rope_224"]),
    "pyramid": ("visionllama_pyramid_small_224", ["twins_svt_small"]),
}


def build(name: str) -> torch.nn.Module:
    model = llamavit.create_model(name) if name in llamavit.list_models() else timm.create_model(name)
    return model.eval()


def bench_group(ours: str, peers: list, batch: int, rounds: int, max_seconds: float, peak: float) -> dict:
    models = {name: build(name) for name in [ours, *peers]}
    x = torch.randn(batch, 3, 224, 224)
    with torch.inference_mode():
        stats = timed({name: (lambda m=m: m(x)) for name, m in models.items()}, rounds, warmup=1,
                      max_seconds=max_seconds)
    out = {"batch": batch, "models": {}}
    for name, s in stats.items():
        gflop = flops_per_image(models[name], 224) / 1e9
        img_s = batch / s["median_s"]
        out["models"][name] = {"img_per_s": img_s, "gflop_per_img": gflop, "params": sum(
            p.numel() for p in models[name].parameters()), "frac_of_matmul_peak": img_s * gflop / peak, **s}
    mine = out["models"][ours]["img_per_s"]
    out["ratio_ours_over"] = {peer: mine / out["models"][peer]["img_per_s"] for peer in peers}
    return out


def markdown(res: dict) -> str:
    lines = [f"VisionLLaMA throughput, {res['machine']['cpu']}, {res['machine']['threads']} threads, fp32 eval, "
             f"224x224; matmul peak {res['matmul_peak']['gflops_per_s']:.0f} GFLOP/s", "",
             "| model | params | GFLOP/img | img/s | % of matmul peak | ours / this |", "|---|---|---|---|---|---|"]
    for group in res["groups"].values():
        for name, m in group["models"].items():
            ratio = group["ratio_ours_over"].get(name)
            lines.append(f"| {name} | {m['params'] / 1e6:.1f}M | {m['gflop_per_img']:.2f} | {m['img_per_s']:.1f} | "
                         f"{100 * m['frac_of_matmul_peak']:.0f}% | {'' if ratio is None else f'{ratio:.2f}x'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-seconds", type=float, default=240.0, help="extra time to collect quiet rounds, per group")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "throughput_visionllama.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.rounds, args.max_seconds = 2, 2, 0.0
    torch.set_num_threads(args.threads)
    start = time.time()
    res = {"machine": machine_info(args.threads), "load_before": load_average(),
           "matmul_peak": matmul_peak(2048 if args.quick else 4096, args.rounds, args.max_seconds / 4)}
    res["groups"] = {g: bench_group(ours, peers, args.batch, args.rounds, args.max_seconds,
                                    res["matmul_peak"]["gflops_per_s"]) for g, (ours, peers) in GROUPS.items()}
    res["load_after"], res["seconds"] = load_average(), time.time() - start
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(markdown(res))
    print(f"\nwritten {args.out} ({res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
