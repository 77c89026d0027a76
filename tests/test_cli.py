"""The `llamavit` command end to end: models, info, train -> eval -> predict on a Fashion-MNIST subset,
YAML configs, and one clear error line for each kind of bad input."""
import os
import subprocess
import sys

import pytest

from llamavit.cli import main
from llamavit.data.datasets import FASHION_MNIST_DIR

needs_fmnist = pytest.mark.skipif(not os.path.isfile(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")),
                                  reason="Debian package dataset-fashion-mnist not installed (make test installs it)")
TINY_FLAGS = ["--model", "illama_tiny_patch16_224", "--model-kwargs", "patch_size=7", "embed_dim=32", "depth=2",
              "num_heads=2", "--img-size", "28", "--in-chans", "1", "--no-progress", "--crop-pct", "1.0"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_models_lists_names(capsys):
    code, out, _ = run(capsys, "models", "illama_tiny*")
    assert code == 0 and out.split() == ["illama_tiny_patch16_224", "illama_tiny_patch16_384"]
    code, _, err = run(capsys, "models", "nothing*")
    assert code == 2 and "no model matches 'nothing*'" in err


def test_info_reports_official_parameter_count(capsys):
    code, out, _ = run(capsys, "info", "illama_small_patch16_224")
    assert code == 0 and "22,018,024 parameters" in out and "embed_dim: 384" in out
    code, out, _ = run(capsys, "info", "illama_tiny_patch16_224")
    # the architecture's FLOPs, equal to DeiT-T's (timm counts 2.507 with attention included)
    assert "5,701,096 parameters (5,701,096 trainable), 2.51 GFLOPs per 224x224 image" in out


def test_unknown_model_suggests_close_names(capsys):
    code, _, err = run(capsys, "info", "illama_smal_patch16_224")
    assert code == 2
    assert err.strip().splitlines() == [
        "llamavit: info: error: unknown model 'illama_smal_patch16_224'; did you mean illama_small_patch16_224, "
        + err.split("illama_small_patch16_224, ", 1)[1].strip()]


@needs_fmnist
def test_train_eval_predict_on_fashion_mnist_subset(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code, out, err = run(capsys, "train", *TINY_FLAGS, "--data", "fashion_mnist", "--train-subset", "1024",
                         "--val-subset", "200", "--epochs", "2", "--batch-size", "32", "--lr", "3e-3",
                         "--warmup-epochs", "0.3", "--scale", "0.75", "1.0",
                         "--soft-mask", "linear", "--soft-mask-epochs", "1", "--output", run_dir)
    assert code == 0, err
    assert '"val_top1"' in out and os.path.isfile(run_dir / "curves.png")

    code, out, err = run(capsys, "eval", "--checkpoint", run_dir, "--subset", "300")
    assert code == 0, err
    assert out.startswith("fashion_mnist (300 images): top-1 ")
    top1 = float(out.split("top-1 ")[1].split("%")[0])
    assert 20.0 < top1 <= 100.0  # 64 steps on 1024 images reach ~35%: well above the 10% of chance

    from llamavit.data import build_dataset
    test = build_dataset("fashion_mnist", "val")
    paths = []
    for i in (0, 1):
        img, _ = test[i]
        paths.append(tmp_path / f"img{i}.png")
        img.resize((56, 40)).convert("RGB").save(paths[-1])  # another size and mode: converted on input
    code, out, err = run(capsys, "predict", *paths, "--checkpoint", run_dir)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{paths[0]}: ")
    names = [part.rsplit(" ", 1)[0] for part in lines[0].split(": ", 1)[1].split(", ")]
    assert len(names) == 5 and set(names) <= set(test.classes)
    probs = [float(part.rsplit(" ", 1)[1].rstrip("%")) for part in lines[0].split(": ", 1)[1].split(", ")]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 100.5

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    code, out, err = run(capsys, "predict", bad, "--checkpoint", run_dir)
    assert code == 2 and f"cannot read image {bad}: not a readable image file" in err
    assert len(err.strip().splitlines()) == 1


def test_train_from_yaml_with_flag_override(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("model: illama_tiny_patch16_224\nmodel_kwargs: {patch_size: 8, embed_dim: 32, depth: 1, "
                   "num_heads: 2}\nimg_size: 32\ndata: synthetic\nepochs: 5\nbatch_size: 16\nprogress: false\n")
    code, out, err = run(capsys, "train", "--config", cfg, "--epochs", "1", "--output", tmp_path / "r")
    assert code == 0, err
    assert '"steps": 4' in out  # 64 synthetic images / batch 16, one epoch: the flag won over the file


def test_train_errors_are_one_line(tmp_path, capsys):
    code, _, err = run(capsys, "train", "--data", tmp_path / "missing", "--output", tmp_path / "r", "--no-progress")
    assert code == 2 and "neither 'fashion_mnist', 'digits', 'synthetic' nor an existing directory" in err
    code, _, err = run(capsys, "train", "--config", tmp_path / "nope.yaml")
    assert code == 2 and "config file not found" in err
    code, _, err = run(capsys, "train", "--model", "illama_tiny", "--output", tmp_path / "r")
    assert code == 2 and "unknown model 'illama_tiny'" in err
    code, _, err = run(capsys, "train", "--model-kwargs", "patch_size", "--output", tmp_path / "r")
    assert code == 2 and "must look like KEY=VALUE" in err
    code, _, err = run(capsys, "eval", "--checkpoint", tmp_path / "no_run")
    assert code == 2 and "checkpoint not found" in err


def test_help_of_every_command():
    for cmd in ([], ["train"], ["eval"], ["predict"], ["info"], ["models"], ["demo"]):
        proc = subprocess.run([sys.executable, "-m", "llamavit.cli", *cmd, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "usage: llamavit" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "llamavit.cli", "train", "--help"], capture_output=True, text=True)
    assert "--soft-mask SOFT_MASK" in proc.stdout and "iLLaMA soft-mask schedule" in proc.stdout
