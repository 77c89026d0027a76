"""CPU throughput benchmark: iLLaMA-T vs timm DeiT-T, and fused vs naive soft-mask attention.

One process, fp32, eval mode, `torch.inference_mode` (except the attention training timing),
`torch.set_num_threads(--threads)`. Everything that is compared is timed in interleaved rounds
(A B A B ...) so that drift and other load on a shared machine hit both sides equally; medians are
reported. Sections:

1. matmul peak: median of `torch.mm` 4096x4096 fp32 -> GFLOP/s;
2. model throughput at --batch / --img-size, random weights: llamavit `illama_tiny_patch16_224`
   (soft mask rate 0 = causal, the end-of-training state) vs timm `deit_tiny_patch16_224`, with FLOPs
   per image (torch.utils.flop_counter) and the fraction of the measured matmul peak;
3. soft-mask attention forward at 197 and 577 tokens, rates 0.0 and 0.5: the mirrored-keys SDPA form
   ("fused"), the LSE form (two flash calls), the library's explicit form ("naive",
   `naive_soft_mask_attention`: buffers reused in place without autograd) and the official code's op
   sequence ("official"), with the max abs differences of the outputs;
4. soft-mask attention forward+backward (training) at 197 tokens;
5. (when iLLaMA-T is below --target x DeiT-T, or with --profile) where the time goes: torch.profiler
   op tables for both models, per-component timings at the model's shapes, and model variants.

Usage:
    python bench/throughput.py                 # full run (~1.5 min on a quiet 2-core machine, <= ~5 min loaded)
    python bench/throughput.py --quick         # ~30 s smoke run
    python bench/throughput.py --out bench/results/throughput.json
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List

import timm
import torch
import torch.nn.functional as F
from machine import cpu_flags, cpu_model
from torch.utils.flop_counter import FlopCounterMode

import llamavit
from llamavit.layers import apply_rope, naive_soft_mask_attention, soft_mask_attention

OURS = "illama_tiny_patch16_224"
PEER = "deit_tiny_patch16_224"
aten = torch.ops.aten


# --- machine and timing helpers -----------------------------------------------------------------

def machine_info(threads: int) -> dict:
    """CPU, core count, thread setting and library versions."""
    return {
        "cpu": cpu_model(), "cpu_flags": cpu_flags(), "logical_cpus": os.cpu_count(), "threads": threads,
        "torch": torch.__version__, "timm": timm.__version__, "llamavit": llamavit.__version__,
        "python": platform.python_version(),
    }


def load_average() -> List[float]:
    """os.getloadavg() rounded; 1/5/15-minute run-queue averages."""
    return [round(v, 2) for v in os.getloadavg()]


QUIET_CORES = 0.15  # a round counts as quiet when other processes used less than this many cores


class OtherLoad:
    """CPU used by OTHER processes (in cores) between two calls, from /proc/stat and /proc/self/stat.

    Busy ticks of the whole machine minus this process's own ticks (all its threads), over the wall
    time. Returns None where /proc is not available.
    """

    def __init__(self):
        self._ticks_per_s = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._last = self._sample()

    @staticmethod
    def _read():
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        busy = sum(fields) - fields[3] - (fields[4] if len(fields) > 4 else 0)  # minus idle, iowait
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        return busy, int(own[11]) + int(own[12])  # utime, stime (fields 14, 15)

    def _sample(self):
        try:
            return (time.perf_counter(), *self._read())
        except (OSError, ValueError, IndexError):
            return None

    def cores_since_last(self) -> float:
        """Other processes' CPU use since the previous call, in cores (None if unknown)."""
        now, last = self._sample(), self._last
        self._last = now
        if now is None or last is None or now[0] <= last[0]:
            return None
        other_ticks = (now[1] - last[1]) - (now[2] - last[2])
        return max(other_ticks, 0) / self._ticks_per_s / (now[0] - last[0])


