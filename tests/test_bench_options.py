"""Option checks of bench scripts that run before any measurement: a bad combination stops at once, naming it."""
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_before_after_peers_need_one_per_model_and_train_steps():
    for extra in (["--train-steps", "--peers", "deit_tiny_patch16_224"],      # 2 default models, 1 peer
                  ["--models", "illama_tiny_patch16_224", "--peers", "deit_tiny_patch16_224"]):   # no --train-steps
        done = subprocess.run([sys.executable, str(BENCH / "before_after.py"), "--ref", "HEAD", *extra],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert "--peers takes one timm name per --models entry" in done.stderr and "Traceback" not in done.stderr
