"""Post-training int8 quantisation of the Linear layers on CPU, with accuracy and size before / after.

Two methods, both from `torch.ao.quantization` (eager mode, x86/fbgemm kernels, CPU only):
- 'dynamic': int8 weights (per tensor), activations quantised on the fly per batch
  (`quantize_dynamic` on every nn.Linear);
- 'static': int8 weights (per output channel) and int8 activations with scales fixed by a
  calibration pass. Eager static quantisation needs quantise/dequantise stubs around what runs in
  int8; the attention (SDPA, softmax, RoPE), norms and residual adds have no quantised kernels, so
  each nn.Linear is wrapped on its own as quantise -> int8 Linear -> dequantise, and everything else
  stays float32. The patch-embedding Conv2d, position embeddings and norms stay float32 in both.
Size = bytes of the serialised state dict (`torch.save`), which is what a checkpoint would take.
"""
import copy
import io
import json
import os
import time
import warnings
from typing import Dict, Iterable, List

import torch
import torch.nn as nn

from .metrics import evaluate

METHODS = ("dynamic", "static")


def serialized_size(model: nn.Module) -> int:
    """Bytes of `torch.save(model.state_dict())`."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def count_linears(model: nn.Module) -> Dict[str, int]:
    """{'float': float nn.Linear count, 'int8': quantised Linear count} of a model."""
    from torch.ao.nn.quantized import Linear as QLinear
    from torch.ao.nn.quantized.dynamic import Linear as DQLinear
    counts = {"float": 0, "int8": 0}
    for m in model.modules():
        if isinstance(m, (QLinear, DQLinear)):
            counts["int8"] += 1
        elif type(m) is nn.Linear:
            counts["float"] += 1
    return counts


def _ao():
    """torch.ao.quantization, imported without its deprecation warning (it still ships in this torch)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch.ao.quantization as ao
    return ao


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """A copy of `model` (CPU, eval) with every nn.Linear replaced by a dynamic int8 Linear."""
    ao = _ao()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ao.quantize_dynamic(copy.deepcopy(model).cpu().eval(), {nn.Linear}, dtype=torch.qint8)