def interleaved_times(fns: Dict[str, Callable[[], object]], rounds: int, warmup: int,
                      max_seconds: float = 0.0) -> dict:
    """Run every fn `warmup` times, then rounds of one call each in turn (A B A B ...).

    At least `rounds` rounds; while fewer than `rounds` of them were quiet (other processes below
    QUIET_CORES) more rounds are added until `max_seconds` have passed. Returns
    {"times": {name: [seconds per call]}, "other_cores": [per round]}.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times, other = {name: [] for name in fns}, []
    load, start = OtherLoad(), time.perf_counter()
    while True:
        load.cores_since_last()
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        other.append(load.cores_since_last())
        quiet = sum(1 for c in other if c is not None and c < QUIET_CORES)
        if len(other) >= rounds and (quiet >= rounds or time.perf_counter() - start >= max_seconds):
            return {"times": times, "other_cores": other}


def summary(samples: List[float], other_cores: List[float], min_quiet: int = 3) -> dict:
    """Median over the quiet rounds when there are at least `min_quiet` of them, else over all rounds.

    Also reports the all-rounds median, min, max, counts and the median other-process load.
    """
    quiet = [t for t, c in zip(samples, other_cores) if c is not None and c < QUIET_CORES]
    use_quiet = len(quiet) >= min_quiet
    known = [c for c in other_cores if c is not None]
    return {"median_s": statistics.median(quiet if use_quiet else samples),
            "median_from": "quiet" if use_quiet else "all",
            "median_all_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples),
            "n": len(samples), "n_quiet": len(quiet),
            "other_cores_median": statistics.median(known) if known else None}


def timed(fns: Dict[str, Callable[[], object]], rounds: int, warmup: int, max_seconds: float = 0.0) -> dict:
    """interleaved_times + summary: {name: summary dict} for every fn."""
    res = interleaved_times(fns, rounds, warmup, max_seconds)
    return {name: summary(samples, res["other_cores"]) for name, samples in res["times"].items()}


# --- 1. matmul peak -----------------------------------------------------------------------------

def matmul_peak(size: int, rounds: int, max_seconds: float) -> dict:
    """GFLOP/s of `torch.mm` size x size fp32 from the median time (2 * size^3 FLOPs per call)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    s = timed({"mm": lambda: torch.mm(a, b)}, rounds=rounds, warmup=1, max_seconds=max_seconds)["mm"]
    return {"size": size, "gflops_per_s": 2 * size ** 3 / s["median_s"] / 1e9, **s}


# --- 2. models ----------------------------------------------------------------------------------

def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """FLOPs of one CPU flash SDPA call: QK^T and PV, 2 * B * H * Nq * Nk * (d + dv)."""
    b, h, nq, d = query_shape
    nk, dv = key_shape[-2], value_shape[-1]
    return 2 * b * h * nq * nk * (d + dv)


def _sdpa_cpu_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """FLOPs of the CPU flash SDPA backward: dV, dP, dQ, dK, each one (Nq x Nk x d) product."""
    b, h, nq, d = query_shape
    nk, dv = key_shape[-2], value_shape[-1]
    return 2 * b * h * nq * nk * (2 * d + 2 * dv)


def flop_counter() -> FlopCounterMode:
    """FlopCounterMode that also counts the CPU flash-attention kernels (torch does not register them)."""
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_cpu_backward_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


def flops_per_image(model: torch.nn.Module, img_size: int) -> int:
    """Forward FLOPs for one image (multiply-add = 2 FLOPs), as executed by the kernels called."""
    x = torch.randn(1, 3, img_size, img_size)
    counter = flop_counter()
    with torch.inference_mode(), counter:
        model(x)
    return counter.get_total_flops()


def build_models(img_size: int) -> Dict[str, torch.nn.Module]:
    """Random-weight iLLaMA-T (soft mask rate 0 = causal) and timm DeiT-T, eval mode."""
    ours = llamavit.create_model(OURS, img_size=img_size).eval()
    ours.set_soft_mask_rate(0.0)
    peer = timm.create_model(PEER, pretrained=False, img_size=img_size).eval()
    return {OURS: ours, PEER: peer}


def model_flops(models: Dict[str, torch.nn.Module], img_size: int) -> Dict[str, dict]:
    """Executed FLOPs per image for each model, and for iLLaMA also the nominal model FLOPs.

    Nominal = the same network with N keys per query (rate 1, plain SDPA): what the architecture
    needs. Executed = what the fused soft mask runs at rate 0 (2N mirrored keys).
    """
    out = {name: {"executed_gflop_per_img": flops_per_image(m, img_size) / 1e9} for name, m in models.items()}
    out[PEER]["nominal_gflop_per_img"] = out[PEER]["executed_gflop_per_img"]
    ours = models[OURS]
    ours.set_soft_mask_rate(1.0)
    out[OURS]["nominal_gflop_per_img"] = flops_per_image(ours, img_size) / 1e9
    ours.set_soft_mask_rate(0.0)
    return out


