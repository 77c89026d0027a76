"""Eval throughput of llamavit now vs an earlier commit, side by side in ONE process.

The earlier commit's `llamavit/` is extracted with `git archive` into a temporary directory as the
package `llamavit_ref` (the package imports itself relatively, so it runs under another name). For each
model both versions are built from the same seed (the same weights: checked, and the outputs compared),
then timed in interleaved rounds (A B A B ...) under `torch.inference_mode`, fp32, eval, so drift and
other load hit both. A refactor must be no slower: the ratio ours / ref should be >= ~0.97 (noise).

    python bench/before_after.py --ref a6438de                   # iLLaMA-T (soft mask r=0) and VisionLLaMA-S
    python bench/before_after.py --ref HEAD~3 --out bench/results/before_after.json
"""
import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from machine import cpu_flags, cpu_model  # noqa: E402
from throughput import interleaved_times  # noqa: E402

MODELS = {"illama_tiny_patch16_224": {}, "visionllama_small_patch16_224": {}}


def extract(ref: str, root: str) -> str:
    """`git archive <ref> llamavit` unpacked as <root>/llamavit_ref; -> the resolved commit."""
    repo = os.path.dirname(HERE)
    commit = subprocess.run(["git", "-C", repo, "rev-parse", ref], check=True, capture_output=True,
                            text=True).stdout.strip()
    archive = subprocess.run(["git", "-C", repo, "archive", commit, "llamavit"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", root], input=archive, check=True)
    os.rename(os.path.join(root, "llamavit"), os.path.join(root, "llamavit_ref"))
    return commit


def build_pair(name: str, kwargs: dict, ref_registry, ours_create):
    """(ref model, our model) from the same seed, eval mode; iLLaMA at soft-mask rate 0 (causal)."""
    torch.manual_seed(0)
    ref = ref_registry._build(name, **kwargs).eval()
    torch.manual_seed(0)
    ours = ours_create(name, **kwargs).eval()
    for m in (ref, ours):
        if hasattr(m, "set_soft_mask_rate"):
            m.set_soft_mask_rate(0.0)
    return ref, ours


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ref", required=True, help="the earlier commit (anything `git rev-parse` takes)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--max-seconds", type=float, default=240.0, help="keep adding rounds until this many were quiet")
    ap.add_argument("--out", help="write the JSON result here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Overwriting")   # both packages register the same names in timm
    with tempfile.TemporaryDirectory() as root:
        commit = extract(args.ref, root)
        sys.path.insert(0, root)
        ref_registry = importlib.import_module("llamavit_ref.models.registry")
        import llamavit  # imported second: timm's registry then points at the current package
        x = torch.randn(args.batch, 3, args.img_size, args.img_size)
        result = {"ref": commit, "batch": args.batch, "img_size": args.img_size, "threads": args.threads,
                  "cpu": cpu_model(), "cpu_flags": cpu_flags(), "torch": torch.__version__, "models": {}}
        for name, kwargs in MODELS.items():
            ref, ours = build_pair(name, {"img_size": args.img_size, **kwargs}, ref_registry, llamavit.create_model)
            same = all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), ours.state_dict().values()))
            with torch.inference_mode():
                diff = (ref(x[:2]) - ours(x[:2])).abs().max().item()

                def run_ref(m=ref):
                    with torch.inference_mode():
                        m(x)

                def run_ours(m=ours):
                    with torch.inference_mode():
                        m(x)

                timing = interleaved_times({"ref": run_ref, "ours": run_ours}, args.rounds, args.warmup,
                                           args.max_seconds)
            quiet = [i for i, c in enumerate(timing["other_cores"]) if c is not None and c < 0.15]
            picks = quiet if len(quiet) >= 3 else range(len(timing["other_cores"]))
            med = {k: statistics.median(v[i] for i in picks) for k, v in timing["times"].items()}
            row = {"same_weights": same, "max_abs_logit_diff": diff, "rounds": len(timing["other_cores"]),
                   "quiet_rounds": len(quiet), "ref_img_per_s": args.batch / med["ref"],
                   "ours_img_per_s": args.batch / med["ours"], "ratio_ours_over_ref": med["ref"] / med["ours"]}
            result["models"][name] = row
            print(f"{name}: ref {row['ref_img_per_s']:.1f} img/s, ours {row['ours_img_per_s']:.1f} img/s, "
                  f"ratio {row['ratio_ours_over_ref']:.3f} ({row['quiet_rounds']}/{row['rounds']} quiet rounds; "
                  f"same weights {same}, max |logit diff| {diff:.1e})")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
