"""`llamavit export`: a trained image classifier as an ONNX file or a timm folder (docs/export.md).

- ONNX: `torch.onnx.export(dynamo=True)` at the checkpoint's training resolution with a dynamic batch axis
  (optionally dynamic height and width), the weights inside the file (a frozen LLM block's too), then checked:
  onnxruntime (CPUExecutionProvider) must match eager PyTorch within `tolerance` (max abs) at batch 1 and 3, else
  the file is removed and the export refused in one line. The report adds the file size and the onnxruntime / eager
  PyTorch speed ratio at batch 1 on the CPU.
- timm: config.json + model.safetensors (llamavit.models.timm_folder), checked by rebuilding the model with
  `timm.create_model("local-dir:...", pretrained=True)` and comparing its outputs.
"""
import itertools
import os
import re
import shutil
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from .errors import CheckpointError, ExportError, require_extra
from .eval.loaders import checkpoint_transform, training_data
from .models.timm_folder import save_timm_folder
from .train.checkpoint import model_from_checkpoint, read_meta

FORMATS = ("onnx", "timm")
TOLERANCE = 1e-4            # max |onnxruntime - eager| accepted
OPSET = 18
PARITY_BATCHES = (1, 3)     # the exported graph is traced at batch 2: 1 and 3 show the batch axis is dynamic
INPUT_NAME, OUTPUT_NAME = "images", "logits"
# protobuf holds at most 2 GiB: larger models keep their weights in a `<file>.data` beside the .onnx
MAX_INLINE_BYTES = 2 * 1024 ** 3 - 64 * 1024 ** 2


def default_output(checkpoint: str, fmt: str) -> str:
    """<run>/export/model.onnx or <run>/export/timm: the run directory of a run, checkpoint or weights file."""
    base = checkpoint if os.path.isdir(checkpoint) else os.path.dirname(os.path.abspath(checkpoint))
    parent = os.path.dirname(os.path.abspath(base))
    if os.path.basename(parent) == "checkpoints":   # runs/x/checkpoints/step-*: export beside the run, not inside
        base = os.path.dirname(parent)              # a checkpoint that pruning deletes
    return os.path.join(base, "export", "model.onnx" if fmt == "onnx" else "timm")


def classifier_meta(checkpoint: str) -> Dict[str, Any]:
    """The metadata of an image classifier's checkpoint; one-line refusals for everything else (DiT, pre-training,
    probe, dense, point-cloud and video runs)."""
    meta = read_meta(checkpoint)
    if meta.get("task") in ("points", "video"):
        raise ValueError(f"{checkpoint} is a {meta['task']} classifier: export takes image classifiers")
    checkpoint_transform(checkpoint)   # refuses generation, pre-training, probe and dense runs by name
    return meta


