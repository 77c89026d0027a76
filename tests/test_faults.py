"""Faults and bad inputs a user meets: nothing is lost and nothing is silently wrong; every user error is one
line naming what is wrong and what was expected (exit 2, no traceback)."""
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llamavit.cli import main

TINY = ["--model", "illama_tiny_patch16_224", "--model-kwargs", "patch_size=4", "embed_dim=32", "depth=2",
        "num_heads=2", "--img-size", "28", "--in-chans", "1", "--data", "synthetic", "--batch-size", "16",
        "--no-progress"]


def run(capsys, *argv):
    """(exit code, stdout, stderr) of `llamavit argv`."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str, command: str) -> str:
    assert err.startswith(f"llamavit {command}: error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny finished run (2 epochs of synthetic images) and an image file to classify."""
    run_dir = tmp_path_factory.mktemp("faults") / "run"
    assert main(["train", *TINY, "--epochs", "2", "--output", str(run_dir)]) == 0
    from llamavit.data import SyntheticImages
    image = run_dir.parent / "image.png"
    SyntheticImages(num_samples=1, img_size=28)[0][0].save(image)
    return run_dir, image


def test_predict_and_eval_refuse_non_finite_weights(trained, tmp_path, capsys):
    run_dir, image = trained
    broken = tmp_path / "broken"
    ckpt = os.path.join(run_dir, "checkpoints", "step-00000008")
    os.makedirs(broken)
    for name in os.listdir(ckpt):
        if name != "model.safetensors":
            os.link(os.path.join(ckpt, name), broken / name)
    weights = load_file(os.path.join(ckpt, "model.safetensors"))
    weights["head.weight"][0, 0] = float("nan")
    with safe_open(os.path.join(ckpt, "model.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    save_file(weights, str(broken / "model.safetensors"), metadata=metadata)
    for command in (["predict", image], ["eval"]):
        code, out, err = run(capsys, *command, "--checkpoint", broken)
        assert code == 2 and not out
        assert "holds NaN or infinite weights (head.weight): the run diverged; use an earlier checkpoint" in \
            one_line_error(err, command[0])


def test_ema_asked_of_a_run_without_ema_is_refused(trained, capsys):
    run_dir, image = trained
    code, _, err = run(capsys, "predict", image, "--checkpoint", run_dir, "--ema")
    assert code == 2 and "has no EMA weights (the run was trained without --ema-decay): drop --ema" in \
        one_line_error(err, "predict")


def test_a_stop_before_any_checkpoint_says_so(tmp_path, capsys):
    code, _, err = run(capsys, "train", *TINY, "--epochs", "1", "--lr", "1e30", "--warmup-epochs", "0",
                       "--output", tmp_path / "r")
    assert code == 2
    assert "before any checkpoint was written (lower the learning rate and start again)" in one_line_error(err, "train")
    assert not os.path.isdir(tmp_path / "r" / "checkpoints")


def test_diverging_weights_keep_the_last_finite_checkpoint_and_resume_says_so_again(tmp_path, capsys):
    # lr 1e6: a finite step 1, weights NaN after step 2; checkpoint every step
    args = ["train", *TINY, "--epochs", "2", "--lr", "1e6", "--warmup-epochs", "0", "--ckpt-every", "1",
            "--output", tmp_path / "r"]
    code, _, err = run(capsys, *args)
    assert code == 2 and "the weights became NaN or infinite at step 2" in one_line_error(err, "train")
    kept = os.path.join(tmp_path, "r", "checkpoints", "step-00000001", "model.safetensors")
    assert all(torch.isfinite(t).all() for t in load_file(kept).values())
    code, _, err = run(capsys, *args, "--resume")   # the same step breaks the same way: said again, nothing lost
    assert code == 2 and "the weights became NaN or infinite at step 2" in one_line_error(err, "train")
    assert sorted(os.listdir(os.path.join(tmp_path, "r", "checkpoints"))) == ["latest", "step-00000001"]