def bench_models(models: Dict[str, torch.nn.Module], batch: int, img_size: int, rounds: int, warmup: int,
                 max_seconds: float, peak_gflops: float, flops: Dict[str, dict]) -> dict:
    """Interleaved eval throughput (img/s) of the models, ratio ours/peer and fraction of matmul peak."""
    x = torch.randn(batch, 3, img_size, img_size)
    with torch.inference_mode():
        stats = timed({name: (lambda m=m: m(x)) for name, m in models.items()}, rounds, warmup, max_seconds)
    result = {"batch": batch, "img_size": img_size, "min_rounds": rounds, "warmup": warmup, "models": {}}
    for name, s in stats.items():
        img_s = batch / s["median_s"]
        f = flops[name]
        result["models"][name] = {
            "img_per_s": img_s, "img_per_s_all_rounds": batch / s["median_all_s"], **s, **f,
            "frac_of_matmul_peak_nominal": img_s * f["nominal_gflop_per_img"] / peak_gflops,
            "frac_of_matmul_peak_executed": img_s * f["executed_gflop_per_img"] / peak_gflops,
        }
    ours, peer = result["models"][OURS], result["models"][PEER]
    result["ratio_ours_over_peer"] = ours["img_per_s"] / peer["img_per_s"]
    result["ratio_ours_over_peer_all_rounds"] = ours["img_per_s_all_rounds"] / peer["img_per_s_all_rounds"]
    return result


# --- 3./4. attention ----------------------------------------------------------------------------

def attention_inputs(batch: int, heads: int, tokens: int, head_dim: int, requires_grad: bool = False):
    """Random q, k, v of shape (batch, heads, tokens, head_dim), fp32."""
    return [torch.randn(batch, heads, tokens, head_dim, requires_grad=requires_grad) for _ in range(3)]


def _attention_result(tokens: int, rate: float, stats: dict, diff_key: str, diff: float, tol: float) -> dict:
    """One row of the attention tables."""
    return {"tokens": tokens, "rate": rate, "fused": stats["fused"], "naive": stats["naive"],
            "ratio_naive_over_fused": stats["naive"]["median_s"] / stats["fused"]["median_s"],
            diff_key: diff, "within_tol": diff <= tol}


def bench_attention_forward(batch: int, heads: int, head_dim: int, tokens: int, rate: float, rounds: int,
                            warmup: int, max_seconds: float, tol: float) -> dict:
    """Fused vs naive soft-mask attention forward: medians, naive/fused ratio, max abs difference."""
    q, k, v = attention_inputs(batch, heads, tokens, head_dim)
    lse = lambda: soft_mask_attention(q, k, v, rate, impl="lse")   # noqa: E731
    mask = official_mask(tokens, rate)
    with torch.inference_mode():
        naive = naive_soft_mask_attention(q, k, v, rate)
        diff = (fused_soft_mask(q, k, v, rate) - naive).abs().max().item()
        lse_diff = (lse() - naive).abs().max().item()
        official_diff = (official_form_soft_mask(q, k, v, mask) - naive).abs().max().item()
        stats = timed({"fused": lambda: fused_soft_mask(q, k, v, rate), "lse": lse,
                       "naive": lambda: naive_soft_mask_attention(q, k, v, rate),
                       "official": lambda: official_form_soft_mask(q, k, v, mask)}, rounds, warmup, max_seconds)
    row = _attention_result(tokens, rate, stats, "max_abs_diff", diff, tol)
    # the inference-only LSE form (two flash calls on N keys), which 'auto' takes past 1024 tokens
    row.update(lse=stats["lse"], ratio_naive_over_lse=stats["naive"]["median_s"] / stats["lse"]["median_s"],
               lse_max_abs_diff=lse_diff, within_tol=row["within_tol"] and lse_diff <= tol and official_diff <= tol)
    # "naive" above is the library's explicit form (q scaled, buffers reused in place); the official
    # code's own op sequence allocates a buffer per step
    row.update(official=stats["official"], official_max_abs_diff=official_diff,
               ratio_official_over_fused=stats["official"]["median_s"] / stats["fused"]["median_s"],
               ratio_official_over_lse=stats["official"]["median_s"] / stats["lse"]["median_s"],
               ratio_official_over_naive=stats["official"]["median_s"] / stats["naive"]["median_s"])
    return row


