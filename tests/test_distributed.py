"""torchrun training on CPU (gloo): 2 processes follow the 1-process loss curve and resume after a stop."""
import json
import os
import subprocess
import sys

import pytest

from llamavit.train.step_loop import EpochBatchSampler

MODEL_ARGS = ["--model", "visionllama_small_patch16_224", "--model-kwargs", "embed_dim=32", "depth=2", "num_heads=2",
              "patch_size=8", "mlp_multiple_of=8", "--img-size", "32"]
# dropout, drop path and mixup draw per rank: none here, so the curves must agree to float tolerance
COMMON = ["--data", "synthetic", "--train-subset", "64", "--val-subset", "32", "--batch-size", "16", "--epochs", "2",
          "--lr", "1e-3", "--warmup-epochs", "0", "--log-every", "1", "--no-progress", "--label-smoothing", "0",
          "--hflip", "0", "--seed", "3"]


def run(output, nproc, *extra, command=("train", *MODEL_ARGS, *COMMON)):
    """A `llamavit` command (default: `train` of a tiny model) in one process, or under torchrun with nproc
    gloo processes on this CPU; -> ({step: loss}, evaluation records) from its log."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    launcher = [sys.executable, "-m", "llamavit.cli"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "llamavit.cli"]
    proc = subprocess.run([*launcher, *command, "--output", str(output), *extra],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    with open(os.path.join(output, "log.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return ({r["step"]: r["loss"] for r in records if "loss" in r},
            [r for r in records if "val_top1" in r])


def test_batches_are_split_between_ranks():
    whole = list(EpochBatchSampler(40, 8, seed=1))
    ranks = [list(EpochBatchSampler(40, 8, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert all(len(b) == 4 for r in ranks for b in r)
    assert [a + b for a, b in zip(*ranks)] == whole
    with pytest.raises(ValueError, match="divisible by the 3 processes"):
        EpochBatchSampler(40, 8, seed=1, world_size=3)


def test_two_gloo_processes_match_one_process_and_resume(tmp_path):
    one, one_eval = run(tmp_path / "one", 1)
    two, two_eval = run(tmp_path / "two", 2)
    with open(tmp_path / "two" / "config.json") as f:
        assert json.load(f)["world_size"] == 2
    assert sorted(one) == sorted(two) == list(range(1, 9))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4, abs=1e-5), f"step {step}: {two[step]} vs {one[step]}"
    # validation runs sharded over the ranks and is all-reduced: the same numbers
    assert [r["val_top1"] for r in two_eval] == pytest.approx([r["val_top1"] for r in one_eval], abs=1e-6)
    assert [r["val_loss"] for r in two_eval] == pytest.approx([r["val_loss"] for r in one_eval], rel=1e-4)
    # gradient accumulation in one process: the same global batch, the same curve
    accum, _ = run(tmp_path / "accum", 1, "--grad-accum-steps", "2")
    assert [accum[s] for s in sorted(accum)] == pytest.approx([one[s] for s in sorted(one)], rel=1e-4, abs=1e-5)
    # stop 2 processes after 3 steps, resume in 1 process: the remaining losses are the uninterrupted ones
    run(tmp_path / "stopped", 2, "--max-steps", "3")
    resumed, _ = run(tmp_path / "stopped", 1, "--resume")
    assert sorted(resumed) == list(range(1, 9))
    for step in range(4, 9):
        assert resumed[step] == pytest.approx(one[step], rel=1e-4, abs=1e-5)


def test_fsdp_run_resumes_in_one_plain_process(tmp_path):
    """FSDP2 over 2 gloo processes, stopped after 2 steps, resumed without FSDP in 1 process: the curve
    continues where the plain 1-process run would be."""
    one, _ = run(tmp_path / "one", 1, "--max-steps", "4")
    sharded, _ = run(tmp_path / "fsdp", 2, "--fsdp", "--max-steps", "2")
    assert [sharded[s] for s in (1, 2)] == pytest.approx([one[s] for s in (1, 2)], rel=1e-4, abs=1e-5)
    resumed, _ = run(tmp_path / "fsdp", 1, "--resume", "--max-steps", "4")
    assert [resumed[s] for s in (3, 4)] == pytest.approx([one[s] for s in (3, 4)], rel=1e-4, abs=1e-5)


def test_bad_distributed_settings_are_explained(tmp_path):
    from llamavit.train import TrainConfig, Trainer
    base = dict(model="visionllama_small_patch16_224", img_size=32, data="synthetic", batch_size=16, progress=False,
                output=str(tmp_path), model_kwargs=dict(embed_dim=16, depth=1, num_heads=2, patch_size=8,
                                                        mlp_multiple_of=8))
    with pytest.raises(ValueError, match=r"batch_size 16 \(global\) must be divisible by processes x "
                                         r"grad_accum_steps = 1 x 3"):
        Trainer(TrainConfig.from_dict({**base, "grad_accum_steps": 3}))
    with pytest.raises(ValueError, match="launch with torchrun"):
        Trainer(TrainConfig.from_dict({**base, "fsdp": True}))
    with pytest.raises(ValueError, match="EMA of an FSDP-sharded model"):
        Trainer(TrainConfig.from_dict({**base, "fsdp": True, "ema_decay": 0.99}))
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu' or 'cuda'"):
        Trainer(TrainConfig.from_dict({**base, "device": "tpu"}))


# the command: AIM pre-training of a tiny AIM; a fixed prefix length makes every sample weigh the
# same in the loss, so micro-batch means average to the global-batch mean and the curves must agree
AIM = ("pretrain", "aim", "--model", "aim_600m_patch14_224", "--model-kwargs", "patch_size=4", "embed_dim=64",
       "depth=2", "num_heads=2", "probe_layers=2", "--img-size", "28", "--in-chans", "1", "--decoder-dim", "64",
       "--decoder-depth", "1", "--data", "synthetic", "--batch-size", "16", "--device", "cpu", "--log-every", "1",
       "--no-progress", "--prefix-min", "20", "--prefix-max", "20")


def test_aim_pretraining_with_fsdp_on_two_processes_resumes_in_one(tmp_path):
    """`pretrain aim --fsdp --grad-accum-steps 2` on 2 gloo processes for 6 steps (checkpoint every 3), then the
    same without torchrun / --fsdp to step 8 with --resume: the curve is the one-process curve throughout."""
    one, _ = run(tmp_path / "one", 1, "--grad-accum-steps", "2", "--max-steps", "8", command=AIM)
    sharded, _ = run(tmp_path / "run", 2, "--fsdp", "--grad-accum-steps", "2", "--max-steps", "6", "--ckpt-every", "3",
                     command=AIM)
    assert sorted(sharded) == list(range(1, 7))
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "step-00000006")
    resumed, _ = run(tmp_path / "run", 1, "--grad-accum-steps", "2", "--max-steps", "8", "--ckpt-every", "3",
                     "--resume", command=AIM)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(1, 9):
        got = sharded[step] if step <= 6 else resumed[step]
        assert got == pytest.approx(one[step], rel=1e-4, abs=1e-5), f"step {step}: {got} vs {one[step]}"
    with open(tmp_path / "run" / "summary.json") as f:
        assert json.load(f)["resumed"] is True
