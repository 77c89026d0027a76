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
    assert err.startswith(f"llamavit: {command}: error: ") and err.count("\n") == 1, err
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
    # lr 1e6: a finite step 1, then the loss or the weights turn NaN within a step or two; checkpoint every step
    args = ["train", *TINY, "--epochs", "2", "--lr", "1e6", "--warmup-epochs", "0", "--ckpt-every", "1",
            "--output", tmp_path / "r"]
    code, _, err = run(capsys, *args)
    line = one_line_error(err, "train")
    assert code == 2 and ("the weights became NaN or infinite at step" in line or "loss is nan at step" in line)
    root = os.path.join(tmp_path, "r", "checkpoints")
    kept = sorted(d for d in os.listdir(root) if d.startswith("step-"))
    assert kept and "step-00000001" in kept and f"{root}/{kept[-1]}" in line   # the last good one is named
    for step in kept:   # nothing non-finite was ever saved
        assert all(torch.isfinite(t).all() for t in load_file(os.path.join(root, step, "model.safetensors")).values())
    code, _, err2 = run(capsys, *args, "--resume")   # the same step breaks the same way: said again, nothing lost
    assert code == 2 and one_line_error(err2, "train") == line
    assert sorted(d for d in os.listdir(root) if d.startswith("step-")) == kept


# --- ImageFolder trees: no silent fallback, classes matched by name -----------------------------------------
def image_tree(root, splits=("train", "val"), classes=("class_0", "class_1", "class_2", "class_3"), per_class=8):
    """An ImageFolder tree of synthetic 28x28 images: <root>/<split>/<class>/*.png (splits=() -> class folders)."""
    from llamavit.data import SyntheticImages
    images = SyntheticImages(num_samples=4 * per_class, num_classes=4, img_size=28)
    for split in splits or ("",):
        for i in range(len(images)):
            image, label = images[i]
            name = f"class_{label}"
            if name in classes:
                folder = root / split / name
                folder.mkdir(parents=True, exist_ok=True)
                image.save(folder / f"{i:03d}.png")
    return root


FOLDER_ARGS = ["--model", "illama_tiny_patch16_224", "--model-kwargs", "patch_size=4", "embed_dim=32", "depth=2",
               "num_heads=2", "--img-size", "28", "--in-chans", "1", "--batch-size", "8", "--no-progress"]


@pytest.mark.parametrize("tree,message", [
    ({"splits": ("train",)}, "has train/ but no val/: an ImageFolder tree for training holds"),
    ({"splits": ()}, "holds class folders only: training reads"),
    ({"splits": ("train", "val"), "classes": ("class_0",)},
     "has 1 class (['class_0']): a classifier needs at least two"),
])
def test_training_refuses_trees_without_a_real_validation_split(tmp_path, capsys, tree, message):
    root = image_tree(tmp_path / "data", **tree)
    code, _, err = run(capsys, "train", *FOLDER_ARGS, "--data", root, "--epochs", "1", "--output", tmp_path / "r")
    assert code == 2 and message in one_line_error(err, "train")


def test_a_validation_set_lacking_a_class_is_refused(tmp_path, capsys):
    root = image_tree(tmp_path / "data")
    for png in (root / "val" / "class_2").iterdir():
        png.unlink()
    (root / "val" / "class_2").rmdir()
    code, _, err = run(capsys, "train", *FOLDER_ARGS, "--data", root, "--epochs", "1", "--output", tmp_path / "r")
    assert code == 2 and "the validation set of" in err and "has other classes than expected (missing ['class_2'])" \
        in one_line_error(err, "train")


def test_eval_numbers_another_sets_classes_as_the_model_does(tmp_path, capsys):
    import llamavit
    from llamavit.eval.loaders import eval_loader
    from llamavit.train import model_from_checkpoint
    root = image_tree(tmp_path / "data")
    assert main(["train", *FOLDER_ARGS, "--data", str(root), "--epochs", "2", "--output", str(tmp_path / "r")]) == 0
    capsys.readouterr()
    # a class-folders-only set with two of the four classes: ImageFolder numbers them 0 and 1
    subset = image_tree(tmp_path / "two", splits=(), classes=("class_1", "class_3"))
    loader, _, n = eval_loader(str(tmp_path / "r"), str(subset))
    labels = torch.cat([y for _, y in loader])
    assert n == 16 and sorted(set(labels.tolist())) == [1, 3]     # the model's indices, by name
    model = model_from_checkpoint(str(tmp_path / "r")).eval()
    with torch.no_grad():
        expected = llamavit.eval.evaluate(model, loader)["top1"]
    code, out, _ = run(capsys, "eval", "--checkpoint", tmp_path / "r", "--data", subset)
    assert code == 0 and f"top-1 {expected:.2f}%" in out
    unknown = image_tree(tmp_path / "other", splits=(), classes=("class_1",))
    (unknown / "zebra").mkdir()
    next((unknown / "class_1").iterdir()).rename(unknown / "zebra" / "z.png")
    code, _, err = run(capsys, "eval", "--checkpoint", tmp_path / "r", "--data", unknown)
    assert code == 2 and "has classes the model does not know: ['zebra']" in one_line_error(err, "eval")


