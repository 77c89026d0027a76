"""One prepared check for one GPU (H100/H200 class): five sections in at most 6 minutes, one table, one JSON.

1. parity: every classifier family (tiny, fp32, TF32 off) gives the same logits on CUDA as on the CPU (<= 1e-4);
2. soft_mask_backends: the library's soft-mask attention (the mirrored-keys SDPA form) against the explicit
   formula, values and gradients, on each SDPA backend (flash / efficient / math), fp32 and bf16;
3. train_throughput: bf16 training img/s and MFU of iLLaMA-B, VisionLLaMA-B and timm's ViT-B (DeiT-B's
   architecture) at batch 128, 224 px, torch.compile'd, against the device's bf16 matmul peak measured here;
4. distributed: `llamavit train` under torchrun with one process, DDP and FSDP2, a few steps on synthetic data;
5. fmnist: the configs/fmnist_illama.yaml recipe (bigger batch, bf16) trained for a few minutes, test top-1.

Each section is timed and fails on its own (the error is recorded and the next one runs); the JSON is rewritten
after every section, so a run stopped half-way keeps what it measured. `--dry-run` runs the same code on the CPU
at tiny sizes (the CPU is then both "devices" of section 1) and writes results/gpu_check_dry_run.json, so a
CPU run never replaces a GPU result.

    python bench/gpu_check.py                    # on the GPU: results/gpu_check.json
    python bench/gpu_check.py --dry-run          # on a CPU: ~40 s
    python bench/gpu_check.py --sections 1 2     # some sections only

Without the Debian package dataset-fashion-mnist, point LLAMAVIT_FASHION_MNIST at a folder holding its four .gz
files (section 5).
"""
import argparse
import copy
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)   # runs from a checkout without `pip install`: the checkout's llamavit

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from machine import bf16_native, cpu_model  # noqa: E402
from throughput import flop_counter, flops_per_image  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

import llamavit  # noqa: E402
from llamavit.layers import naive_soft_mask_attention, soft_mask_attention  # noqa: E402
from llamavit.train import TrainConfig, Trainer  # noqa: E402

TOTAL_BUDGET_S = 360.0   # the whole GPU run; section 5 trains for what is left of it (at most --minutes)
RESULTS = os.path.join(HERE, "results")


@dataclass
class Run:
    """What every section reads: the mode, the device under test and the run's deadline."""
    dry_run: bool
    device: torch.device
    deadline: float
    minutes: float

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def exact_fp32(enabled: bool) -> None:
    """TF32 off (enabled) for the fp32 comparisons, on again for training (cuBLAS / cuDNN on GPUs)."""
    torch.backends.cuda.matmul.allow_tf32 = not enabled
    torch.backends.cudnn.allow_tf32 = not enabled


