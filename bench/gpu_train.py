"""GPU training throughput and MFU (model FLOPs utilisation) of iLLaMA-B and VisionLLaMA-B, bf16.

For a lent accelerator: bf16 autocast, fused SDPA attention, optionally torch.compile, AdamW (fused),
synthetic 224x224 batches (data loading is not what is measured). MFU = achieved model FLOP/s /
the device's dense bf16 peak; the model FLOPs are 3x the forward FLOPs counted by
torch.utils.flop_counter (forward + backward, without activation recomputation). timm's
deit_base_patch16_224 runs alongside as the anchor. Writes bench/results/gpu_train.json.

    python bench/gpu_train.py                       # H100/H200 peak from the device name
    python bench/gpu_train.py --peak-tflops 989     # or give the bf16 dense peak
    python bench/gpu_train.py --no-compile --batch 128
"""
import argparse
import json
import os
import sys
import time

import timm
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import llamavit

MODELS = {"illama_base_patch16_224": {}, "visionllama_base_patch16_224": {}, "timm:deit_base_patch16_224": {}}
# dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by device-name substring
PEAKS = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}


def device_peak(name: str) -> float:
    for key, peak in PEAKS.items():
        if key in name:
            return peak
    raise SystemExit(f"unknown bf16 peak for {name!r}: pass --peak-tflops")


def forward_flops(model: nn.Module, batch: int) -> int:
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(x)
    return counter.get_total_flops()


def bench(name: str, kwargs: dict, batch: int, steps: int, compile_: bool, peak: float) -> dict:
    model = llamavit.create_model(name, **kwargs).cuda().train()
    flops_fwd = forward_flops(model, batch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    step_model = torch.compile(model) if compile_ else model
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    y = torch.randint(0, 1000, (batch,), device="cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(step_model(x), y)
        loss.backward()
        opt.step()

    for _ in range(5):  # warm-up (compilation, cuDNN/cuBLAS autotuning)
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    med = sorted(times)[len(times) // 2]
    achieved = 3 * flops_fwd / med
    return {"img_per_s": batch / med, "step_ms_median": 1000 * med, "fwd_gflop_per_img": flops_fwd / batch / 1e9,
            "mfu": achieved / (peak * 1e12), "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--peak-tflops", type=float, default=0.0)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "gpu_train.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark needs a GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or device_peak(name)
    res = {"device": name, "peak_bf16_tflops": peak, "batch": args.batch, "compile": args.compile,
           "torch": torch.__version__, "timm": timm.__version__, "models": {}}
    for model_name, kw in MODELS.items():
        res["models"][model_name] = bench(model_name, kw, args.batch, args.steps, args.compile, peak)
        r = res["models"][model_name]
        print(f"{model_name}: {r['img_per_s']:.0f} img/s, MFU {100 * r['mfu']:.1f}%, "
              f"{r['peak_mem_gib']:.1f} GiB", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
