"""Benchmark suite: every llamavit family beside timm's nearest model, in one process.

For each pair (llamavit model, timm peer of the same width and FLOPs class), measured in interleaved
rounds (bench/throughput.py helpers; medians over the rounds where other processes were quiet):
- eval throughput (img/s, inference_mode) and train-step throughput (forward + backward + AdamW), and both
  per FLOP (the ratio times ours / the peer's FLOPs: how fast each does the same work);
- forward FLOPs per image (torch.utils.flop_counter) and the fraction of the fp32 matmul peak
  measured in the same process (a big torch.mm) that eval reaches;
- training memory per image: bytes of the activations autograd saves for backward (saved-tensor hooks,
  the part of training memory that grows with the batch), and the fixed parameter + gradient + AdamW
  state bytes;
- with --compile, the same throughputs of torch.compile'd models;
- with --profile, for every pair where ours misses a target (eval < 1.0x the peer or < 80 % of the
  matmul peak): torch.profiler's top ops (self CPU ms per forward) of both models, eager eval; where the
  train step is < 0.95x the peer: its forward / backward / AdamW split and top ops and backward functions.
Prints a markdown table; writes bench/results/suite.json (or --out).

    python bench/suite.py                 # named tiny/small sizes, batch 32, 2 threads (~15 min quiet)
    python bench/suite.py --compile       # also compiled (adds compile time, ~10 min)
    python bench/suite.py --quick         # common small size, batch 4, one round: a smoke run
"""
import argparse
import json
import os
import sys
import time
import warnings
from typing import Callable, List, Tuple

import timm
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import flop_counter, load_average, machine_info, matmul_peak, profile_ops, timed  # noqa: E402

import llamavit  # noqa: E402

# (group, llamavit model + kwargs, timm peer + kwargs)
NAMED: List[Tuple[str, Tuple[str, dict], Tuple[str, dict]]] = [
    ("iLLaMA-T", ("illama_tiny_patch16_224", {}), ("deit_tiny_patch16_224", {})),
    ("iLLaMA-T / EVA02-T", ("illama_tiny_patch16_224", {}), ("eva02_tiny_patch14_224", {})),
    ("iLLaMA-S", ("illama_small_patch16_224", {}), ("deit_small_patch16_224", {})),
    ("VisionLLaMA-S", ("visionllama_small_patch16_224", {}), ("vit_small_patch16_rope_224", {})),
    ("VisionLLaMA-S / ViT-S", ("visionllama_small_patch16_224", {}), ("vit_small_patch16_224", {})),
    ("Pyramid VisionLLaMA-S", ("visionllama_pyramid_small_224", {}), ("twins_svt_small", {})),
    ("AIM (D384, 12 blocks)", ("aim_600m_patch14_224", {"embed_dim": 384, "depth": 12, "num_heads": 6}),
     ("aimv2_large_patch14_224", {"embed_dim": 384, "depth": 12, "num_heads": 6})),
    ("ViT-T + SmolLM2 block", ("vit_smollm2_tiny_patch16_224", {"llm_path": None}), ("deit_tiny_patch16_224", {})),
]
SMALL = {"embed_dim": 96, "depth": 4, "num_heads": 3}
QUICK: List[Tuple[str, Tuple[str, dict], Tuple[str, dict]]] = [
    ("iLLaMA", ("illama_tiny_patch16_224", SMALL), ("deit_tiny_patch16_224", SMALL)),
    ("VisionLLaMA", ("visionllama_small_patch16_224", SMALL), ("vit_small_patch16_rope_224", SMALL)),
    ("Pyramid", ("visionllama_pyramid_small_224", {"embed_dims": (32, 64, 96, 128), "depths": (1, 1, 2, 1),
                                                   "num_heads": (1, 2, 3, 4)}),
     ("twins_svt_small", {"embed_dims": (32, 64, 96, 128), "depths": (1, 1, 2, 1), "num_heads": (1, 2, 3, 4)})),
    ("AIM", ("aim_600m_patch14_224", {**SMALL, "probe_layers": 2}), ("aimv2_large_patch14_224", SMALL)),
]


def build(name: str, kwargs: dict) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the untrained frozen LLM block warns; shapes are what count here
        kwargs = {"num_classes": 1000, **kwargs}   # some timm models default to a headless trunk
        if name in llamavit.list_models():
            return llamavit.create_model(name, **kwargs)
        return timm.create_model(name, **kwargs)


def flops_per_image(model: nn.Module) -> float:
    counter = flop_counter()
    with torch.inference_mode(), counter, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.eval()(torch.randn(1, 3, 224, 224))
    return counter.get_total_flops()