def export_checkpoint(checkpoint: str, fmt: str, output: Optional[str] = None, use_ema: bool = False,
                      dynamic_size: bool = False, tolerance: float = TOLERANCE,
                      speed_rounds: int = 5) -> Dict[str, Any]:
    """Export a llamavit classifier checkpoint (run, checkpoint directory, weights file or timm folder) as `fmt`
    ('onnx' | 'timm') to `output` (default: default_output; must not exist). dynamic_size: ONNX with dynamic height
    and width too (checked at twice the training size). speed_rounds: timing rounds of the ONNX speed ratio.
    -> the report of export_onnx / export_timm."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if dynamic_size and fmt != "onnx":
        raise ValueError("--dynamic-size is an ONNX option: a timm folder takes any size the model does")
    output = output or default_output(checkpoint, fmt)
    if os.path.lexists(output):
        what = "file" if fmt == "onnx" else "folder"
        raise ValueError(f"--output {output} exists already: export writes a new {what}; remove it or give another "
                         f"path")
    meta = classifier_meta(checkpoint)
    if fmt == "onnx":
        require_extra("export", "ONNX export", "onnx", "onnxscript", "onnxruntime")
    model = model_from_checkpoint(checkpoint, use_ema=use_ema).eval()
    if "lora" in meta:   # adapters folded into their layers: the plain architecture the name builds
        from .train.adapt import merge_lora
        merge_lora(model)
    transform = meta["transform"]
    input_size = (transform.get("in_chans", 3), transform["img_size"], transform["img_size"])
    if fmt == "onnx":
        facts = {"model": meta["model"], "classes": meta.get("classes", []), "transform": transform}
        return export_onnx(model, output, input_size, dynamic_size=dynamic_size, tolerance=tolerance,
                           speed_rounds=speed_rounds, metadata=facts)
    try:
        data = meta.get("data") or training_data(checkpoint)
    except (CheckpointError, ValueError):   # a bare weights file records no dataset
        data = None
    return export_timm(model, output, meta, {"data": data} if data else {}, tolerance=tolerance)


# --- ONNX -----------------------------------------------------------------------------------------

def _parity_inputs(input_size: Tuple[int, int, int], dynamic_size: bool) -> List[torch.Tensor]:
    """Seeded test inputs (B, C, H, W): batches 1 and 3 at the training size (+ batch 2 at twice it)."""
    g = torch.Generator().manual_seed(0)
    c, h, w = input_size
    inputs = [torch.randn(b, c, h, w, generator=g) for b in PARITY_BATCHES]
    if dynamic_size:
        inputs.append(torch.randn(2, c, 2 * h, 2 * w, generator=g))
    return inputs


def onnx_session(path: str, threads: Optional[int] = None):
    """An onnxruntime CPU session of `path` with `threads` intra-op threads (default: torch's thread count); its
    own log stays quiet (failures come back as exceptions)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 4
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def onnx_max_abs_diff(model: nn.Module, session, inputs: Sequence[torch.Tensor]) -> float:
    """max |onnxruntime(x) - model(x)| over the inputs (each (B, C, H, W))."""
    worst = 0.0
    for x in inputs:
        with torch.inference_mode():
            expected = model(x).float().numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        if got.shape != expected.shape:
            raise ExportError(f"onnxruntime gave logits of shape {got.shape} for input {tuple(x.shape)}, eager "
                              f"PyTorch {expected.shape}")
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


def images_per_second(fns: Dict[str, Callable[[], Any]], batch: int, rounds: int = 5,
                      min_seconds: float = 0.1) -> Dict[str, float]:
    """img/s of each callable (one batch of `batch` images per call): interleaved rounds (A B A B ...) after one
    warm-up call each, a round repeating a call for at least min_seconds; the median round."""
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            n, start = 0, time.perf_counter()
            while True:
                fn()
                n += 1
                elapsed = time.perf_counter() - start
                if elapsed >= min_seconds:
                    break
            times[name].append(elapsed / n)
    return {name: batch / statistics.median(t) for name, t in times.items()}


def onnx_speed(model: nn.Module, session, input_size: Tuple[int, int, int], batch: int = 1,
               rounds: int = 5) -> Dict[str, float]:
    """{'onnxruntime': img/s, 'eager': img/s, 'ratio': onnxruntime / eager} at `batch`, side by side."""
    x = torch.randn(batch, *input_size)
    feed = {INPUT_NAME: x.numpy()}

    def eager():
        with torch.inference_mode():
            model(x)

    speed = images_per_second({"onnxruntime": lambda: session.run([OUTPUT_NAME], feed), "eager": eager}, batch,
                              rounds=rounds)
    return {**speed, "ratio": speed["onnxruntime"] / speed["eager"]}


def _remove_onnx(path: str) -> None:
    for p in (path, path + ".data"):
        if os.path.exists(p):
            os.remove(p)


def _first_line(e: BaseException) -> str:
    """The root cause of an exporter or onnxruntime error, as one short line (their reports span pages)."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(line.strip() for line in str(e).splitlines() if line.strip()))
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def verify_onnx(model: nn.Module, path: str, input_size: Tuple[int, int, int], dynamic_size: bool = False,
                tolerance: float = TOLERANCE):
    """Run the ONNX file at `path` with onnxruntime on seeded inputs (batches 1 and 3 at input_size (C, H, W); with
    dynamic_size also batch 2 at twice H and W) against eager `model`; a file onnxruntime cannot run, or whose
    max |diff| exceeds `tolerance`, is removed and refused (ExportError, one line). -> (session, inputs, max diff)."""
    name = type(model).__name__
    inputs = _parity_inputs(input_size, dynamic_size)
    try:
        session = onnx_session(path)
        diff = onnx_max_abs_diff(model, session, inputs)
    except Exception as e:
        _remove_onnx(path)
        raise ExportError(f"onnxruntime cannot run the ONNX export of {name} on inputs "
                          f"{', '.join(str(tuple(x.shape)) for x in inputs)} ({_first_line(e)}); removed {path}"
                          f"{' (exporting without --dynamic-size may work)' if dynamic_size else ''}") from e
    if not diff <= tolerance:
        _remove_onnx(path)
        raise ExportError(f"the ONNX export of {name} differs from eager PyTorch by max |diff| {diff:.3g} > "
                          f"{tolerance:g} under onnxruntime; removed {path}")
    return session, inputs, diff


def export_onnx(model: nn.Module, path: str, input_size: Tuple[int, int, int], dynamic_size: bool = False,
                tolerance: float = TOLERANCE, metadata: Optional[Dict[str, Any]] = None,
                speed_rounds: int = 5) -> Dict[str, Any]:
    """Write `model` (eval mode; input (B, C, H, W) at input_size (C, H, W) -> logits (B, K)) as ONNX to `path`
    (dynamo exporter, opset OPSET, batch axis dynamic; H and W too with dynamic_size), check it with onnxruntime
    against eager PyTorch (refused, the file removed, beyond `tolerance` max abs) and time both at batch 1.
    metadata: JSON-able facts stored as the file's metadata_props (`llamavit.<key>`).
    -> {path, bytes, max_abs_diff, checked (input shapes), dynamic_axes, opset, speed_batch1}."""
    import json

    from torch.export import Dim
    model = model.eval()
    c, h, w = input_size
    shapes = {0: Dim("batch"), **({2: Dim.AUTO, 3: Dim.AUTO} if dynamic_size else {})}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    name = type(model).__name__
    try:
        program = torch.onnx.export(model, (torch.randn(2, c, h, w),), None, dynamo=True, verbose=False,
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=OPSET,
                                    dynamic_shapes=(shapes,))
    except Exception as e:   # the exporter's errors are long reports; the first line names the op or the guard
        raise ExportError(f"torch.onnx.export (dynamo) cannot export {name}"
                          f"{' with a dynamic size' if dynamic_size else ''}: {_first_line(e)}") from e
    for key, value in (metadata or {}).items():
        program.model.metadata_props[f"llamavit.{key}"] = json.dumps(value)
    weight_bytes = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))
    program.save(path, external_data=weight_bytes > MAX_INLINE_BYTES)
    session, inputs, diff = verify_onnx(model, path, input_size, dynamic_size, tolerance)
    size = sum(os.path.getsize(p) for p in (path, path + ".data") if os.path.exists(p))
    return {"format": "onnx", "path": path, "bytes": size, "max_abs_diff": diff, "tolerance": tolerance,
            "checked": [list(x.shape) for x in inputs], "opset": OPSET,
            "dynamic_axes": ["batch"] + (["height", "width"] if dynamic_size else []),
            "speed_batch1": onnx_speed(model, session, input_size, batch=1, rounds=speed_rounds)}


# --- timm folder ----------------------------------------------------------------------------------

def export_timm(model: nn.Module, directory: str, meta: Dict[str, Any], extra: Optional[Dict[str, Any]] = None,
                tolerance: float = TOLERANCE) -> Dict[str, Any]:
    """Write `model` (built from `meta`: model, model_kwargs, classes, transform) as a timm folder, rebuild it with
    `timm.create_model("local-dir:<directory>", pretrained=True)` and compare the logits on a seeded batch (refused,
    the folder removed, beyond `tolerance`). -> {path, bytes, max_abs_diff, architecture}."""
    import timm
    llm = getattr(model, "llm_source", None)   # where a frozen block came from, before it becomes stored weights
    if llm:
        extra = {**(extra or {}), "llm": {k: v for k, v in llm.items() if k != "path"}}
    save_timm_folder(model, directory, meta.get("model_kwargs", {}), meta.get("classes", []), meta["transform"],
                     extra=extra)
    transform = meta["transform"]
    x = torch.randn(2, transform.get("in_chans", 3), transform["img_size"], transform["img_size"],
                    generator=torch.Generator().manual_seed(0))
    try:
        rebuilt = timm.create_model(f"local-dir:{directory}", pretrained=True).eval()
        with torch.inference_mode():
            diff = float((rebuilt(x) - model(x)).abs().max())
    except Exception as e:
        shutil.rmtree(directory, ignore_errors=True)
        raise ExportError(f"timm cannot rebuild the exported {meta['model']} from {directory} ({_first_line(e)}); "
                          f"removed it") from e
    if not diff <= tolerance:
        shutil.rmtree(directory, ignore_errors=True)
        raise ExportError(f"the model timm rebuilt from {directory} differs from the checkpoint's by max |diff| "
                          f"{diff:.3g}; removed it")
    size = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
    return {"format": "timm", "path": directory, "bytes": size, "max_abs_diff": diff, "architecture": meta["model"],
            "files": sorted(os.listdir(directory))}


def describe(report: Dict[str, Any]) -> List[str]:
    """The lines `llamavit export` prints for a report of export_checkpoint."""
    mb = report["bytes"] / 1e6
    if report["format"] == "onnx":
        speed = report["speed_batch1"]
        shapes = ", ".join("x".join(map(str, s)) for s in report["checked"])
        return [f"wrote {report['path']} ({mb:.2f} MB, opset {report['opset']}, dynamic axes: "
                f"{', '.join(report['dynamic_axes'])})",
                f"onnxruntime vs eager PyTorch: max |diff| {report['max_abs_diff']:.2e} on inputs {shapes} "
                f"(tolerance {report['tolerance']:g})",
                f"batch 1 on CPU ({torch.get_num_threads()} threads): onnxruntime {speed['onnxruntime']:.1f} img/s, "
                f"eager PyTorch {speed['eager']:.1f} img/s: ratio {speed['ratio']:.2f}x"]
    return [f"wrote {report['path']}/ ({', '.join(report['files'])}; {mb:.2f} MB)",
            f"timm.create_model('local-dir:{report['path']}', pretrained=True) after `import llamavit` rebuilds "
            f"{report['architecture']}: max |diff| {report['max_abs_diff']:.2e} to the checkpoint's logits"]

