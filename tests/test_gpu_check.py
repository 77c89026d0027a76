"""bench/gpu_check.py --dry-run: the GPU check's code runs end to end on a CPU at tiny sizes and writes its JSON.

Every section must come back "ok". On a CPU the only GPU-only parts are the flash and efficient SDPA backends of
section 2, reported "skipped: no GPU"; everything else (the math backend, parity with the CPU as both devices,
throughput without compile, the torchrun runs on gloo, the Fashion-MNIST steps) runs.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = {"parity", "soft_mask_backends", "train_throughput", "distributed", "fmnist"}


def test_dry_run_writes_every_section_ok(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--output", str(out)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["dry_run"] is True and res["device"] and res["torch"] == torch.__version__
    assert "cuda" in res and set(res["sections"]) == SECTIONS
    for name, section in res["sections"].items():
        assert section["status"] == "ok", (name, section["status"], section.get("traceback", ""))
        assert section["seconds"] >= 0 and section["summary"]

    parity = res["sections"]["parity"]["families"]
    assert set(parity) == {"illama", "visionllama", "visionllama_pyramid", "aim", "vit_llm"}
    assert all(f["max_abs_diff"] <= 1e-4 for f in parity.values())

    backends = res["sections"]["soft_mask_backends"]["backends"]
    assert backends["flash"] == backends["efficient"] == "skipped: no GPU"
    math_cases = backends["math"]["cases"]
    assert backends["math"]["ok"] and len(math_cases) == 6 and all(c["supported"] for c in math_cases.values())
    assert all(c["value_diff"] <= 1e-4 and c["grad_diff"] <= 1e-4 for k, c in math_cases.items() if "float32" in k)

    throughput = res["sections"]["train_throughput"]
    assert set(throughput["models"]) == {"iLLaMA-B", "VisionLLaMA-B", "DeiT-B"} and throughput["matmul_peak_tflops"] > 0
    assert all(m["img_per_s"] > 0 and 0 < m["mfu"] < 1 for m in throughput["models"].values())
    assert set(throughput["ratios"]) == {"iLLaMA-B / DeiT-B", "VisionLLaMA-B / DeiT-B"}

    runs = res["sections"]["distributed"]["runs"]
    assert runs["ddp"]["ok"] and runs["fsdp"]["ok"] and "--fsdp" in runs["fsdp"]["command"]
    # the same seed in one process: FSDP2's one-rank shards take the same steps as the DDP run
    assert runs["fsdp"]["final_loss"] == pytest.approx(runs["ddp"]["final_loss"], rel=1e-5)

    fmnist = res["sections"]["fmnist"]
    assert 0 <= fmnist["test_top1"] <= 100 and fmnist["epochs_done"] == 1 and fmnist["test_images"] == 256