class StaticQuantLinear(nn.Module):
    """quantise -> Linear -> dequantise: one Linear run in int8 with calibrated activation scales.
    x: (..., in_features) float -> (..., out_features) float."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        ao = _ao()
        self.quant, self.linear, self.dequant = ao.QuantStub(), linear, ao.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.linear(self.quant(x)))


def _wrap_linears(module: nn.Module, qconfig) -> None:
    for name, child in module.named_children():
        if type(child) is nn.Linear:
            wrapped = StaticQuantLinear(child)
            wrapped.qconfig = qconfig
            setattr(module, name, wrapped)
        else:
            _wrap_linears(child, qconfig)


@torch.no_grad()
def quantize_static_int8(model: nn.Module, calibration: Iterable[torch.Tensor], backend: str = "x86") -> nn.Module:
    """A copy of `model` (CPU, eval) with every nn.Linear in static int8; `calibration` yields image
    batches (B, C, H, W) whose activations fix the quantisation scales (a few hundred images suffice)."""
    ao = _ao()
    if backend not in torch.backends.quantized.supported_engines:
        raise RuntimeError(f"quantised engine {backend!r} is not available here "
                           f"(available: {torch.backends.quantized.supported_engines})")
    torch.backends.quantized.engine = backend
    qmodel = copy.deepcopy(model).cpu().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _wrap_linears(qmodel, ao.get_default_qconfig(backend))
        ao.prepare(qmodel, inplace=True)
        seen = 0
        for images in calibration:
            qmodel(images)
            seen += images.shape[0]
        if not seen:
            raise ValueError("static quantisation needs at least one calibration batch")
        ao.convert(qmodel, inplace=True)
    return qmodel


def _timed_eval(model: nn.Module, loader) -> Dict[str, float]:
    start = time.perf_counter()
    metrics = evaluate(model, loader, device="cpu")
    return {**metrics, "eval_seconds": time.perf_counter() - start}


def analyze_quantization(model: nn.Module, loader, calibration_loader=None, methods=METHODS,
                         calibration_batches: int = 4) -> dict:
    """Accuracy (top-1/top-5/loss on `loader`), serialised size and eval time of the float model and of
    each int8 method. Static uses the first `calibration_batches` image batches of `calibration_loader`
    (default: `loader`; pass training images to keep calibration and evaluation apart). A method that
    fails is reported with its error instead of numbers."""
    model = model.cpu().eval()
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown quantisation method(s) {sorted(unknown)}; expected {METHODS}")
    rows = [{"method": "float32", "size_bytes": serialized_size(model), **count_linears(model),
             **_timed_eval(model, loader)}]
    for method in methods:
        try:
            if method == "dynamic":
                qmodel = quantize_dynamic_int8(model)
            else:
                source = calibration_loader if calibration_loader is not None else loader
                batches = (images for i, (images, _) in zip(range(calibration_batches), source))
                qmodel = quantize_static_int8(model, batches)
            rows.append({"method": f"int8_{method}", "size_bytes": serialized_size(qmodel), **count_linears(qmodel),
                         **_timed_eval(qmodel, loader)})
        except (RuntimeError, NotImplementedError, AssertionError) as e:
            rows.append({"method": f"int8_{method}", "error": f"{type(e).__name__}: {e}"})
    base = rows[0]
    for row in rows[1:]:
        if "error" not in row:
            row["top1_drop"] = base["top1"] - row["top1"]
            row["size_ratio"] = base["size_bytes"] / row["size_bytes"]
    return {"num_images": len(loader.dataset), "engine": torch.backends.quantized.engine, "results": rows}


def save_quantization_report(result: dict, out_dir: str, title: str = "") -> List[str]:
    """quantization.json and quantization.png (top-1 and size per method)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    rows = [r for r in result["results"] if "error" not in r]
    names = [r["method"] for r in rows]
    fig, (ax_acc, ax_size) = plt.subplots(1, 2, figsize=(8, 3.5))
    bars = ax_acc.bar(names, [r["top1"] for r in rows], color=["tab:gray"] + ["tab:blue"] * (len(rows) - 1))
    ax_acc.bar_label(bars, fmt="%.2f")
    low = min(r["top1"] for r in rows)
    ax_acc.set_ylim(max(0.0, low - 5), min(100.0, max(r["top1"] for r in rows) + 2))
    ax_acc.set_ylabel("top-1 (%)")
    bars = ax_size.bar(names, [r["size_bytes"] / 2 ** 20 for r in rows], color=["tab:gray"] + ["tab:orange"] *
                       (len(rows) - 1))
    ax_size.bar_label(bars, fmt="%.2f")
    ax_size.set_ylabel("serialised size (MiB)")
    fig.suptitle(f"{title + ': ' if title else ''}int8 post-training quantisation ({result['num_images']} images)",
                 fontsize=9)
    fig.tight_layout()
    png = os.path.join(out_dir, "quantization.png")
    fig.savefig(png, dpi=100)
    plt.close(fig)
    path = os.path.join(out_dir, "quantization.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return [path, png]


def format_quantization_table(result: dict) -> str:
    """Accuracy, size and speed per quantisation method as a plain-text table."""
    lines = [f"{'method':<13} {'top-1':>7} {'drop':>6} {'size MiB':>9} {'ratio':>6} {'int8 Linear':>11} {'eval s':>7}"]
    for r in result["results"]:
        if "error" in r:
            lines.append(f"{r['method']:<13} failed: {r['error']}")
            continue
        lines.append(f"{r['method']:<13} {r['top1']:7.2f} {r.get('top1_drop', 0.0):6.2f} "
                     f"{r['size_bytes'] / 2 ** 20:9.3f} {r.get('size_ratio', 1.0):6.2f} "
                     f"{r['int8']:>5}/{r['int8'] + r['float']:<5} {r['eval_seconds']:7.2f}")
    return "\n".join(lines)