def official_mask(tokens: int, rate: float) -> torch.Tensor:
    """M = r * 1 + (1 - r) * tril(1), (N, N), built once as the official model does."""
    return rate + (1 - rate) * torch.ones(tokens, tokens).tril()


def official_form_soft_mask(q, k, v, mask: torch.Tensor) -> torch.Tensor:
    """The official iLLaMA attention's op sequence: (q k^T) * scale, softmax, * M, @ v (DESIGN 3)."""
    attn = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return (attn.softmax(dim=-1) * mask) @ v


def fused_soft_mask(q, k, v, rate: float) -> torch.Tensor:
    """The fused (mirrored-keys SDPA) form, forced: the library's 'auto' picks the explicit formula on
    CPU at short sequences, which would make this comparison naive against naive."""
    return soft_mask_attention(q, k, v, rate, impl="sdpa")


def _train_step(fn: Callable, q, k, v, rate: float, grad: torch.Tensor) -> None:
    """One forward+backward of an attention fn; gradients are dropped afterwards."""
    fn(q, k, v, rate).backward(grad)
    for t in (q, k, v):
        t.grad = None


def _grads(fn: Callable, q, k, v, rate: float, grad: torch.Tensor) -> List[torch.Tensor]:
    """Gradients of q, k, v for one forward+backward of fn."""
    fn(q, k, v, rate).backward(grad)
    out = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    return out


def bench_attention_train(batch: int, heads: int, head_dim: int, tokens: int, rate: float, rounds: int,
                          warmup: int, max_seconds: float, tol: float) -> dict:
    """Fused vs naive soft-mask attention forward+backward: medians, ratio, max abs gradient difference."""
    q, k, v = attention_inputs(batch, heads, tokens, head_dim, requires_grad=True)
    grad = torch.randn(batch, heads, tokens, head_dim)
    fused_g = _grads(fused_soft_mask, q, k, v, rate, grad)
    naive_g = _grads(naive_soft_mask_attention, q, k, v, rate, grad)
    diff = max((a - b).abs().max().item() for a, b in zip(fused_g, naive_g))
    stats = timed({"fused": lambda: _train_step(fused_soft_mask, q, k, v, rate, grad),
                   "naive": lambda: _train_step(naive_soft_mask_attention, q, k, v, rate, grad)},
                  rounds, warmup, max_seconds)
    return _attention_result(tokens, rate, stats, "max_abs_grad_diff", diff, tol)


# --- 5. where the time goes ---------------------------------------------------------------------

def profile_ops(model: torch.nn.Module, x: torch.Tensor, iters: int, top: int) -> List[dict]:
    """torch.profiler over `iters` forwards: the top ops by self CPU time (ms per forward)."""
    from torch.profiler import ProfilerActivity, profile
    with torch.inference_mode():
        model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(iters):
                model(x)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "self_ms_per_fwd": e.self_cpu_time_total / 1e3 / iters,
             "self_pct": 100.0 * e.self_cpu_time_total / total, "calls_per_fwd": e.count / iters}
            for e in events[:top]]