def build(name: str, **kwargs) -> nn.Module:
    """A llamavit model, or timm's for a 'timm:' name; the untrained frozen-LLM block's warning silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name.startswith("timm:"):
            return timm.create_model(name[5:], pretrained=False, **kwargs)
        return llamavit.create_model(name, **kwargs)


# --- 1. CUDA vs CPU parity ------------------------------------------------------------------------------------------

PARITY_TOL = 1e-4
# family -> (registered name, tiny options, image size); small enough for a CPU, every part of the family in use
PARITY_FAMILIES: Dict[str, Tuple[str, dict, int]] = {
    "illama": ("illama_tiny_patch16_224", dict(patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                               soft_mask_rate=0.4), 32),
    "visionllama": ("visionllama_small_patch16_224", dict(patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                                          mlp_multiple_of=8, init_values=0.5), 32),
    "visionllama_pyramid": ("visionllama_pyramid_small_224", dict(
        embed_dims=(16, 24, 32, 48), depths=(2, 1, 1, 1), num_heads=(1, 2, 2, 3), wss=(4, 2, 2, 2),
        sr_ratios=(4, 2, 2, 1), mlp_multiple_of=8, init_values=0.5), 32),
    "aim": ("aim_600m_patch14_224", dict(patch_size=7, embed_dim=48, depth=2, num_heads=3, probe_layers=2), 28),
    "vit_llm": ("vit_llama_small_patch16_224", dict(patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                                    llm_path="random", llm_dim=32, llm_num_heads=4,
                                                    llm_ffn_hidden=64), 32),
}


def perturb(model: nn.Module, seed: int = 1) -> nn.Module:
    """Add small noise to the trainable weights: zero-initialised heads and layer scales would otherwise leave
    the logits independent of most of the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def section_parity(run: Run) -> dict:
    """Logits of each family's tiny model, fp32 eval, on the device vs on the CPU: max abs difference."""
    exact_fp32(True)
    families = {}
    for family, (name, options, size) in PARITY_FAMILIES.items():
        try:
            torch.manual_seed(0)
            model = perturb(build(name, img_size=size, num_classes=10, **options)).eval()
            x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(2))
            with torch.no_grad():
                ref = model(x)
                out = copy.deepcopy(model).to(run.device)(x.to(run.device)).cpu()
            diff = (out - ref).abs().max().item()
            families[family] = {"model": name, "max_abs_diff": diff, "max_abs_logit": ref.abs().max().item(),
                                "ok": diff <= PARITY_TOL}
        except Exception as e:   # one family's failure must not hide the others
            families[family] = {"model": name, "ok": False, "error": f"{type(e).__name__}: {e}"}
    bad = [f for f, r in families.items() if not r["ok"]]
    worst = max((r.get("max_abs_diff", math.inf) for r in families.values()), default=0.0)
    return {"status": "ok" if not bad else f"failed: {', '.join(bad)}", "tolerance": PARITY_TOL,
            "families": families, "summary": f"max abs diff {worst:.1e} over {len(families)} families",
            "target": f"<= {PARITY_TOL:g}: {'met' if not bad else 'not met'}"}


# --- 2. the soft mask on each SDPA backend --------------------------------------------------------------------------

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH}
# inputs of unit scale; bf16 rounding alone moves the explicit formula's outputs and gradients by ~1e-2
SOFT_MASK_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
SOFT_MASK_RATES = (0.0, 0.5, 1.0)


