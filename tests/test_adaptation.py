"""Adapting a pre-trained model (docs/adaptation.md): LoRA through peft (only adapters and head train and are
saved, merge reproduces the outputs, the base is checked by sha256), freezing by name globs, timm's layer-wise
lr decay on every family, DeiT's distillation, iLLaMA's drop_mode schedule, and their bad inputs."""
import json
import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.optim import create_optimizer_v2

import llamavit
from llamavit.cli import main
from llamavit.errors import CheckpointError
from llamavit.objectives.distillation import DistillationLoss, distillation_term
from llamavit.train import TrainConfig, model_from_checkpoint
from llamavit.train.adapt import (DropPathSchedule, LoraSettings, add_lora, apply_freezing, drop_path_factor,
                                  lora_pattern, merge_lora)

TINY = ["--model", "illama_tiny_patch16_224", "--model-kwargs", "patch_size=4", "embed_dim=32", "depth=2",
        "num_heads=2", "--data", "synthetic", "--img-size", "16", "--in-chans", "1", "--batch-size", "16",
        "--no-progress", "--warmup-epochs", "0", "--lr", "5e-3"]
# an untrained frozen LLM block of a small shape (the frozen-LLM ViT without reading a file)
LLM = dict(llm_path=None, llm_dim=32, llm_ffn_hidden=64, llm_num_heads=2, llm_num_layers=1)


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny supervised iLLaMA run: the pre-trained model every adaptation starts from."""
    run = tmp_path_factory.mktemp("base") / "run"
    assert main(["train", *TINY, "--epochs", "1", "--output", str(run)]) == 0
    return str(run)


def weights(run):
    return load_file(os.path.join(llamavit.train.resolve_checkpoint(run), "model.safetensors"))


def images(n=4):
    return torch.randn(n, 1, 16, 16, generator=torch.Generator().manual_seed(0))


def finetune(base, out, *flags):
    return main(["finetune", "--checkpoint-path", base, "--data", "synthetic", "--epochs", "1", "--batch-size", "16",
                 "--no-progress", "--warmup-epochs", "0", "--lr", "5e-3", "--output", str(out), *flags])


# --- LoRA ----------------------------------------------------------------------------------------------
def test_lora_trains_and_saves_only_adapters_and_head_and_merges_to_the_same_outputs(base_run, tmp_path, capsys):
    capsys.readouterr()
    run = tmp_path / "lora"
    assert finetune(base_run, run, "--lora-rank", "4", "--lora-targets", "qkv,proj,mlp", "--merge") == 0
    out = capsys.readouterr()
    assert "trainable parameters:" in out.err
    summary = json.loads(out.out[out.out.index("{\n"):])
    saved = weights(str(run))
    assert saved and all(".lora_" in k or k.startswith("head.") for k in saved), sorted(saved)[:5]
    assert {k for k in saved if k.startswith("head.")} == {"head.weight", "head.bias"}
    # adapters of every target in both blocks: qkv, proj, fc1_g, fc1_x, fc2 x (A, B) x 2 blocks
    assert len([k for k in saved if ".lora_" in k]) == 5 * 2 * 2
    assert summary["trainable_parameters"] == sum(v.numel() for v in saved.values())
    assert summary["trainable_parameters"] < 0.25 * summary["total_parameters"]

    meta = llamavit.train.read_meta(str(run))
    base_file = os.path.join(llamavit.train.resolve_checkpoint(base_run), "model.safetensors")
    assert meta["lora"]["base"]["path"] == os.path.abspath(base_file)
    assert meta["lora"]["rank"] == 4 and meta["lora"]["alpha"] == 4.0

    # the trunk of the base is untouched: the adapted model minus its adapters is the base
    adapted = model_from_checkpoint(str(run)).eval()
    base = weights(base_run)
    state = adapted.state_dict()
    assert torch.equal(state["blocks.0.attn.qkv.base_layer.weight"], base["blocks.0.attn.qkv.weight"])
    assert torch.equal(state["blocks.1.norm1.weight"], base["blocks.1.norm1.weight"])
    assert not torch.equal(saved["head.weight"], base["head.weight"])   # the head did train
    assert any(saved[k].abs().sum() > 0 for k in saved if "lora_B" in k)   # B starts at 0: it moved

    # merged: a plain checkpoint with the original names and the same outputs
    merged_dir = summary["merged"]
    assert os.path.dirname(merged_dir) == str(run / "merged")
    merged = llamavit.create_model("illama_tiny_patch16_224", checkpoint_path=str(run / "merged"),
                                   **meta["model_kwargs"]).eval()
    assert "blocks.0.attn.qkv.weight" in merged.state_dict()
    x = images()
    with torch.no_grad():
        assert (merged(x) - adapted(x)).abs().max() <= 1e-5
        assert (model_from_checkpoint(str(run / "merged")).eval()(x) - adapted(x)).abs().max() <= 1e-5


def test_lora_run_is_refused_when_its_base_checkpoint_changed(base_run, tmp_path):
    base_copy = tmp_path / "base"
    shutil.copytree(base_run, base_copy)
    run = tmp_path / "lora"
    assert finetune(str(base_copy), run, "--lora-rank", "2") == 0
    model_from_checkpoint(str(run))   # loads while the base is as it was
    file = os.path.join(llamavit.train.resolve_checkpoint(str(base_copy)), "model.safetensors")
    state = load_file(file)
    state["blocks.0.norm1.weight"] += 1
    from safetensors.torch import save_file
    save_file(state, file, metadata={"format": "llamavit"})
    with pytest.raises(CheckpointError, match="the LoRA run was trained on .* with sha256 .* but the file now has"):
        model_from_checkpoint(str(run))


def test_lora_resume_continues_exactly(base_run, tmp_path):
    flags = ["--lora-rank", "2", "--epochs", "2", "--log-every", "1"]
    assert finetune(base_run, tmp_path / "whole", *flags) == 0
    assert finetune(base_run, tmp_path / "cut", *flags, "--max-steps", "5") == 0
    assert finetune(base_run, tmp_path / "cut", *flags, "--resume") == 0

    def losses(run):
        return [r["loss"] for r in llamavit.train.step_loop.read_log(str(run / "log.jsonl")) if "loss" in r]
    assert losses(tmp_path / "cut") == pytest.approx(losses(tmp_path / "whole"), abs=1e-6)
    assert weights(str(tmp_path / "cut")).keys() == weights(str(tmp_path / "whole")).keys()


@pytest.mark.parametrize("name, kwargs, adapted", [
    ("visionllama_pyramid_small_224", dict(embed_dims=(16, 16, 16, 16), depths=(1, 2, 1, 1), num_heads=(1, 1, 1, 1),
                                           wss=(2, 2, 2, 1), img_size=32), "blocks.1.1.attn.kv"),
    ("aim_600m_patch14_224", dict(embed_dim=32, depth=2, num_heads=2, probe_layers=1, img_size=28),
     "trunk.blocks.1.attn.qkv"),
    ("vit_smollm2_tiny_patch16_224", dict(LLM, embed_dim=32, depth=2, num_heads=2, img_size=32),
     "blocks.1.attn.qkv"),
])
def test_lora_adapts_the_trunk_blocks_of_every_family(name, kwargs, adapted):
    model = llamavit.create_model(name, num_classes=3, **kwargs).eval()
    add_lora(model, LoraSettings(rank=2, alpha=4.0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert f"{adapted}.lora_A.default.weight" in trainable
    head = {n for n, _ in model.named_parameters() if n.startswith("head.")}   # AIM: the whole attentive probe
    assert head and head <= set(trainable)
    assert all(".lora_" in n or n in head for n in trainable)
    assert not any("llama." in n for n in trainable)   # the frozen LLM block gets no adapter
    x = torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"])
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    with torch.no_grad():
        y = model(x)
        assert (merge_lora(model)(x) - y).abs().max() <= 1e-5
    assert not any(".lora_" in n for n, _ in model.named_parameters())


def test_lora_pattern_names_the_documented_layers():
    import re
    pattern = lora_pattern(["qkv", "mlp"])
    for name in ("blocks.3.attn.qkv", "blocks.2.5.attn.q", "trunk.blocks.0.mlp.fc1", "blocks.0.mlp.fc1_g"):
        assert re.fullmatch(pattern, name), name
    for name in ("blocks.3.attn.proj", "head.k", "llama.layers.0.attn.wq", "llama_dim_mapper1"):
        assert not re.fullmatch(pattern, name), name


# --- freezing --------------------------------------------------------------------------------------------
def test_freeze_patterns_freeze_what_they_name_and_nothing_else(base_run, tmp_path):
    run = tmp_path / "frozen"
    assert finetune(base_run, run, "--freeze", "blocks.0.*", "patch_embed.*") == 0
    before, after = weights(base_run), weights(str(run))
    for key in after:
        if key.startswith(("blocks.0.", "patch_embed.")):
            assert torch.equal(after[key], before[key]), key
    assert not torch.equal(after["blocks.1.attn.qkv.weight"], before["blocks.1.attn.qkv.weight"])
    assert not torch.equal(after["blocks.1.norm1.weight"], before["blocks.1.norm1.weight"])
    config = json.load(open(run / "config.json"))
    assert config["freeze"] == ["blocks.0.*", "patch_embed.*"]
    assert 0 < config["parameters"]["trainable"] < config["parameters"]["total"]


def test_trainable_patterns_keep_only_what_they_name():
    model = llamavit.create_model("vit_smollm2_tiny_patch16_224", **LLM, embed_dim=32, depth=2, num_heads=2,
                                  img_size=32, num_classes=3)
    # LM4VisualEncoding's ask: the ViT and the LLM block frozen, the two adapters and the head trained
    apply_freezing(model, trainable=["llama_dim_mapper*", "head.*"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"llama_dim_mapper1.weight", "llama_dim_mapper2.weight", "head.weight", "head.bias"}


def test_a_pattern_that_matches_nothing_is_refused():
    model = llamavit.create_model("illama_tiny_patch16_224", embed_dim=32, depth=1, num_heads=2, num_classes=2)
    with pytest.raises(ValueError, match=r"--freeze pattern 'block.\*' matches no parameter of ILLaMA \(names look"):
        apply_freezing(model, freeze=["block.*"])
    with pytest.raises(ValueError, match="leave no parameter to train"):
        apply_freezing(model, freeze=["*"])


# --- layer-wise learning-rate decay ----------------------------------------------------------------------
@pytest.mark.parametrize("name, kwargs, depth, block_param", [
    ("illama_tiny_patch16_224", dict(depth=3), 3, "blocks.{}.attn.qkv.weight"),
    ("visionllama_small_patch16_224", dict(depth=3, embed_dim=32, num_heads=2), 3, "blocks.{}.mlp.fc2.weight"),
    ("aim_600m_patch14_224", dict(embed_dim=32, depth=3, num_heads=2, probe_layers=1), 3,
     "trunk.blocks.{}.attn.qkv.weight"),
    ("vit_smollm2_tiny_patch16_224", dict(LLM, depth=3), 3, "blocks.{}.attn.qkv.weight"),
])
def test_layer_decay_scales_each_block_as_timm_computes(name, kwargs, depth, block_param):
    model = llamavit.create_model(name, num_classes=3, **kwargs)
    opt = create_optimizer_v2(model, "adamw", lr=1.0, weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    # timm: layer i of the L + 2 groups (stem, blocks, the rest) gets decay ** (L + 1 - i)
    for i in range(depth):
        assert scale[id(params[block_param.format(i)])] == pytest.approx(0.5 ** (depth - i))
    head = next(iter(model.get_classifier().parameters()))
    assert scale[id(head)] == 1.0
    stem = next(p for n, p in params.items() if "patch" in n and p.requires_grad)
    assert scale[id(stem)] == pytest.approx(0.5 ** (depth + 1))


def test_layer_decay_flag_reaches_the_optimizer(tmp_path):
    from llamavit.train import Trainer
    cfg = TrainConfig.from_dict(dict(model="illama_tiny_patch16_224", model_kwargs=dict(patch_size=4, embed_dim=32,
                                depth=2, num_heads=2), data="synthetic", img_size=16, in_chans=1, batch_size=16,
                                epochs=1, layer_decay=0.75, output=str(tmp_path / "r"), progress=False))
    scales = sorted({round(g["lr_scale"], 6) for g in Trainer(cfg).optimizer.param_groups})
    assert scales == [round(0.75 ** k, 6) for k in (3, 2, 1, 0)]


# --- distillation ---------------------------------------------------------------------------------------------
def test_distillation_terms_against_a_hand_example():
    student = torch.tensor([[2.0, 0.0, -1.0]])
    teacher = torch.tensor([[0.0, 1.0, 0.0]])
    tau = 2.0
    p_t = torch.softmax(teacher / tau, 1)
    log_p_s = torch.log_softmax(student / tau, 1)
    kl = (p_t * (p_t.log() - log_p_s)).sum()
    assert distillation_term(student, teacher, "soft", tau) == pytest.approx((kl * tau * tau / 3).item(), rel=1e-5)
    hard = -torch.log_softmax(student, 1)[0, 1]   # the teacher's argmax is class 1
    assert distillation_term(student, teacher, "hard") == pytest.approx(hard.item(), rel=1e-6)


def test_distillation_loss_mixes_the_terms_and_keeps_the_teacher_out_of_the_module():
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    teacher.train()
    loss = DistillationLoss(torch.nn.CrossEntropyLoss(), teacher, "hard", alpha=0.25)
    x, labels = torch.randn(5, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1])
    logits = torch.randn(5, 3, requires_grad=True)
    out = loss(x, logits, labels)
    expected = 0.75 * F.cross_entropy(logits, labels) + 0.25 * F.cross_entropy(logits, teacher(x).argmax(1))
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert list(loss.state_dict()) == [] and "teacher" not in dict(loss.named_children())


def test_distillation_run_saves_only_the_student(base_run, tmp_path):
    run = tmp_path / "student"
    assert main(["train", *TINY, "--epochs", "1", "--teacher", base_run, "--distill", "soft", "--distill-tau", "2",
                 "--output", str(run)]) == 0
    assert weights(str(run)).keys() == weights(base_run).keys()
    record = next(r for r in llamavit.train.step_loop.read_log(str(run / "log.jsonl")) if "distill_loss" in r)
    assert math.isfinite(record["distill_loss"]) and record["distill_loss"] > 0


def test_a_teacher_of_other_classes_is_refused(base_run, tmp_path, capsys, monkeypatch):
    meta_classes = llamavit.train.read_meta(base_run)["classes"]
    from llamavit.train import supervised
    with pytest.raises(CheckpointError, match=f"predicts {len(meta_classes)} classes .* but the student 2"):
        supervised.load_teacher(base_run, ["a", "b"], "cpu")


# --- iLLaMA's drop_mode -------------------------------------------------------------------------------------
def test_drop_path_factor_follows_the_official_modes():
    assert [drop_path_factor(s, 10, "standard", "constant", 2) for s in (0, 19, 20)] == [1.0, 1.0, 1.0]
    assert [drop_path_factor(s, 10, "early", "constant", 2) for s in (0, 19, 20)] == [1.0, 1.0, 0.0]
    assert [drop_path_factor(s, 10, "early", "linear", 2) for s in (0, 19, 20)] == [1.0, 0.0, 0.0]
    assert drop_path_factor(10, 10, "early", "linear", 2) == pytest.approx(1 - 10 / 19)
    assert [drop_path_factor(s, 10, "late", "constant", 2) for s in (0, 19, 20)] == [0.0, 0.0, 1.0]


def test_drop_path_schedule_scales_the_models_own_rates():
    model = llamavit.create_model("illama_tiny_patch16_224", depth=3, drop_path_rate=0.3)
    schedule = DropPathSchedule(model)
    rates = [m.drop_prob for m in schedule.modules]
    assert rates == pytest.approx([0.15, 0.3])   # the model's ramp (block 0 has none)
    schedule.set_factor(0.5)
    assert [m.drop_prob for m in schedule.modules] == pytest.approx([0.075, 0.15])
    schedule.set_factor(1.0)
    assert schedule.rate == pytest.approx(0.3)


# --- bad input -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    (dict(lora_rank=-1), "lora_rank must be >= 0"),
    (dict(lora_alpha=8.0), "lora_alpha configure LoRA adapters: give --lora-rank >= 1"),
    (dict(merge=True), "merge configure LoRA adapters"),
    (dict(lora_rank=4), "LoRA adapts a pre-trained model: give --checkpoint-path"),
    (dict(lora_rank=4, checkpoint_path="x", lora_targets=("qkv", "ffn")), r"lora_targets must name some of"),
    (dict(distill="soft"), "distillation needs both --teacher"),
    (dict(drop_mode="early", drop_path=0.1), "needs --drop-cutoff-epochs > 0"),
    (dict(drop_mode="late"), "give --drop-path"),
    (dict(layer_decay=0.0), r"layer_decay must be in \(0, 1\]"),
])
def test_bad_adaptation_options_give_one_line(options, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**options)


@pytest.mark.parametrize("name", ["finetune_mae_visionllama_base.yaml", "fmnist_frozen_llm_adapters.yaml"])
def test_the_adaptation_recipes_are_valid_configs(name):
    path = os.path.join(os.path.dirname(__file__), "..", "configs", name)
    cfg = TrainConfig.from_yaml(path, checkpoint_path="runs/x")
    assert cfg.layer_decay == 0.65 or cfg.trainable == ("llama_dim_mapper*", "head.*")