# --- one run per directory ------------------------------------------------------------------------------
def test_a_second_run_into_a_busy_directory_is_refused_and_a_killed_run_frees_it(tmp_path, capsys):
    import signal
    import subprocess
    import sys
    import time
    from llamavit.train.checkpoint import latest_checkpoint
    out = tmp_path / "r"
    args = ["train", *TINY, "--epochs", "400", "--ckpt-every", "20", "--output", str(out)]
    first = subprocess.Popen([sys.executable, "-m", "llamavit.cli", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        lock = out / ".lock"
        deadline = time.time() + 60
        while not (lock.is_file() and lock.read_text() and latest_checkpoint(str(out))) and time.time() < deadline:
            time.sleep(0.1)
        assert lock.read_text().startswith(f"pid {first.pid} on ")
        code, _, err = run(capsys, *args)                      # a fresh run would move the first one's files
        assert code == 2 and f"is in use by another run (pid {first.pid} on " in one_line_error(err, "train")
        code, _, err = run(capsys, *args, "--resume")
        assert code == 2 and "is in use by another run" in err
        assert first.poll() is None                            # the first run goes on, untouched
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    step = int(os.path.basename(latest_checkpoint(str(out))).split("-")[1])
    code, out_text, _ = run(capsys, *args, "--resume", "--max-steps", step + 2)   # the dead run's lock is gone
    assert code == 0 and '"resumed": true' in out_text and not (out / ".lock").read_text()


# --- resume: the same run, or a change said out loud ------------------------------------------------------
def test_resume_refuses_changed_options_unless_allowed_and_then_logs_them(tmp_path, capsys):
    import json
    base = ["train", *TINY, "--epochs", "2", "--output", tmp_path / "r"]
    assert run(capsys, *base, "--max-steps", "3")[0] == 0
    code, _, err = run(capsys, *base, "--resume", "--lr", "0.002", "--epochs", "3")
    assert code == 2 and "--resume with other options than the run in" in one_line_error(err, "train")
    assert "epochs 2 -> 3, lr 0.001 -> 0.002" in err and "--allow-config-change" in err
    # what does not change the numbers may change: max steps, logging, checkpoint cadence
    assert run(capsys, *base, "--resume", "--max-steps", "5", "--log-every", "1", "--ckpt-every", "1")[0] == 0
    assert run(capsys, *base, "--resume", "--lr", "0.002", "--allow-config-change")[0] == 0
    with open(tmp_path / "r" / "log.jsonl") as f:
        changes = [r for r in map(json.loads, f) if "config_change" in r]
    assert changes == [{"step": 5, "config_change": {"lr": [0.001, 0.002]}}]


def test_resume_is_log_exact_with_the_default_log_interval(tmp_path, capsys):
    import json
    # 4 steps per epoch, a log record every 3 steps: the epoch-end checkpoint falls inside a log window
    base = ["train", *TINY, "--epochs", "3", "--log-every", "3"]
    assert run(capsys, *base, "--output", tmp_path / "whole")[0] == 0
    assert run(capsys, *base, "--output", tmp_path / "cut", "--max-steps", "5")[0] == 0
    assert run(capsys, *base, "--output", tmp_path / "cut", "--resume")[0] == 0

    def records(name):
        with open(tmp_path / name / "log.jsonl") as f:
            return [{k: v for k, v in r.items() if k != "img_per_s"} for r in map(json.loads, f)]
    assert records("cut") == records("whole")


def test_eval_reproduces_the_validation_logged_mid_schedule(tmp_path, capsys):
    import json
    # the soft mask decays over 4 epochs, training stops after 2: the checkpoint's rate is about 0.5
    out = tmp_path / "r"
    assert run(capsys, "train", *TINY, "--epochs", "2", "--soft-mask", "linear", "--soft-mask-epochs", "4",
               "--output", out)[0] == 0
    with open(out / "log.jsonl") as f:
        logged = [r for r in map(json.loads, f) if "val_top1" in r][-1]
    code, text, _ = run(capsys, "eval", "--checkpoint", out)
    assert code == 0 and f"top-1 {logged['val_top1']:.2f}%" in text and f"loss {logged['val_loss']:.4f}" in text
    from llamavit.train import model_from_checkpoint
    assert 0.4 < model_from_checkpoint(str(out)).soft_mask_rate < 0.6


# --- a full disk, a torn log, a killed save ----------------------------------------------------------------
def test_a_full_disk_says_so_leaves_no_partial_checkpoint_and_resume_goes_on(tmp_path, capsys, monkeypatch):
    import errno
    from llamavit.train import checkpoint as ckpt_mod
    real, calls = ckpt_mod.torch.save, []

    def disk_full_on_the_second(obj, path):
        calls.append(path)
        if len(calls) == 2:
            open(path, "wb").write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path)

    monkeypatch.setattr(ckpt_mod.torch, "save", disk_full_on_the_second)
    args = ["train", *TINY, "--epochs", "2", "--ckpt-every", "2", "--output", tmp_path / "r"]
    code, _, err = run(capsys, *args)
    assert code == 2
    assert "no space left on" in err and "while writing checkpoint step-00000004; the previous checkpoint is " \
        "intact: free the space and --resume" in one_line_error(err, "train")
    assert sorted(os.listdir(tmp_path / "r" / "checkpoints")) == ["latest", "step-00000002"]   # no .tmp-* left
    monkeypatch.setattr(ckpt_mod.torch, "save", real)
    code, out, _ = run(capsys, *args, "--resume")
    assert code == 0 and '"steps": 8' in out


def test_resume_cleans_a_killed_saves_temporary_and_a_torn_log_line(tmp_path, capsys):
    import json
    args = ["train", *TINY, "--epochs", "2", "--output", tmp_path / "r"]
    assert run(capsys, "train", *TINY, "--epochs", "2", "--output", tmp_path / "whole")[0] == 0
    assert run(capsys, *args, "--max-steps", "4")[0] == 0
    stale = tmp_path / "r" / "checkpoints" / ".tmp-step-00000006-99999"   # a save killed half-way
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    with open(tmp_path / "r" / "log.jsonl", "a") as f:
        f.write('{"step": 5, "epoch": 1.25, "lo')                           # a record killed half-way
    code, out, _ = run(capsys, *args, "--resume")
    assert code == 0 and not stale.exists()

    def losses(name):
        with open(tmp_path / name / "log.jsonl") as f:
            return [r["loss"] for r in map(json.loads, f) if "loss" in r]
    assert losses("r") == losses("whole")
    with open(tmp_path / "r" / "log.jsonl", "r+") as f:                    # a damaged line inside the log
        lines = f.readlines()
        f.seek(0)
        f.writelines(lines[:1] + ["{not json\n"] + lines[1:])
    code, _, err = run(capsys, *args, "--resume")
    assert code == 2 and "log.jsonl line 2 is not a JSON record" in one_line_error(err, "train")


# --- what is accepted, and said -----------------------------------------------------------------------------
def test_yaml_scientific_floats_are_numbers(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("lr: 1e-3\nmin_lr: 5e-6\n")   # YAML 1.1 reads these as strings
    from llamavit.train import TrainConfig
    cfg = TrainConfig.from_yaml(str(tmp_path / "c.yaml"))
    assert cfg.lr == 1e-3 and cfg.min_lr == 5e-6 and isinstance(cfg.lr, float)


def test_resume_in_an_empty_directory_says_it_starts_fresh(tmp_path, capsys):
    code, out, _ = run(capsys, "train", *TINY, "--epochs", "1", "--output", tmp_path / "r", "--resume")
    assert code == 0 and "--resume: " in out and "holds no checkpoint yet; starting a fresh run" in out


def test_amp_where_bf16_is_slower_falls_back_to_float32_in_one_line(tmp_path, capsys, monkeypatch):
    from llamavit.train import step_loop
    monkeypatch.setattr(step_loop, "bf16_speedup", lambda device_type: 0.25)
    monkeypatch.setattr(step_loop, "cpu_has_native_bf16", lambda: False)
    code, _, err = run(capsys, "train", *TINY, "--epochs", "1", "--max-steps", "1", "--amp", "--output", tmp_path / "r")
    assert code == 0 and "note: --amp ignored: a bf16 matmul runs 4.0x slower than float32 on this CPU (it lacks " \
        "AVX512-BF16 / AMX); training in float32" in err
    monkeypatch.setattr(step_loop, "bf16_speedup", lambda device_type: 1.5)
    code, _, err = run(capsys, "train", *TINY, "--epochs", "1", "--max-steps", "1", "--amp", "--output", tmp_path / "s")
    assert code == 0 and "--amp" not in err


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        main(["--debug", "train", "--model", "nope"])


def test_create_model_reads_a_run_directory(trained):
    import llamavit
    from llamavit.train import model_from_checkpoint, read_meta
    run_dir, _ = trained
    meta = read_meta(str(run_dir))
    direct = llamavit.create_model(meta["model"], checkpoint_path=str(run_dir), **meta["model_kwargs"])
    ref = model_from_checkpoint(str(run_dir))
    assert all(torch.equal(a, b) for a, b in zip(direct.state_dict().values(), ref.state_dict().values()))


# --- kill -9 at any moment: the resumed run is the uninterrupted one ---------------------------------------
KILLABLE = '''
import os, sys, time
import llamavit.train.checkpoint as checkpoint
real_save = checkpoint.torch.save


def save_or_hang(obj, path):
    # the test's kill switch: at the chosen step, stop inside the checkpoint write (model.safetensors is
    # already in the temporary directory, state.pt is not) until SIGKILL arrives
    if int(obj["step"]) == int(os.environ.get("KILL_IN_SAVE_AT", "-1")):
        open(os.environ["KILL_MARKER"], "w").close()
        time.sleep(60)
    return real_save(obj, path)


checkpoint.torch.save = save_or_hang
from llamavit.cli import main
sys.exit(main(sys.argv[1:]))
'''


def _records(path):
    import json
    with open(path) as f:
        return [{k: v for k, v in r.items() if k != "img_per_s"} for r in map(json.loads, f)]


def _final_weights(run_dir):
    from llamavit.train.checkpoint import latest_checkpoint
    return load_file(os.path.join(latest_checkpoint(str(run_dir)), "model.safetensors"))


def test_sigkill_at_any_moment_resumes_to_the_uninterrupted_run(tmp_path, capsys):
    import random
    import signal
    import subprocess
    import sys
    import time
    args = ["train", *TINY, "--epochs", "4", "--ckpt-every", "2", "--log-every", "3", "--seed", "5"]
    out, marker = tmp_path / "killed", tmp_path / "in_save"
    script = tmp_path / "killable.py"
    script.write_text(KILLABLE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KILL_MARKER": str(marker)}   # one thread: the same sums

    def start(*extra, kill_in_save_at=-1, output=out):
        return subprocess.Popen([sys.executable, str(script), *map(str, args), "--output", str(output), *extra],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**env, "KILL_IN_SAVE_AT": str(kill_in_save_at)})

    assert start(output=tmp_path / "whole").wait(timeout=180) == 0   # the uninterrupted run

    # 1: inside the checkpoint write of step 6
    proc = start(kill_in_save_at=6)
    deadline = time.time() + 120
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists(), "the run never reached the checkpoint write"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    leftovers = [d for d in os.listdir(out / "checkpoints") if d.startswith(".tmp-")]
    assert leftovers and (out / "checkpoints" / "latest").read_text() == "step-00000004"   # the last complete one
    # 2-4: a chain of kills at seeded random moments, each followed by --resume
    rng = random.Random(11)
    for _ in range(3):
        proc = start("--resume")
        time.sleep(rng.uniform(2.5, 5.0))   # the interpreter starts in ~2 s, a step takes ~20 ms
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert start("--resume").wait(timeout=180) == 0
    assert _records(out / "log.jsonl") == _records(tmp_path / "whole" / "log.jsonl")
    whole, killed = _final_weights(tmp_path / "whole"), _final_weights(out)
    assert whole.keys() == killed.keys() and all(torch.equal(whole[k], killed[k]) for k in whole)
    assert not [d for d in os.listdir(out / "checkpoints") if d.startswith(".tmp-")]


def test_a_damaged_latest_checkpoint_is_set_aside_and_the_one_before_resumes(tmp_path, capsys):
    args = ["train", *TINY, "--epochs", "2", "--ckpt-every", "2", "--keep-checkpoints", "3"]
    assert run(capsys, *args, "--output", tmp_path / "whole")[0] == 0
    assert run(capsys, *args, "--output", tmp_path / "r", "--max-steps", "6")[0] == 0
    ckpts = tmp_path / "r" / "checkpoints"
    (ckpts / "step-00000006" / "state.pt").write_bytes(os.urandom(512))   # a disk that tore the newest state.pt
    code, out, err = run(capsys, *args, "--output", tmp_path / "r", "--resume")
    assert code == 0 and "step-00000006 is damaged" in out and "resuming from the one before" in out
    assert "weights_only=False" not in out + err
    assert (ckpts / "damaged-step-00000006").is_dir()                     # set aside, not deleted
    assert _records(tmp_path / "r" / "log.jsonl") == _records(tmp_path / "whole" / "log.jsonl")
    for ckpt in ckpts.glob("step-*"):                                     # every checkpoint damaged: one line
        (ckpt / "state.pt").write_bytes(b"\x80junk")
    code, _, err = run(capsys, *args, "--output", tmp_path / "r", "--resume")
    assert code == 2 and "no intact checkpoint to resume from in" in one_line_error(err, "train")