def value_and_grads(fn: Callable, q, k, v, grad_out) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """fn(q, k, v) and the gradients of <fn(q, k, v), grad_out> with respect to q, k and v."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in (q, k, v)]


def max_diff(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double().cpu() - ref).abs().max().item()


def soft_mask_case(run: Run, backend, dtype, rate: float, inputs: List[torch.Tensor], ref) -> dict:
    """One backend, dtype and rate: the library's SDPA form and the explicit formula in the same dtype (the
    rounding floor), each against the float64 explicit formula."""
    moved = [t.to(run.device, dtype) for t in inputs]
    floor_out, floor_grads = value_and_grads(partial(naive_soft_mask_attention, rate=rate), *moved)
    try:
        with sdpa_kernel(backend), warnings.catch_warnings():
            warnings.simplefilter("ignore")   # the backend's "why not" warnings: the error says it in one line
            out, grads = value_and_grads(partial(soft_mask_attention, rate=rate, impl="sdpa"), *moved)
    except RuntimeError as e:
        return {"supported": False, "reason": str(e).strip().splitlines()[0][:200]}
    value = max_diff(out, ref[0])
    grad = max(max_diff(g, r) for g, r in zip(grads, ref[1]))
    tol = SOFT_MASK_TOL[dtype]
    return {"supported": True, "value_diff": value, "grad_diff": grad, "ok": value <= tol and grad <= tol,
            "tolerance": tol, "explicit_same_dtype_value_diff": max_diff(floor_out, ref[0]),
            "explicit_same_dtype_grad_diff": max(max_diff(g, r) for g, r in zip(floor_grads, ref[1]))}


def section_soft_mask(run: Run) -> dict:
    """Values and gradients of soft_mask_attention(impl='sdpa') on each backend vs the explicit formula."""
    exact_fp32(True)
    shape = (1, 2, 33, 16) if run.dry_run else (2, 4, 197, 64)
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(shape, generator=g) for _ in range(4)]   # q, k, v and the output gradient
    refs = {rate: value_and_grads(partial(naive_soft_mask_attention, rate=rate), *(t.double() for t in inputs))
            for rate in SOFT_MASK_RATES}
    backends, problems, fp32_diffs = {}, [], [0.0]
    for name, backend in BACKENDS.items():
        if run.device.type == "cpu" and name != "math":   # flash and efficient are CUDA kernels
            backends[name] = "skipped: no GPU"
            continue
        cases = {}
        for dtype in (torch.float32, torch.bfloat16):
            for rate in SOFT_MASK_RATES:
                key = f"{str(dtype)[6:]} rate {rate:g}"
                cases[key] = case = soft_mask_case(run, backend, dtype, rate, inputs, refs[rate])
                if case["supported"] and not case["ok"]:
                    problems.append(f"{name} {key}")
                if case["supported"] and dtype == torch.float32:
                    fp32_diffs += [case["value_diff"], case["grad_diff"]]
        supported = [c for c in cases.values() if c["supported"]]
        backends[name] = {"ok": all(c["ok"] for c in supported), "supported_cases": len(supported),
                          "not_supported": [k for k, c in cases.items() if not c["supported"]],
                          "max_diff": max((max(c["value_diff"], c["grad_diff"]) for c in supported), default=None),
                          "cases": cases}
    ran = {n: b for n, b in backends.items() if isinstance(b, dict)}
    summary = ", ".join(f"{n} {b['supported_cases']}/{len(b['cases'])} cases" for n, b in ran.items())
    return {"status": "ok" if not problems else f"failed: {', '.join(problems)}", "shape_bhnd": list(shape),
            "rates": list(SOFT_MASK_RATES), "backends": backends,
            "summary": f"{summary}; fp32 max abs diff {max(fp32_diffs):.1e}",
            "target": f"fp32 <= {SOFT_MASK_TOL[torch.float32]:g}, bf16 <= {SOFT_MASK_TOL[torch.bfloat16]:g}: "
                      f"{'met' if not problems else 'not met'}"}


# --- 3. bf16 training throughput and MFU ----------------------------------------------------------------------------

THROUGHPUT_MODELS = {"iLLaMA-B": ("illama_base_patch16_224", {"soft_mask_rate": 0.0}),
                     "VisionLLaMA-B": ("visionllama_base_patch16_224", {}),
                     "DeiT-B": ("timm:vit_base_patch16_224", {})}
DRY_MODEL_SIZE = dict(embed_dim=64, depth=2, num_heads=2, patch_size=8)
MFU_TARGET, RATIO_TARGET = 0.5, 0.95


def matmul_peak_tflops(run: Run, dtype: torch.dtype, size: int, repeats: int = 8, calls: int = 10) -> float:
    """Dense matmul TFLOP/s of a size^3 product in `dtype`, best of `repeats` timings of `calls` products."""
    a = torch.randn(size, size, device=run.device, dtype=dtype)
    b = torch.randn(size, size, device=run.device, dtype=dtype)
    for _ in range(3):
        a @ b
    run.sync()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            a @ b
        run.sync()
        best = min(best, (time.perf_counter() - start) / calls)
    return 2 * size ** 3 / best / 1e12


def train_throughput(run: Run, name: str, kwargs: dict, batch: int, size: int, dtype, compile_: bool,
                     warmup: int, steps: int, peak_tflops: float) -> dict:
    """img/s of full training steps (forward, backward, AdamW) under autocast; MFU from 3x the forward FLOPs."""
    model = build(name, img_size=size, num_classes=1000, **kwargs)
    nominal = flops_per_image(model.eval(), size)   # on the CPU, as bench/suite.py counts
    model = model.to(run.device).train()
    counter = flop_counter()   # what the device's kernels execute (iLLaMA's soft mask: 2N mirrored keys)
    with counter, torch.no_grad(), torch.autocast(run.device.type, dtype=dtype, enabled=dtype != torch.float32):
        model(torch.randn(1, 3, size, size, device=run.device))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=run.device.type == "cuda")
    step_model = torch.compile(model) if compile_ else model
    x = torch.randn(batch, 3, size, size, device=run.device)
    y = torch.randint(0, 1000, (batch,), device=run.device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(run.device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = nn.functional.cross_entropy(step_model(x), y)
        loss.backward()
        opt.step()

    start = time.perf_counter()
    for _ in range(warmup):   # compilation, autotuning
        step()
    run.sync()
    warmup_s = time.perf_counter() - start
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        run.sync()
        times.append(time.perf_counter() - start)
    median = sorted(times)[len(times) // 2]
    result = {"model": name, "img_per_s": batch / median, "step_ms_median": 1000 * median,
              "fwd_gflop_per_img": nominal / 1e9, "executed_fwd_gflop_per_img": counter.get_total_flops() / 1e9,
              "mfu": 3 * nominal * batch / median / (peak_tflops * 1e12), "warmup_s": warmup_s,
              "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    if run.device.type == "cuda":
        result["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return result


def section_throughput(run: Run) -> dict:
    """Training img/s and MFU of the three base models, and the targets against DeiT-B."""
    exact_fp32(False)
    if run.dry_run:
        dtype = torch.bfloat16 if bf16_native() else torch.float32
        sizes = dict(batch=4, size=32, compile_=False, warmup=1, steps=3)
        peak = matmul_peak_tflops(run, dtype, 512, repeats=3, calls=2)
    else:
        dtype = torch.bfloat16
        sizes = dict(batch=128, size=224, compile_=True, warmup=4, steps=20)
        peak = matmul_peak_tflops(run, dtype, 8192)
    models, errors = {}, []
    for label, (name, kwargs) in THROUGHPUT_MODELS.items():
        try:
            models[label] = train_throughput(run, name, {**kwargs, **(DRY_MODEL_SIZE if run.dry_run else {})},
                                             dtype=dtype, peak_tflops=peak, **sizes)
        except Exception as e:   # a compile failure of one model must not lose the others
            models[label] = {"model": name, "error": f"{type(e).__name__}: {e}"}
            errors.append(label)
        finally:
            torch._dynamo.reset()
            if run.device.type == "cuda":
                torch.cuda.empty_cache()
    targets, ratios = {}, {}
    for ours in ("iLLaMA-B", "VisionLLaMA-B"):
        if "img_per_s" in models[ours]:
            targets[f"{ours} MFU >= {MFU_TARGET:.0%}"] = "met" if models[ours]["mfu"] >= MFU_TARGET else "not met"
        if "img_per_s" in models[ours] and "img_per_s" in models["DeiT-B"]:
            ratios[f"{ours} / DeiT-B"] = models[ours]["img_per_s"] / models["DeiT-B"]["img_per_s"]
            targets[f"{ours} >= {RATIO_TARGET}x DeiT-B"] = "met" if ratios[f"{ours} / DeiT-B"] >= RATIO_TARGET \
                else "not met"
    summary = ", ".join(f"{label} {m['img_per_s']:.0f} img/s MFU {m['mfu']:.0%}" for label, m in models.items()
                        if "img_per_s" in m)
    summary += "".join(f"; {k} {v:.2f}x" for k, v in ratios.items())
    return {"status": "ok" if not errors else f"failed: {', '.join(errors)}", "dtype": str(dtype)[6:],
            "matmul_peak_tflops": peak, **{k: v for k, v in sizes.items() if k != "compile_"},
            "compile": sizes["compile_"], "models": models, "ratios": ratios, "targets": targets,
            "summary": f"peak {peak:.1f} TFLOP/s; {summary}",
            "target": ", ".join(f"{k}: {v}" for k, v in targets.items())}


# --- 4. DDP and FSDP2 under torchrun, one process -------------------------------------------------------------------

def torchrun_train(run: Run, output: str, extra: List[str]) -> dict:
    """`llamavit train` of a tiny iLLaMA (soft mask decaying) on synthetic data under torchrun, one process."""
    if run.dry_run:
        model = ["patch_size=8", "embed_dim=32", "depth=2", "num_heads=2"]
        sizes = ["--img-size", "32", "--batch-size", "16", "--epochs", "1", "--max-steps", "3", "--device", "cpu"]
    else:
        model = ["patch_size=8", "embed_dim=192", "depth=4", "num_heads=3"]
        sizes = ["--img-size", "64", "--batch-size", "32", "--epochs", "5", "--max-steps", "10", "--device", "cuda",
                 "--amp"]
    command = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "llamavit.cli", "train",
               "--model", "illama_tiny_patch16_224", "--model-kwargs", *model, *sizes, "--data", "synthetic",
               "--val-subset", "32", "--log-every", "1", "--no-progress", "--soft-mask", "linear",
               "--soft-mask-epochs", "1", "--warmup-epochs", "0", "--hflip", "0", "--label-smoothing", "0",
               "--output", output, *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])),
           "PYTHONWARNINGS": "ignore", **({"OMP_NUM_THREADS": "1"} if run.dry_run else {})}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env, timeout=240)
    log = os.path.join(output, "log.jsonl")
    records = [json.loads(line) for line in open(log)] if os.path.isfile(log) else []
    losses = [r["loss"] for r in records if "loss" in r]   # the evaluation records hold val_* only
    result = {"command": "torchrun " + " ".join(command[2:]), "returncode": proc.returncode,
              "seconds": time.perf_counter() - start, "steps": len(losses),
              "final_loss": losses[-1] if losses else None,
              "ok": proc.returncode == 0 and bool(losses) and math.isfinite(losses[-1])}
    if not result["ok"]:
        result["output_tail"] = (proc.stdout + proc.stderr)[-2000:]
    return result


def section_distributed(run: Run) -> dict:
    """The DDP and the FSDP2 run from the same seed: both must finish; their losses should agree."""
    tmp = tempfile.mkdtemp(prefix="gpu_check_dist_")
    try:
        runs = {label: torchrun_train(run, os.path.join(tmp, label), extra)
                for label, extra in (("ddp", []), ("fsdp", ["--fsdp"]))}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    bad = [label for label, r in runs.items() if not r["ok"]]
    diff = abs(runs["ddp"]["final_loss"] - runs["fsdp"]["final_loss"]) if not bad else None
    summary = ", ".join(f"{label} loss {r['final_loss']:.4f} in {r['seconds']:.0f} s" if r["ok"] else f"{label} failed"
                        for label, r in runs.items())
    return {"status": "ok" if not bad else f"failed: {', '.join(bad)}", "runs": runs,
            "final_loss_abs_diff": diff, "summary": summary,
            "target": "both finish" + (f", losses differ by {diff:.1e}" if diff is not None else "")}


# --- 5. Fashion-MNIST in a few minutes ------------------------------------------------------------------------------

FMNIST_CONFIG = os.path.join(ROOT, "configs", "fmnist_illama.yaml")
FMNIST_TARGET = 94.0
FMNIST_BATCH = 512   # 4x the recipe's: the 675k-parameter model is launch-bound on a GPU at 128


class TimedTrainer(Trainer):
    """The supervised Trainer, stopped (with a checkpoint) after `limit_s` seconds of training."""

    def __init__(self, cfg: TrainConfig, limit_s: float):
        self.limit_s = limit_s
        super().__init__(cfg)

    def time_limit_s(self) -> float:
        return self.limit_s


def fmnist_config(run: Run, output: str, **overrides) -> TrainConfig:
    """The recipe of configs/fmnist_illama.yaml on the device: on a GPU at batch 512 (learning rate scaled by
    the square root of the batch ratio) with 8 loader workers; tiny subsets on a dry run."""
    recipe = TrainConfig.from_yaml(FMNIST_CONFIG)
    if run.dry_run:
        sizes = dict(batch_size=64, train_subset=256, val_subset=256, num_workers=0, amp=bf16_native(), device="cpu")
    else:
        sizes = dict(batch_size=FMNIST_BATCH, lr=recipe.lr * math.sqrt(FMNIST_BATCH / recipe.batch_size),
                     num_workers=8, amp=True, device="cuda")
    return TrainConfig.from_dict({**recipe.to_dict(), **sizes, "output": output, "progress": False, **overrides})


def section_fmnist(run: Run) -> dict:
    """Calibrate img/s on a few steps, size the epochs (and so the cosine schedule) to the minutes left, train
    under a time limit, then report test top-1 on the 10,000 test images (a subset on a dry run)."""
    exact_fp32(False)
    start = time.perf_counter()
    train_s = 60 * run.minutes if run.dry_run else max(60.0, min(60 * run.minutes, run.deadline - start - 45))
    tmp = tempfile.mkdtemp(prefix="gpu_check_fmnist_")
    try:
        calib_steps = 2 if run.dry_run else 40
        calib = Trainer(fmnist_config(run, os.path.join(tmp, "calibration"), max_steps=calib_steps,
                                      log_every=max(1, calib_steps // 4)))
        calib.fit()
        # the first window pays for the loader's workers and the kernels' first calls
        rates = [r["img_per_s"] for r in calib.history if "img_per_s" in r][1:]
        img_per_s = sorted(rates)[len(rates) // 2]
        cfg = fmnist_config(run, os.path.join(tmp, "run"))
        steps_per_epoch = calib.steps_per_epoch
        # a 10 % margin, and a second per epoch for its end (a new loader, a checkpoint)
        epoch_s = 1.1 * steps_per_epoch * cfg.batch_size / img_per_s + 1.0
        epochs = 1 if run.dry_run else max(1, int(train_s // epoch_s))
        cfg = TrainConfig.from_dict({**cfg.to_dict(), "epochs": epochs, "eval_every": epochs,
                                     "soft_mask_epochs": min(cfg.soft_mask_epochs, epochs / 4)})
        trainer = TimedTrainer(cfg, train_s)
        summary = trainer.fit()
        metrics = trainer.last_eval or trainer.evaluate()   # a time-limited stop skips the last evaluation
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    top1 = metrics["val_top1"]
    met = top1 >= FMNIST_TARGET
    return {"status": "ok", "test_top1": top1, "test_loss": metrics.get("val_loss"),
            "test_images": len(trainer.val_set), "calibrated_img_per_s": img_per_s, "epochs_planned": epochs,
            "epochs_done": summary["epochs"], "train_seconds": summary["train_seconds"], "train_budget_s": train_s,
            "final_train_loss": summary["final_train_loss"], "config": cfg.to_dict(),
            "summary": f"top-1 {top1:.2f}% after {summary['epochs']:.1f} epochs in {summary['train_seconds']:.0f} s",
            "target": f">= {FMNIST_TARGET:g}%: {'met' if met else 'not met'}"}


# --- the run ---------------------------------------------------------------------------------------------------------

SECTIONS = {1: ("parity", section_parity), 2: ("soft_mask_backends", section_soft_mask),
            3: ("train_throughput", section_throughput), 4: ("distributed", section_distributed),
            5: ("fmnist", section_fmnist)}


def table(res: dict) -> str:
    """The markdown summary: one row per section."""
    lines = [f"gpu_check on {res['device']} (torch {res['torch']} built for CUDA {res['cuda']}"
             f"{', DRY RUN: tiny sizes on the CPU, targets not meaningful' if res['dry_run'] else ''}), "
             f"{res.get('seconds', 0):.0f} s", "", "| section | status | s | key numbers | target |",
             "|---|---|---|---|---|"]
    for name, s in res["sections"].items():
        cells = [f"{s['section']}. {name}", s["status"][:80], f"{s['seconds']:.0f}", s.get("summary", ""),
                 s.get("target", "")]
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: the same code path, no GPU")
    ap.add_argument("--sections", type=int, nargs="+", choices=sorted(SECTIONS), default=sorted(SECTIONS))
    ap.add_argument("--output", help="JSON path (default results/gpu_check.json, results/gpu_check_dry_run.json "
                                     "with --dry-run)")
    ap.add_argument("--minutes", type=float, default=3.0, help="section 5's training time at most")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --dry-run (tiny sizes on the CPU)")
    if args.dry_run:
        torch.set_num_threads(1)   # tiny sizes: a second thread costs more than it saves, more so on a busy machine
    output = args.output or os.path.join(RESULTS, "gpu_check_dry_run.json" if args.dry_run else "gpu_check.json")
    start = time.perf_counter()
    run = Run(args.dry_run, torch.device("cpu" if args.dry_run else "cuda"), start + TOTAL_BUDGET_S, args.minutes)
    res = {"device": cpu_model() if args.dry_run else torch.cuda.get_device_name(), "dry_run": args.dry_run,
           "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "timm": timm.__version__, "llamavit": llamavit.__version__, "python": platform.python_version(),
           "started": time.strftime("%Y-%m-%d %H:%M:%S"), "sections": {}}
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    for number in sorted(set(args.sections)):
        name, section = SECTIONS[number]
        print(f"[{number}] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            result = section(run)
        except Exception as e:   # record and go on: the other sections still run
            result = {"status": f"error: {type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        res["sections"][name] = {"section": number, **result, "seconds": time.perf_counter() - t0}
        print(f"[{number}] {name}: {res['sections'][name]['status']} "
              f"({res['sections'][name]['seconds']:.0f} s)", flush=True)
        res["seconds"] = time.perf_counter() - start
        with open(output, "w") as f:   # after every section: a run stopped half-way keeps what it measured
            json.dump(res, f, indent=1)
    print(table(res))
    print(f"\nwritten {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
