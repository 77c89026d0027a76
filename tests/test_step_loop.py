"""The one step loop under every trainer: the same flags, gradient accumulation that keeps the curve, exact
resume of a probe, EMA (DiT's warm-up as a ModelEmaV3), bf16 autocast, and no checkpoint of broken weights."""
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from timm.utils import ModelEmaV3

from llamavit.cli import build_parser, main
from llamavit.errors import NonFiniteLossError
from llamavit.train import (GenerateConfig, GenerativeTrainer, PretrainConfig, Pretrainer, ProbeConfig, Prober,
                            StepLoop, TrainConfig, Trainer)
from llamavit.train.checkpoint import latest_checkpoint, read_meta
from llamavit.train.generate import DiTEma

LOOP_FLAGS = ("--resume", "--amp", "--grad-accum-steps", "--compile", "--fsdp", "--ema-decay", "--max-steps",
              "--ckpt-every", "--grad-checkpointing", "--clip-grad")
AIM_TRUNK = dict(embed_dim=32, depth=2, num_heads=2, patch_size=8, probe_layers=1)
DIT = dict(embed_dim=32, depth=2, num_heads=2, patch_size=4, class_dropout_prob=0.0)


def help_text(capsys, *command) -> str:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*command, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", [("train",), ("finetune",), ("pretrain", "aim"), ("probe",),
                                     ("generate", "train")])
def test_every_trainer_takes_the_loop_flags(capsys, command):
    text = help_text(capsys, *command)
    missing = [flag for flag in LOOP_FLAGS if flag not in text]
    assert not missing, f"llamavit {' '.join(command)} lacks {missing}"


def aim_cfg(tmp_path, name, **kwargs):
    base = dict(model="aim_600m_patch14_224", model_kwargs=AIM_TRUNK, img_size=32, data="synthetic", decoder_dim=32,
                decoder_depth=1, epochs=2, batch_size=16, lr=3e-3, warmup_frac=0.1, output=str(tmp_path / name),
                progress=False, log_every=1, prefix_min=6, prefix_max=6)
    return PretrainConfig(**{**base, **kwargs})


def dit_cfg(tmp_path, name, **kwargs):
    base = dict(model="dit_llama_s_2", model_kwargs=DIT, data="synthetic", img_size=16, epochs=1, batch_size=8,
                output=str(tmp_path / name), progress=False, log_every=1, ema_decay=0.99)
    return GenerateConfig(**{**base, **kwargs})


