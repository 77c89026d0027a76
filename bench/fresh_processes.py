"""Does iLLaMA's eager speed depend on the process's heap history? Eval throughput of iLLaMA vs timm's DeiT of the
same size, measured in N fresh Python processes (default allocator, no environment variables), each timing the
two models in interleaved rounds (A B A B ...) and reporting its median ratio.

A first run of the soft mask's explicit form used to allocate fresh (B, H, N, N) buffers per layer per call; glibc
maps such buffers and unmaps them on free, so a process whose heap had been trimmed page-faulted every call and ran
at 0.6x-1.1x DeiT-T depending on what it had done before. The workspace in llamavit/layers/attention.py removes
that; this script is the measurement. Writes bench/results/fresh_processes.json.

    python bench/fresh_processes.py                      # 5 processes, iLLaMA-T and -S, batch 32, 2 threads
    python bench/fresh_processes.py --processes 2 --rounds 3 --batch 8    # a quick look
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from machine import cpu_flags, cpu_model

HERE = os.path.dirname(os.path.abspath(__file__))
PAIRS = {"tiny": ("illama_tiny_patch16_224", "deit_tiny_patch16_224"),
         "small": ("illama_small_patch16_224", "deit_small_patch16_224")}

PROBE = r"""
import json, statistics, sys, time, warnings
import torch, timm, llamavit
ours_name, peer_name, batch, threads, rounds, rate = sys.argv[1:7]
batch, threads, rounds, rate = int(batch), int(threads), int(rounds), float(rate)
torch.set_num_threads(threads)
warnings.simplefilter("ignore")
torch.manual_seed(0)
ours = llamavit.create_model(ours_name).eval()
for m in ours.modules():
    if hasattr(m, "soft_mask_rate"):
        m.soft_mask_rate = rate
peer = timm.create_model(peer_name).eval()
x = torch.randn(batch, 3, 224, 224)
times = {"ours": [], "peer": []}
with torch.inference_mode():
    ours(x), peer(x)   # warm-up
    for _ in range(rounds):
        for key, model in (("ours", ours), ("peer", peer)):
            start = time.perf_counter()
            model(x)
            times[key].append(time.perf_counter() - start)
ours_s, peer_s = statistics.median(times["ours"]), statistics.median(times["peer"])
print(json.dumps({"ours_img_s": batch / ours_s, "peer_img_s": batch / peer_s, "ratio": peer_s / ours_s,
                  "ours_s": times["ours"], "peer_s": times["peer"]}))
"""


def run_process(ours: str, peer: str, batch: int, threads: int, rounds: int, rate: float) -> dict:
    """One fresh process's interleaved measurement of ours vs peer (eval, inference mode)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "OMP_", "MKL_"))}
    out = subprocess.run([sys.executable, "-c", PROBE, ours, peer, str(batch), str(threads), str(rounds), str(rate)],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, default=5)
    ap.add_argument("--sizes", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    ap.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.5],
                    help="soft-mask rates (0: the end of training, causal rows; 0.5: mid-schedule)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "fresh_processes.json"))
    args = ap.parse_args()
    start = time.perf_counter()
    results = []
    for size in args.sizes:
        ours, peer = PAIRS[size]
        for rate in args.rates:
            runs = [run_process(ours, peer, args.batch, args.threads, args.rounds, rate)
                    for _ in range(args.processes)]
            ratios = [r["ratio"] for r in runs]
            row = {"ours": ours, "peer": peer, "soft_mask_rate": rate, "ratios": ratios,
                   "min_ratio": min(ratios), "median_ratio": statistics.median(ratios),
                   "processes_at_or_above_1": sum(r >= 1.0 for r in ratios),
                   "ours_img_s": [r["ours_img_s"] for r in runs], "peer_img_s": [r["peer_img_s"] for r in runs]}
            results.append(row)
            print(f"{ours} / {peer}, soft-mask rate {rate}: " + ", ".join(f"{r:.2f}x" for r in ratios)
                  + f"  ({row['processes_at_or_above_1']} of {len(ratios)} at >= 1.0x)", flush=True)
    report = {"benchmark": "fresh_processes", "batch": args.batch, "threads": args.threads, "rounds": args.rounds,
              "processes": args.processes, "results": results, "wall_clock_s": time.perf_counter() - start,
              "machine": {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
                          "torch": torch.__version__}}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