def rope_complex(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Benchmark-only alternative: interleaved RoPE as ONE complex multiply (the official code's form)."""
    return torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * freqs).flatten(-2)


def rms_norm_vector_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Benchmark-only alternative RMSNorm (fp32): one reduction (vector_norm) + two elementwise passes."""
    inv = torch.linalg.vector_norm(x, dim=-1, keepdim=True).mul_(x.shape[-1] ** -0.5).square_().add_(eps).rsqrt_()
    return x * inv * weight


def component_fns(batch: int, tokens: int, dim: int, heads: int, model: torch.nn.Module) -> Dict[str, Callable]:
    """Callables for each piece of one block at the model's shapes (block 0 of iLLaMA-T), with the
    DeiT counterpart and cheaper equivalent forms of our pieces (not used by the library)."""
    blk, head_dim = model.blocks[0], dim // heads
    x = torch.randn(batch, tokens, dim)
    qkv = torch.randn(batch, tokens, 3 * dim).view(batch, tokens, -1, head_dim).transpose(1, 2)
    q, k, v = qkv.split([heads, heads, heads], dim=1)
    cos, sin = model.rope(tokens)
    freqs = torch.complex(cos, sin)
    ln_w, ln_b = torch.ones(dim), torch.zeros(dim)
    w1, w2 = 0.02 * torch.randn(4 * dim, dim), 0.02 * torch.randn(dim, 4 * dim)
    return {
        "rmsnorm, ours (F.rms_norm then * weight)": lambda: blk.norm1(x),
        "rmsnorm, alt: vector_norm form": lambda: rms_norm_vector_norm(x, blk.norm1.weight, 1e-6),
        "layernorm, deit (F.layer_norm)": lambda: F.layer_norm(x, (dim,), ln_w, ln_b, 1e-6),
        "rope q and k, ours (apply_rope x2)": lambda: (apply_rope(q, cos, sin), apply_rope(k, cos, sin)),
        "rope q and k, alt: one apply_rope on qk": lambda: apply_rope(qkv[:, :2 * heads], cos, sin),
        "rope q and k, alt: one complex multiply": lambda: rope_complex(qkv[:, :2 * heads], freqs),
        "attention r=0, ours (2N mirrored keys + bias)": lambda: fused_soft_mask(q, k, v, 0.0),
        "attention r=0, LSE form (causal + full SDPA)": lambda: soft_mask_attention(q, k, v, 0.0, impl="lse"),
        "attention r=0, explicit (library)": lambda: naive_soft_mask_attention(q, k, v, 0.0),
        "attention, deit (SDPA, N keys)": lambda: F.scaled_dot_product_attention(q, k, v),
        "attention, is_causal SDPA (renormalised)": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "mlp, ours (swiglu 192->2x512->192)": lambda: blk.mlp(x),
        "mlp, deit (gelu 192->768->192)": lambda: F.linear(F.gelu(F.linear(x, w1)), w2),
    }


def check_alternatives(batch: int, tokens: int, dim: int, heads: int, model: torch.nn.Module) -> dict:
    """Max abs difference of each benchmark-only alternative from the library's form."""
    head_dim = dim // heads
    q, k, v = attention_inputs(batch, heads, tokens, head_dim)
    cos, sin = model.rope(tokens)
    x = torch.randn(batch, tokens, dim)
    norm = model.blocks[0].norm1
    with torch.inference_mode():
        return {
            **{f"lse_attention_r{r}": (soft_mask_attention(q, k, v, r, impl="lse") - fused_soft_mask(q, k, v, r))
               .abs().max().item() for r in (0.0, 0.5)},
            "rope_complex": (rope_complex(q, torch.complex(cos, sin)) - apply_rope(q, cos, sin)).abs().max().item(),
            "rms_vector_norm": (rms_norm_vector_norm(x, norm.weight, norm.eps) - norm(x)).abs().max().item(),
        }


def bench_components(model: torch.nn.Module, batch: int, img_size: int, rounds: int, warmup: int,
                     max_seconds: float) -> dict:
    """Median ms per call of each block component at iLLaMA-T's shapes, and x depth per forward."""
    cfg = model.cfg
    tokens = (img_size // cfg.patch_size) ** 2 + 1
    fns = component_fns(batch, tokens, cfg.embed_dim, cfg.num_heads, model)
    with torch.inference_mode():
        stats = timed(fns, rounds, warmup, max_seconds)
    out = {name: {"ms_per_call": 1e3 * s["median_s"], "ms_per_fwd_x_depth": 1e3 * s["median_s"] * cfg.depth,
                  "median_from": s["median_from"]} for name, s in stats.items()}
    return {"tokens": tokens, "depth": cfg.depth, "components": out,
            "alternatives_max_abs_diff": check_alternatives(batch, tokens, cfg.embed_dim, cfg.num_heads, model)}


def _disable_rope(model: torch.nn.Module) -> None:
    """Benchmark-only: make every block's attention skip RoPE (rope=None), to price RoPE."""
    for blk in model.blocks:
        blk.attn.forward = lambda x, rope=None, attn_mask=None, f=blk.attn.forward: f(x, None, attn_mask)


def bench_variants(models: Dict[str, torch.nn.Module], batch: int, img_size: int, rounds: int, warmup: int,
                   max_seconds: float) -> dict:
    """Throughput of iLLaMA-T variants vs DeiT-T, interleaved: what each cost is worth.

    rate 0 (default, fused soft mask) / rate 1 (plain SDPA, no key doubling) / mask_mode 'causal'
    (renormalised causal SDPA, not the official numbers) / rate 1 with RoPE switched off.
    """
    rate1 = llamavit.create_model(OURS, img_size=img_size).eval()
    rate1.set_soft_mask_rate(1.0)
    no_rope = llamavit.create_model(OURS, img_size=img_size).eval()
    no_rope.set_soft_mask_rate(1.0)
    _disable_rope(no_rope)
    variants = {"iLLaMA-T rate 0 (default)": models[OURS], "iLLaMA-T rate 1 (no key doubling)": rate1,
                "iLLaMA-T mask_mode=causal (is_causal SDPA)": llamavit.create_model(
                    OURS, img_size=img_size, mask_mode="causal").eval(),
                "iLLaMA-T rate 1, RoPE off": no_rope, PEER: models[PEER]}
    x = torch.randn(batch, 3, img_size, img_size)
    with torch.inference_mode():
        stats = timed({n: (lambda m=m: m(x)) for n, m in variants.items()}, rounds, warmup, max_seconds)
    peer = batch / stats[PEER]["median_s"]
    return {name: {"img_per_s": batch / s["median_s"], "ratio_over_peer": batch / s["median_s"] / peer,
                   "median_from": s["median_from"]} for name, s in stats.items()}


def where_time_goes(models: Dict[str, torch.nn.Module], batch: int, img_size: int, quick: bool) -> dict:
    """Profiler tables, component timings and variant throughputs (section 5)."""
    x = torch.randn(batch, 3, img_size, img_size)
    iters = 2 if quick else 4
    return {
        "profile_iters": iters,
        "profile_top_ops": {name: profile_ops(m, x, iters=iters, top=12) for name, m in models.items()},
        "components": bench_components(models[OURS], batch, img_size, rounds=3 if quick else 10, warmup=1,
                                       max_seconds=0 if quick else 20),
        "variants": bench_variants(models, batch, img_size, rounds=2 if quick else 6, warmup=1,
                                   max_seconds=0 if quick else 30),
    }


# --- report -------------------------------------------------------------------------------------

def _fmt_load(res: dict) -> str:
    return (f"Load average before {res['loadavg_before']}, after {res['loadavg_after']}; other processes' CPU "
            f"per section (median, cores) {_fmt_cores(res['other_cores_by_section'])}; "
            f"other load likely: {res['other_load_likely']}.")


def _fmt_cores(by_section: Dict[str, float]) -> str:
    vals = [c for c in by_section.values() if c is not None]
    return f"{min(vals):.2f}-{max(vals):.2f}" if vals else "unknown"


def markdown(res: dict) -> str:
    """A readable markdown report of the results dict."""
    m, mm, mods = res["machine"], res["matmul_peak"], res["models"]
    lines = [f"## Throughput ({'quick' if res['config']['quick'] else 'full'} run)", "",
             f"Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, torch.set_num_threads({m['threads']}); "
             f"torch {m['torch']}, timm {m['timm']}, llamavit {m['llamavit']}. {_fmt_load(res)} "
             f"Total {res['total_seconds']:.0f} s. Medians over quiet rounds (other processes < {QUIET_CORES} "
             f"cores) where there were >= 3, else over all rounds.", "",
             f"Matmul peak (`torch.mm` {mm['size']}² fp32, median of {mm['n']}): **{mm['gflops_per_s']:.1f} GFLOP/s**",
             "", f"### Models: eval, batch {mods['batch']}, {mods['img_size']}², fp32, random weights, "
             f"interleaved rounds", "",
             "| model | img/s | img/s (all rounds) | rounds (quiet) | GFLOP/img nominal | GFLOP/img executed "
             "| % matmul peak (nominal) |", "|---|---|---|---|---|---|---|"]
    for name, r in mods["models"].items():
        lines.append(f"| {name} | {r['img_per_s']:.1f} | {r['img_per_s_all_rounds']:.1f} | {r['n']} ({r['n_quiet']}) "
                     f"| {r['nominal_gflop_per_img']:.3f} | {r['executed_gflop_per_img']:.3f} "
                     f"| {100 * r['frac_of_matmul_peak_nominal']:.0f} % |")
    ratio = mods["ratio_ours_over_peer"]
    all_rounds = mods["ratio_ours_over_peer_all_rounds"]
    lines += ["", f"Ratio iLLaMA-T / DeiT-T: **{ratio:.3f}** (all rounds {all_rounds:.3f}; "
              f"target >= {res['config']['target']}: {'met' if ratio >= res['config']['target'] else 'NOT met'})", ""]
    lines += _attention_table("Soft-mask attention forward (B 32, 3 heads, d 64)", res["attention_forward"],
                              "max abs diff", "max_abs_diff")
    lines += _attention_table("Soft-mask attention forward+backward (training)", res["attention_train"],
                              "max abs grad diff", "max_abs_grad_diff")
    if res.get("where_time_goes"):
        lines += _profile_tables(res["where_time_goes"])
    return "\n".join(lines)


def _attention_table(title: str, rows: List[dict], diff_label: str, diff_key: str) -> List[str]:
    """Markdown table lines for attention timings."""
    lines = [f"### {title}", "", f"| tokens | rate | fused ms | LSE ms | naive ms | official-form ms | naive/fused | "
             f"naive/LSE | official/fused | official/LSE | rounds (quiet) | {diff_label} |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = lambda key, r=r: f"{1e3 * r[key]['median_s']:.2f}" if key in r else "-"   # noqa: E731
        ratio = lambda key, r=r: f"{r[key]:.2f}" if key in r else "-"   # noqa: E731
        lines.append(f"| {r['tokens']} | {r['rate']} | {ms('fused')} | {ms('lse')} | {ms('naive')} | "
                     f"{ms('official')} | "
                     f"{ratio('ratio_naive_over_fused')} | {ratio('ratio_naive_over_lse')} | "
                     f"{ratio('ratio_official_over_fused')} | {ratio('ratio_official_over_lse')} | "
                     f"{r['fused']['n']} ({r['fused']['n_quiet']}) | {r[diff_key]:.2e} |")
    return lines + [""]


def _profile_tables(w: dict) -> List[str]:
    """Markdown lines for section 5: variants, components, top profiler ops."""
    lines = ["### Where the time goes", "", "| model variant | img/s | / DeiT-T |", "|---|---|---|"]
    for name, r in w["variants"].items():
        lines.append(f"| {name} | {r['img_per_s']:.1f} | {r['ratio_over_peer']:.3f} |")
    comp = w["components"]
    diffs = ", ".join(f"{k} {v:.1e}" for k, v in comp["alternatives_max_abs_diff"].items())
    lines += ["", f"Block components at {comp['tokens']} tokens, batch 32 (median ms per call; x{comp['depth']} "
              f"blocks per forward). 'alt' rows are equivalent forms the library does not use yet "
              f"(max abs diff vs ours: {diffs}):",
              "", "| component | ms/call | ms/forward |", "|---|---|---|"]
    for name, r in comp["components"].items():
        lines.append(f"| {name} | {r['ms_per_call']:.2f} | {r['ms_per_fwd_x_depth']:.1f} |")
    for name, ops in w["profile_top_ops"].items():
        lines += ["", f"Top ops by self CPU time, {name} ({w['profile_iters']} forwards):", "",
                  "| op | self ms/forward | % | calls/forward |", "|---|---|---|---|"]
        for o in ops:
            lines.append(f"| {o['op']} | {o['self_ms_per_fwd']:.1f} | {o['self_pct']:.1f} | {o['calls_per_fwd']:.0f} |")
    return lines + [""]


# --- main ---------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--quick", action="store_true", help="~30 s smoke run (few rounds, no extension)")
    p.add_argument("--model-rounds", type=int, default=None,
                   help="min interleaved rounds per model (default 20, quick 3)")
    p.add_argument("--attn-rounds", type=int, default=None,
                   help="min interleaved rounds per attention case (default 15, quick 3)")
    p.add_argument("--target", type=float, default=0.9, help="target ratio iLLaMA-T / DeiT-T")
    p.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                   help="section 5: 'auto' runs it when the ratio is below --target")
    p.add_argument("--tol", type=float, default=1e-4, help="max abs difference fused vs naive")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "throughput.json"))
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """All sections; returns the results dict."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model_rounds = args.model_rounds or (3 if args.quick else 20)
    attn_rounds = args.attn_rounds or (3 if args.quick else 15)
    extend = 0.0 if args.quick else 1.0  # scale of the time allowed to collect quiet rounds
    start, load_before = time.perf_counter(), load_average()
    res = {"machine": machine_info(args.threads), "loadavg_before": load_before,
           "config": {"threads": args.threads, "batch": args.batch, "img_size": args.img_size, "quick": args.quick,
                      "model_rounds": model_rounds, "attn_rounds": attn_rounds, "target": args.target,
                      "quiet_cores": QUIET_CORES, "dtype": "float32", "mode": "eval + torch.inference_mode",
                      "tol": args.tol}}
    res["matmul_peak"] = matmul_peak(4096, rounds=3 if args.quick else 10, max_seconds=20 * extend)
    _log(f"matmul peak {res['matmul_peak']['gflops_per_s']:.1f} GFLOP/s")

    models = build_models(args.img_size)
    flops = model_flops(models, args.img_size)
    res["models"] = bench_models(models, args.batch, args.img_size, model_rounds, warmup=1 if args.quick else 3,
                                 max_seconds=60 * extend, peak_gflops=res["matmul_peak"]["gflops_per_s"], flops=flops)
    _log(f"ratio ours/peer {res['models']['ratio_ours_over_peer']:.3f}")

    heads, head_dim = 3, 64
    res["attention_forward"] = [
        bench_attention_forward(args.batch, heads, head_dim, n, r, attn_rounds, 2, (5 if n < 300 else 15) * extend,
                                args.tol) for n in (197, 577) for r in (0.0, 0.5)]
    res["attention_train"] = [
        bench_attention_train(args.batch, heads, head_dim, 197, r, attn_rounds, 2, 10 * extend, args.tol)
        for r in (0.0, 0.5)]
    _log("attention done")

    below = res["models"]["ratio_ours_over_peer"] < args.target
    if args.profile == "always" or (args.profile == "auto" and below):
        res["where_time_goes"] = where_time_goes(models, args.batch, args.img_size, args.quick)
    res["loadavg_after"] = load_average()
    res["other_cores_by_section"] = other_cores_by_section(res)
    res["other_load_likely"] = other_load_likely(res, args.threads)
    res["total_seconds"] = time.perf_counter() - start
    res["all_within_tol"] = all(r["within_tol"] for r in res["attention_forward"] + res["attention_train"])
    return res


def other_cores_by_section(res: dict) -> Dict[str, float]:
    """Median CPU (cores) used by other processes during each timed section."""
    out = {"matmul_peak": res["matmul_peak"]["other_cores_median"],
           "models": res["models"]["models"][OURS]["other_cores_median"]}
    for key in ("attention_forward", "attention_train"):
        for r in res[key]:
            out[f"{key}_{r['tokens']}_r{r['rate']}"] = r["fused"]["other_cores_median"]
    return out


def other_load_likely(res: dict, threads: int) -> bool:
    """True when other processes used >= QUIET_CORES during any section. Without /proc figures, falls
    back to the load averages (which include this process's own threads, hence the margin)."""
    known = [c for c in res["other_cores_by_section"].values() if c is not None]
    if known:
        return max(known) >= QUIET_CORES
    return max(res["loadavg_before"][0], res["loadavg_after"][0]) > threads + 0.5


def _log(msg: str) -> None:
    print(f"[throughput] {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    res = run(args)
    print(markdown(res))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    _log(f"wrote {args.out}")
    if not res["all_within_tol"]:
        _log(f"FAIL: fused vs naive soft-mask attention differ by more than {args.tol}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
