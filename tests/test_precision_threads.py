"""--amp only where bf16 is faster (measured once per process), and --threads on every command."""
import json

import pytest
import torch

from llamavit.cli import main
from llamavit.train import TrainConfig, Trainer
from llamavit.train import distributed, step_loop

TINY = dict(patch_size=8, embed_dim=32, depth=1, num_heads=2)


def tiny_cfg(tmp_path, **over):
    return TrainConfig(**{"model": "illama_tiny_patch16_224", "model_kwargs": dict(TINY), "img_size": 32,
                          "in_chans": 3, "data": "synthetic", "epochs": 1, "batch_size": 16, "progress": False,
                          "output": str(tmp_path / "run"), "crop_pct": 1.0, **over})


def test_the_bf16_speedup_is_measured_once_per_process():
    distributed.bf16_speedup.cache_clear()
    first = distributed.bf16_speedup("cpu", size=64, repeats=2)
    assert first > 0 and distributed.bf16_speedup("cpu", size=64, repeats=2) == first     # cached
    assert distributed.bf16_speedup.cache_info().hits >= 1
    assert distributed.bf16_speedup("cuda") == float("inf")


@pytest.mark.parametrize("speedup, in_effect", [(0.4, False), (1.6, True)])
def test_amp_runs_only_where_bf16_is_faster(tmp_path, capsys, monkeypatch, speedup, in_effect):
    monkeypatch.setattr(step_loop, "bf16_speedup", lambda device_type: speedup)
    trainer = Trainer(tiny_cfg(tmp_path, amp=True, max_steps=2))
    assert trainer.amp is in_effect
    err = capsys.readouterr().err
    if in_effect:
        assert "--amp ignored" not in err
    else:
        assert "note: --amp ignored: a bf16 matmul runs 2.5x slower than float32 on this CPU" in err
        assert "training in float32" in err and len([line for line in err.splitlines() if "--amp" in line]) == 1
    trainer.fit()
    assert json.load(open(tmp_path / "run" / "config.json"))["amp_in_effect"] is in_effect
    assert Trainer(tiny_cfg(tmp_path / "b")).amp is False                  # no --amp: never autocast


def test_every_command_takes_threads(tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        assert main(["models", "illama_tiny*", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
        assert main(["info", "illama_tiny_patch16_224", "--threads", "0"]) == 2
        assert "--threads must be >= 1, got 0" in capsys.readouterr().err
        # a nested command (analyze activations) takes it too, and the training commands
        with pytest.raises(SystemExit) as e:
            main(["analyze", "activations", "--help"])
        assert e.value.code == 0 and "--threads" in capsys.readouterr().out
        with pytest.raises(SystemExit):
            main(["train", "--help"])
        assert "--threads" in capsys.readouterr().out
    finally:
        torch.set_num_threads(before)