def losses(summary_dir) -> dict:
    with open(os.path.join(summary_dir, "log.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.mark.parametrize("make,trainer", [(aim_cfg, Pretrainer), (dit_cfg, GenerativeTrainer)])
def test_gradient_accumulation_keeps_the_curve(tmp_path, make, trainer):
    # AIM with a fixed prefix length and DiT without label dropout: every sample weighs the same, so two
    # micro-batches of 8 must give the curve of one batch of 16 (the step's random draws are made once)
    trainer(make(tmp_path, "whole")).fit()
    trainer(make(tmp_path, "accum", grad_accum_steps=2)).fit()
    whole, accum = losses(tmp_path / "whole"), losses(tmp_path / "accum")
    assert sorted(whole) == sorted(accum) and len(whole) >= 4
    for step in whole:
        assert accum[step] == pytest.approx(whole[step], rel=1e-4, abs=1e-5), step


def probe_cfg(tmp_path, name, **kwargs):
    base = dict(model="aim_600m_patch14_224", model_kwargs=AIM_TRUNK, img_size=32, data="synthetic", head="linear",
                epochs=3, batch_size=16, lr=3e-3, output=str(tmp_path / name), progress=False, log_every=1)
    return ProbeConfig(**{**base, **kwargs})


def test_probe_runs_on_the_loop_logs_and_resumes_exactly(tmp_path):
    straight = Prober(probe_cfg(tmp_path, "straight")).fit()
    Prober(probe_cfg(tmp_path, "stopped", max_steps=5)).fit()
    resumed = Prober(probe_cfg(tmp_path, "stopped", resume=True)).fit()
    assert resumed["resumed"] is True and resumed["steps"] == straight["steps"] == 12
    assert losses(tmp_path / "stopped") == pytest.approx(losses(tmp_path / "straight"), rel=1e-6)
    # one validation record per epoch, in the log and in the summary's history
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    assert resumed["val_top1"] == pytest.approx(straight["val_top1"]) and 0 <= resumed["val_top1"] <= 100
    ckpt = latest_checkpoint(str(tmp_path / "stopped"))
    meta = read_meta(ckpt)
    assert meta["probe_head"] == "linear" and meta["trunk"]["model"] == "aim_600m_patch14_224"
    head = load_file(str(tmp_path / "stopped" / "head.safetensors"))
    assert head["linear.weight"].shape == (4, 32)


def test_dit_ema_warmup_is_a_model_ema_v3():
    model = torch.nn.Linear(3, 2)
    ema = DiTEma(model, decay=0.9999)
    assert isinstance(ema, ModelEmaV3)
    assert [ema.get_decay(s) for s in (1, 10, 10 ** 6)] == pytest.approx([2 / 11, 11 / 20, 0.9999])
    before = ema.module.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=1)   # ema = d * ema + (1 - d) * weights, d = 2 / 11
    torch.testing.assert_close(ema.module.weight, before + 9 / 11)


def test_generative_training_updates_the_ema_with_the_warmup(tmp_path):
    trainer = GenerativeTrainer(dit_cfg(tmp_path, "ema", max_steps=2))
    assert isinstance(trainer.ema, DiTEma)
    trainer.fit()
    weights = load_file(os.path.join(latest_checkpoint(str(tmp_path / "ema")), "ema.safetensors"))
    assert weights.keys() == trainer.model.state_dict().keys()
    # after 2 steps with decay (1 + s) / (10 + s) the average is near the weights, not the initialisation
    w = trainer.model.state_dict()["final_layer.linear.weight"]
    assert 0 < (weights["final_layer.linear.weight"] - w).abs().max() < w.abs().max()
    plain = GenerativeTrainer(dit_cfg(tmp_path, "plain", ema_warmup=False))
    assert type(plain.ema) is ModelEmaV3


@pytest.mark.parametrize("make,trainer", [(aim_cfg, Pretrainer), (dit_cfg, GenerativeTrainer),
                                          (probe_cfg, Prober)])
def test_bf16_autocast_on_every_trainer(tmp_path, make, trainer):
    t = trainer(make(tmp_path, "amp", amp=True, max_steps=2))
    summary = t.fit()
    assert summary["steps"] == 2 and math.isfinite(summary["final_train_loss"])
    assert all(p.dtype == torch.float32 for p in t.module.parameters())   # master weights stay float32


def test_weights_that_became_nan_are_never_checkpointed(tmp_path):
    cfg = TrainConfig(model="illama_tiny_patch16_224", model_kwargs=dict(embed_dim=32, depth=1, num_heads=2,
                      patch_size=8), img_size=32, data="synthetic", epochs=1, batch_size=16, output=str(tmp_path / "r"),
                      progress=False, ckpt_every=1)
    trainer = Trainer(cfg)
    real_step = trainer.optimizer.step

    def step_then_break():   # a finite loss whose update breaks the weights (a learning rate far too high)
        real_step()
        if trainer.step == 2:
            with torch.no_grad():
                trainer.model.head.weight.fill_(float("inf"))

    trainer.optimizer.step = step_then_break
    with pytest.raises(NonFiniteLossError, match=r"the weights became NaN or infinite at step 3 \(is the learning "
                                                 r"rate too high\?\); training stopped, nothing was saved after the "
                                                 r"last good checkpoint, .*step-00000002"):
        trainer.fit()
    good = latest_checkpoint(cfg.output)
    assert os.path.basename(good) == "step-00000002"
    assert all(torch.isfinite(v).all() for v in load_file(os.path.join(good, "model.safetensors")).values())


def test_the_cli_reports_a_non_finite_stop_in_one_line(tmp_path, capsys):
    code = main(["train", "--model", "illama_tiny_patch16_224", "--model-kwargs", "embed_dim=32", "depth=1",
                 "num_heads=2", "patch_size=8", "--img-size", "32", "--data", "synthetic", "--epochs", "1",
                 "--batch-size", "16", "--lr", "1e30", "--warmup-epochs", "0", "--output", str(tmp_path / "r"),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("llamavit: train: error: ") and ("is nan at step" in err or "became NaN or infinite" in err)


def test_a_trainer_supplies_only_its_loss():
    own = {name for name in ("train_step", "fit", "save", "restore") if name in Pretrainer.__dict__}
    assert not own, f"Pretrainer redefines the loop's {own}"
    for cls in (Trainer, Pretrainer, GenerativeTrainer, Prober):
        assert issubclass(cls, StepLoop) and "loss" in cls.__dict__ and "train_step" not in cls.__dict__


@pytest.mark.slow
def test_compiled_pretraining_follows_the_eager_curve(tmp_path):
    Pretrainer(aim_cfg(tmp_path, "eager", max_steps=3)).fit()
    Pretrainer(aim_cfg(tmp_path, "compiled", max_steps=3, compile=True)).fit()
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-3, abs=1e-4)


def supervised_cfg(tmp_path, name, **kwargs):
    base = dict(model="illama_tiny_patch16_224", model_kwargs=dict(patch_size=8, embed_dim=32, depth=2, num_heads=2),
                img_size=32, data="synthetic", train_subset=64, val_subset=16, batch_size=16, lr=1e-3,
                warmup_epochs=0.5, output=str(tmp_path / name), progress=False, log_every=1)
    return TrainConfig(**{**base, **kwargs})


def test_a_fractional_schedule_ends_inside_an_epoch_and_evaluates(tmp_path):
    summary = Trainer(supervised_cfg(tmp_path, "frac", epochs=1.5)).fit()   # 4 steps per epoch
    assert summary["steps"] == 6 and summary["epochs"] == 1.5
    assert "val_top1" in summary and 0 <= summary["val_top1"] <= 100
    evaluated = [r["step"] for r in map(json.loads, open(tmp_path / "frac" / "log.jsonl")) if "val_top1" in r]
    assert evaluated == [4, 6]   # the epoch end (eval_every 1) and the end of the schedule


def test_a_schedule_re_planned_on_resume_follows_the_longer_plan(tmp_path):
    # bench/fmnist_race.py's re-planning: stop at the epoch end of a 1.25-epoch plan, go on under a 2.5-epoch plan;
    # the steps after the change follow the learning rates of a run planned for 2.5 epochs from the start
    Trainer(supervised_cfg(tmp_path, "replan", epochs=1.25, max_steps=4)).fit()
    Trainer(supervised_cfg(tmp_path, "replan", epochs=2.5, resume=True, allow_config_change=True)).fit()
    Trainer(supervised_cfg(tmp_path, "planned", epochs=2.5)).fit()
    lrs = {}
    for name in ("replan", "planned"):
        lrs[name] = {r["step"]: r["lr"] for r in map(json.loads, open(tmp_path / name / "log.jsonl")) if "lr" in r}
    assert sorted(lrs["replan"]) == list(range(1, 11))
    for step in range(5, 11):
        assert lrs["replan"][step] == pytest.approx(lrs["planned"][step]), step
    with pytest.raises(ValueError, match="--resume with other options.*epochs 2.5 -> 3"):
        Trainer(supervised_cfg(tmp_path, "replan", epochs=3, resume=True)).fit()