def memory_per_image(model: nn.Module, batch: int) -> dict:
    """Bytes of tensors autograd saves for backward, per image, and the fixed training-state bytes."""
    saved = {"bytes": 0, "seen": set()}

    def pack(t: torch.Tensor):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in saved["seen"]:   # several saved views of one storage count once
            saved["seen"].add(key)
            saved["bytes"] += key[1]
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(torch.randn(batch, 3, 224, 224))
    del out
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    return {"saved_activation_mb_per_img": saved["bytes"] / batch / 2 ** 20,
            "params_grads_adamw_mb": (4 * trainable + frozen) / 2 ** 20}


def train_step_fn(model: nn.Module, batch: int) -> Callable[[], None]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x, y = torch.randn(batch, 3, 224, 224), torch.randint(0, 1000, (batch,))
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
    step.parts = (opt, x, y, loss_fn)
    return step


def profile_train(model: nn.Module, batch: int, iters: int = 2, top: int = 10) -> dict:
    """Where one train step (B = batch, 224^2) goes: median forward / backward / AdamW ms, the top ops by self CPU
    ms per step, and the top backward functions by total ms per step (autograd nodes, their ops included)."""
    from torch.profiler import ProfilerActivity, profile
    step = train_step_fn(model, batch)
    opt, x, y, loss_fn = step.parts
    model.train()
    step()   # warm-up
    phases = {"forward": [], "backward": [], "optimizer": []}
    for _ in range(iters + 1):
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        loss = loss_fn(model(x), y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        for key, seconds in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):
            phases[key].append(seconds * 1e3)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    ops = sorted((e for e in events if not e.key.startswith("autograd::")), key=lambda e: -e.self_cpu_time_total)
    nodes = sorted((e for e in events if e.key.startswith("autograd::engine::evaluate_function: ")),
                   key=lambda e: -e.cpu_time_total)
    return {"phases_ms": {k: sorted(v)[len(v) // 2] for k, v in phases.items()},
            "top_ops": [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / iters,
                         "self_pct": 100.0 * e.self_cpu_time_total / total, "calls_per_step": e.count / iters}
                        for e in ops[:top]],
            "top_backward": [{"node": e.key.split(": ", 1)[1], "ms_per_step": e.cpu_time_total / 1e3 / iters,
                              "calls_per_step": e.count / iters} for e in nodes[:top]]}


EVAL_RATIO_TARGET, PEAK_FRACTION_TARGET, TRAIN_RATIO_TARGET = 1.0, 0.8, 0.95


def bench_pair(pair, batch: int, rounds: int, max_seconds: float, peak: float, compile_: bool,
               profile: bool = False) -> dict:
    group, (ours, ours_kw), (peer, peer_kw) = pair
    models = {ours: build(ours, ours_kw), peer: build(peer, peer_kw)}
    res = {"group": group, "ours": ours, "peer": peer, "models": {}}
    for name, m in models.items():
        res["models"][name] = {"params": sum(p.numel() for p in m.parameters()),
                               "gflop_per_img": flops_per_image(m) / 1e9, **memory_per_image(m, min(batch, 8))}
    variants = {"eager": models}
    if compile_:
        variants["compiled"] = {name: torch.compile(m) for name, m in models.items()}
    x = torch.randn(batch, 3, 224, 224)
    for variant, ms in variants.items():
        for m in ms.values():
            m.eval()
        with torch.inference_mode():
            ev = timed({n: (lambda m=m: m(x)) for n, m in ms.items()}, rounds, warmup=1, max_seconds=max_seconds)
        for m in ms.values():
            m.train()
        tr = timed({n: train_step_fn(m, batch) for n, m in ms.items()}, rounds, warmup=1, max_seconds=max_seconds)
        for n in ms:
            r = res["models"][n]
            r[f"{variant}_eval_img_s"] = batch / ev[n]["median_s"]
            r[f"{variant}_train_img_s"] = batch / tr[n]["median_s"]
            r[f"{variant}_eval_frac_matmul_peak"] = r[f"{variant}_eval_img_s"] * r["gflop_per_img"] / peak
            r[f"{variant}_timing"] = {"eval": ev[n], "train": tr[n]}
        o, p = res["models"][ours], res["models"][peer]
        res[f"{variant}_eval_ratio"] = o[f"{variant}_eval_img_s"] / p[f"{variant}_eval_img_s"]
        res[f"{variant}_train_ratio"] = o[f"{variant}_train_img_s"] / p[f"{variant}_train_img_s"]
        flops = o["gflop_per_img"] / p["gflop_per_img"]   # per FLOP: the ratio of work done per second
        res[f"{variant}_eval_per_flop_ratio"] = res[f"{variant}_eval_ratio"] * flops
        res[f"{variant}_train_per_flop_ratio"] = res[f"{variant}_train_ratio"] * flops
    o = res["models"][ours]
    res["missed_targets"] = [name for name, missed in (
        ("eval_ratio", res["eager_eval_ratio"] < EVAL_RATIO_TARGET),
        ("frac_matmul_peak", o["eager_eval_frac_matmul_peak"] < PEAK_FRACTION_TARGET),
        ("train_ratio", res["eager_train_ratio"] < TRAIN_RATIO_TARGET)) if missed]
    if profile and set(res["missed_targets"]) - {"train_ratio"}:
        for name, m in models.items():
            m.eval()
            res["models"][name]["profile_top_ops"] = profile_ops(m, x, iters=2, top=10)
    if profile and "train_ratio" in res["missed_targets"]:
        for name, m in models.items():
            res["models"][name]["profile_train"] = profile_train(m, batch)
    return res


def markdown(res: dict) -> str:
    variants = ["eager"] + (["compiled"] if res["compile"] else [])
    head = "| group | model | params | GFLOP/img | act. MB/img | " + " | ".join(
        f"{v} eval img/s | {v} % peak | {v} train img/s" for v in variants) + " | " + " | ".join(
        f"{v} {k} ratio" for v in variants for k in ("eval", "train")) + " | eager per-FLOP eval / train |"
    lines = [f"Suite on {res['machine']['cpu']}, {res['machine']['threads']} threads, batch {res['batch']}, "
             f"fp32; matmul peak {res['matmul_peak']['gflops_per_s']:.0f} GFLOP/s", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    for pair in res["pairs"]:
        for name in (pair["ours"], pair["peer"]):
            m = pair["models"][name]
            cells = [f"{m[f'{v}_eval_img_s']:.1f} | {100 * m[f'{v}_eval_frac_matmul_peak']:.0f}% | "
                     f"{m[f'{v}_train_img_s']:.1f}" for v in variants]
            ratios = " | ".join(f"{pair[f'{v}_{k}_ratio']:.2f}x" if name == pair["ours"] else ""
                               for v in variants for k in ("eval", "train"))
            lines.append(f"| {pair['group'] if name == pair['ours'] else ''} | {name} | {m['params'] / 1e6:.1f}M | "
                         f"{m['gflop_per_img']:.2f} | {m['saved_activation_mb_per_img']:.1f} | " + " | ".join(cells) +
                         f" | {ratios} | " + (f"{pair['eager_eval_per_flop_ratio']:.2f}x / "
                                              f"{pair['eager_train_per_flop_ratio']:.2f}x" if name == pair["ours"]
                                              else "") + " |")
    for pair in res["pairs"]:
        if pair.get("missed_targets"):
            lines.append(f"\n{pair['group']} misses {', '.join(pair['missed_targets'])}.")
        for name in (pair["ours"], pair["peer"]):
            ops = pair["models"][name].get("profile_top_ops")
            if ops:
                lines.append(f"- {name}: " + ", ".join(
                    f"{o['op']} {o['self_ms_per_fwd']:.0f} ms ({o['self_pct']:.0f}%, {o['calls_per_fwd']:.0f} calls)"
                    for o in ops[:8]))
            train = pair["models"][name].get("profile_train")
            if train:
                lines.append(f"- {name} train step: " + ", ".join(
                    f"{k} {v:.0f} ms" for k, v in train["phases_ms"].items()) + "; ops " + ", ".join(
                    f"{o['op']} {o['self_ms_per_step']:.0f} ms" for o in train["top_ops"][:6]) + "; backward "
                    + ", ".join(f"{b['node']} {b['ms_per_step']:.0f} ms" for b in train["top_backward"][:6]))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-seconds", type=float, default=60.0, help="extra time per pair to collect quiet rounds")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    ap.add_argument("--profile", action="store_true", help="profile the pairs where ours misses a target")
    ap.add_argument("--only", nargs="*", help="groups to run (substring match)")
    ap.add_argument("--quick", action="store_true", help="small common size, batch 4, 1 round: a smoke run")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "suite.json"))
    args = ap.parse_args(argv)
    pairs = QUICK if args.quick else NAMED
    if args.quick:
        args.batch, args.rounds, args.max_seconds = 4, 1, 0.0
    if args.only:
        pairs = [p for p in pairs if any(s.lower() in p[0].lower() for s in args.only)]
    torch.set_num_threads(args.threads)
    start = time.time()
    res = {"machine": machine_info(args.threads), "batch": args.batch, "compile": args.compile,
           "load_before": load_average(),
           "matmul_peak": matmul_peak(2048 if args.quick else 4096, max(args.rounds, 3), 0.0), "pairs": []}
    for pair in pairs:
        res["pairs"].append(bench_pair(pair, args.batch, args.rounds, args.max_seconds,
                                       res["matmul_peak"]["gflops_per_s"], args.compile, args.profile))
        done = res["pairs"][-1]
        print(f"{pair[0]} vs {pair[2][0]}: " + ", ".join(
            f"{v} eval {done[f'{v}_eval_ratio']:.2f}x train {done[f'{v}_train_ratio']:.2f}x"
            for v in ("eager", "compiled") if f"{v}_eval_ratio" in done), flush=True)
    res["load_after"], res["seconds"] = load_average(), time.time() - start
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(markdown(res))
    print(f"\nwritten {args.out} ({res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
