"""`llamavit train --task points|video`: the step loop, checkpoints and exact resume for point clouds and clips,
with and without the frozen LLM block, and the errors of options that only images take."""
import json
import os

import pytest
import torch

from llamavit.cli import main
from llamavit.train import TrainConfig, Trainer, model_from_checkpoint, read_meta, train

TASKS = {
    "points": dict(task="points", model="point_encoder_tiny", num_points=64, in_chans=3,
                   model_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2, "num_groups": 8, "group_size": 8}),
    "video": dict(task="video", model="video_encoder_tiny", num_frames=4, img_size=16, in_chans=3,
                  model_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 4}),
}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cfg(tmp_path, task, name="run", **over):
    return TrainConfig(**{**TASKS[task], "data": "synthetic", "epochs": 2, "batch_size": 16, "lr": 3e-3,
                          "warmup_epochs": 0.0, "progress": False, "output": str(tmp_path / name), **over})


def _losses(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [(r["step"], r.get("loss"), r.get("val_top1")) for r in map(json.loads, f)]


@pytest.mark.parametrize("task", ["points", "video"])
@pytest.mark.parametrize("llm_path", [None, "random"])
def test_a_task_trains_checkpoints_and_resumes_exactly(tmp_path, task, llm_path):
    extra = {"model_kwargs": {**TASKS[task]["model_kwargs"], **({"llm_path": llm_path, "llm_dim": 32,
                                                                 "llm_num_heads": 4, "llm_num_kv_heads": 2,
                                                                 "llm_ffn_hidden": 64} if llm_path else {})}}
    full = train(cfg(tmp_path, task, "full", **extra))
    assert full["steps"] == 8 and 0 <= full["val_top1"] <= 100     # 64 synthetic samples, 4 steps an epoch
    train(cfg(tmp_path, task, "split", max_steps=3, **extra))
    resumed = train(cfg(tmp_path, task, "split", resume=True, **extra))
    assert resumed["resumed"] and _losses(tmp_path / "full") == _losses(tmp_path / "split")
    a = model_from_checkpoint(str(tmp_path / "full"))
    b = model_from_checkpoint(str(tmp_path / "split"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    meta = read_meta(str(tmp_path / "full"))
    assert meta["task"] == task and "transform" not in meta and meta["classes"] == [f"class_{i}" for i in range(4)]
    assert (hasattr(a, "llama") and not any(p.requires_grad for p in a.llama.parameters())) == bool(llm_path)
    inputs = Trainer(cfg(tmp_path, task, "probe")).val_set[0][0][None]
    with torch.no_grad():
        assert a.eval()(inputs).shape == (1, 4)


@pytest.mark.parametrize("task, epochs", [("points", 12), ("video", 40)])   # the clips' model idles ~30 steps first
def test_a_task_learns_the_synthetic_set(tmp_path, task, epochs):
    summary = train(cfg(tmp_path, task, epochs=epochs, label_smoothing=0.0))
    losses = [r["loss"] for r in map(json.loads, open(tmp_path / "run" / "log.jsonl")) if "loss" in r]
    assert losses[-1] < losses[0] - 0.3 and summary["val_top1"] > 25.0    # 4 classes: chance is 25 %


def test_image_only_options_are_refused_for_other_tasks(tmp_path, capsys):
    with pytest.raises(ValueError, match="mixup / cutmix mix images: --task points takes neither"):
        Trainer(cfg(tmp_path, "points", mixup=0.8))
    with pytest.raises(ValueError, match="task must be one of"):
        TrainConfig(task="audio")
    assert main(["train", "--task", "audio", "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "task must be one of ('image', 'points', 'video'), got 'audio'" in err and "Traceback" not in err


def test_the_cli_trains_a_point_cloud_folder(tmp_path, capsys):
    import numpy as np
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label, scale in (("flat", (1.0, 1.0, 0.05)), ("tall", (0.05, 0.05, 1.0))):
            os.makedirs(tmp_path / "clouds" / split / label)
            for i in range(8):
                np.save(tmp_path / "clouds" / split / label / f"{i}.npy", rng.normal(size=(80, 3)) * scale)
    assert main(["train", "--task", "points", "--model", "point_encoder_tiny", "--data", str(tmp_path / "clouds"),
                 "--num-points", "64", "--in-chans", "3", "--epochs", "1", "--batch-size", "8",
                 "--model-kwargs", "embed_dim=32", "depth=1", "num_heads=2", "num_groups=8", "group_size=8",
                 "--output", str(tmp_path / "run"), "--no-progress"]) == 0
    assert read_meta(str(tmp_path / "run"))["classes"] == ["flat", "tall"]
