"""What the CLI's heap setting (llamavit/heap.py) buys a training process: train-step img/s and minor page faults
per step of iLLaMA and its timm peer, each in fresh Python processes with glibc's default malloc and with
`keep_freed_memory()` called first (as `llamavit` does for its own process). Writes bench/results/heap_train.json.

    python bench/heap_train.py                           # iLLaMA-T and DeiT-T, 2 processes per mode, batch 32
    python bench/heap_train.py --processes 1 --steps 2 --batch 4     # a quick look
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

import torch
from machine import cpu_flags, cpu_model

HERE = os.path.dirname(os.path.abspath(__file__))

PROBE = r"""
import json, resource, sys, time, warnings
mode, name, batch, threads, steps = sys.argv[1:6]
batch, threads, steps = int(batch), int(threads), int(steps)
from llamavit.heap import keep_freed_memory
tuned = keep_freed_memory() if mode == "keep_freed_memory" else False
import torch, timm, llamavit
torch.set_num_threads(threads)
warnings.simplefilter("ignore")
torch.manual_seed(0)
model = (llamavit.create_model(name) if name.startswith("illama") else timm.create_model(name)).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 1000, (batch,))
def step():
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
step()   # warm-up
times, faults = [], []
for _ in range(steps):
    before, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
times.sort(); faults.sort()
print(json.dumps({"set": tuned, "img_s": batch / times[len(times) // 2], "faults_per_step": faults[len(faults) // 2]}))
"""


def run_process(mode: str, name: str, batch: int, threads: int, steps: int) -> dict:
    """One fresh process's median train step of `name` under `mode` ('default' or 'keep_freed_memory')."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "OMP_", "MKL_"))}
    out = subprocess.run([sys.executable, "-c", PROBE, mode, name, str(batch), str(threads), str(steps)],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["illama_tiny_patch16_224", "deit_tiny_patch16_224"])
    ap.add_argument("--processes", type=int, default=2, help="fresh processes per model and mode")
    ap.add_argument("--steps", type=int, default=5, help="timed train steps per process (after one warm-up)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "heap_train.json"))
    args = ap.parse_args()
    res = {"machine": {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "threads": args.threads,
                       "torch": torch.__version__},
           "batch": args.batch, "steps": args.steps, "models": {}}
    for name in args.models:
        entry = res["models"][name] = {}
        # the modes alternate process by process, so drift on a shared machine hits both alike
        for _ in range(args.processes):
            for mode in ("default", "keep_freed_memory"):
                entry.setdefault(mode, []).append(run_process(mode, name, args.batch, args.threads, args.steps))
        for mode, runs in entry.items():
            print(f"{name:28s} {mode:18s} img/s " + " ".join(f"{r['img_s']:.2f}" for r in runs)
                  + "  faults/step " + " ".join(str(r["faults_per_step"]) for r in runs))
        entry["speedup_median"] = (statistics.median(r["img_s"] for r in entry["keep_freed_memory"])
                                   / statistics.median(r["img_s"] for r in entry["default"]))
        print(f"{name:28s} keep_freed_memory / default: {entry['speedup_median']:.3f}x")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
