"""`llamavit export`: ONNX files checked with onnxruntime and timm folders, per family; timm folders wherever a
checkpoint goes (eval, predict, create_model, model_from_checkpoint); --tensorboard; the one-line refusals."""
import json
import os
import shutil
import sys
from dataclasses import asdict

import numpy as np
import pytest
import timm
import torch
from llm_files import TinyLLM, write_meta

import llamavit
from llamavit.cli import main
from llamavit.data import TransformConfig
from llamavit.errors import ExportError
from llamavit.export import export_checkpoint, onnx_session, verify_onnx
from llamavit.train import model_from_checkpoint, read_meta
from llamavit.train.checkpoint import save_weights

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["ant", "bee", "cat", "dog"]
# family -> (registered name, tiny options, image size)
FAMILIES = {
    "illama": ("illama_tiny_patch16_224", dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, soft_mask_rate=0.4),
               32),
    "visionllama": ("visionllama_small_patch16_224", dict(patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                                          mlp_multiple_of=8, init_values=0.5), 32),
    "visionllama_pyramid": ("visionllama_pyramid_small_224", dict(
        embed_dims=(16, 24, 32, 48), depths=(2, 1, 1, 1), num_heads=(1, 2, 2, 3), wss=(4, 2, 2, 2),
        sr_ratios=(4, 2, 2, 1), mlp_multiple_of=8, init_values=0.5), 32),
    "aim": ("aim_600m_patch14_224", dict(patch_size=7, embed_dim=48, depth=2, num_heads=3, probe_layers=2), 28),
    "vit_llm": ("vit_llama_small_patch16_224", dict(patch_size=8, embed_dim=32, depth=2, num_heads=2), 32),
}


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    """A tiny LLaMA (Meta layout) read by the ViT + frozen LLM checkpoint; moved away to show a timm folder
    stands alone."""
    return str(write_meta(tmp_path_factory.mktemp("llm") / "meta", TinyLLM()))


def write_checkpoint(root, family, llm_dir) -> str:
    """A llamavit checkpoint directory (model.safetensors + meta, as a training run writes it) of a tiny model of
    `family` with perturbed weights (so that every block shapes the logits)."""
    name, options, size = FAMILIES[family]
    kwargs = {**options, "img_size": size, "in_chans": 3, "num_classes": len(CLASSES)}
    if family == "vit_llm":
        kwargs["llm_path"] = llm_dir
    model = llamavit.create_model(name, **kwargs)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    meta = {"model": name, "model_kwargs": kwargs, "classes": CLASSES,
            "transform": asdict(TransformConfig(img_size=size, in_chans=3, crop_pct=1.0))}
    path = os.path.join(root, family)
    os.makedirs(path)
    save_weights(path, model, meta)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, llm_dir):
    root = tmp_path_factory.mktemp("ckpts")
    return {family: write_checkpoint(str(root), family, llm_dir) for family in FAMILIES}


@pytest.fixture(scope="module")
def fm_run(tmp_path_factory):
    """A few steps of a tiny iLLaMA on Fashion-MNIST, soft mask decaying (rate strictly between 0 and 1 at the end),
    with --tensorboard."""
    out = str(tmp_path_factory.mktemp("fm") / "run")
    assert main(["train", "--model", "illama_tiny_patch16_224", "--model-kwargs", "patch_size=7", "embed_dim=32",
                 "depth=2", "num_heads=2", "--img-size", "28", "--in-chans", "1", "--data", "fashion_mnist",
                 "--train-subset", "64", "--val-subset", "32", "--batch-size", "16", "--epochs", "1", "--log-every",
                 "1", "--soft-mask", "linear", "--soft-mask-epochs", "2", "--tensorboard", "--no-progress",
                 "--output", out]) == 0
    return out


def images(size, batch, seed=0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- ONNX -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_onnx_matches_eager_at_batch_1_and_3(checkpoints, family, tmp_path):
    path = str(tmp_path / "m.onnx")
    report = export_checkpoint(checkpoints[family], "onnx", path, speed_rounds=1)
    assert report["max_abs_diff"] <= 1e-4 and report["bytes"] == os.path.getsize(path) > 0
    assert not os.path.exists(path + ".data")   # every weight inside the one file
    model = model_from_checkpoint(checkpoints[family]).eval()
    session = onnx_session(path, threads=1)
    assert session.get_inputs()[0].shape[0] == "batch"
    size = FAMILIES[family][2]
    worst = 0.0
    for batch in (1, 3):
        x = images(size, batch, seed=batch)
        with torch.inference_mode():
            expected = model(x).numpy()
        got = session.run(None, {"images": x.numpy()})[0]
        assert got.shape == (batch, len(CLASSES))
        worst = max(worst, float(np.abs(got - expected).max()))
    assert worst <= 1e-4, f"{family}: max |diff| {worst}"
    print(f"{family}: max |onnxruntime - eager| {worst:.2e} at batches 1 and 3")   # seen with -s
    assert report["speed_batch1"]["ratio"] > 0
    import onnx
    stored = onnx.load(path)
    props = {p.key: json.loads(p.value) for p in stored.metadata_props}
    assert props["llamavit.classes"] == CLASSES and props["llamavit.transform"]["img_size"] == size
    if family == "vit_llm":   # the frozen block read from the LLM file is in the ONNX file
        weights = sum(int(np.prod(t.dims)) for t in stored.graph.initializer)
        block = sum(p.numel() for p in model.llama.layers.parameters())
        assert block > 0 and weights >= block
    if family == "illama":    # the soft mask at the checkpoint's rate, not the bidirectional default
        assert read_meta(checkpoints[family])["model_kwargs"]["soft_mask_rate"] == 0.4
        model.set_soft_mask_rate(1.0)
        with torch.inference_mode():
            bidirectional = model(images(size, 1, seed=1)).numpy()
        assert np.abs(session.run(None, {"images": images(size, 1, seed=1).numpy()})[0] - bidirectional).max() > 1e-3


def test_dynamic_size_where_the_family_allows_it(checkpoints, tmp_path):
    path = str(tmp_path / "vit_llm.onnx")
    report = export_checkpoint(checkpoints["vit_llm"], "onnx", path, dynamic_size=True, speed_rounds=1)
    assert report["dynamic_axes"] == ["batch", "height", "width"] and [2, 3, 64, 64] in report["checked"]
    model = model_from_checkpoint(checkpoints["vit_llm"]).eval()
    x = images(48, 2)
    with torch.inference_mode():
        expected = model(x).numpy()
    assert np.abs(onnx_session(path).run(None, {"images": x.numpy()})[0] - expected).max() <= 1e-4


def test_dynamic_size_refused_in_one_line_where_it_does_not_work(checkpoints, tmp_path, capsys):
    path = tmp_path / "illama.onnx"
    code = main(["export", checkpoints["illama"], "--format", "onnx", "--dynamic-size", "--output", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "onnxruntime cannot run the ONNX export of ILLaMA" in err and "removed" in err
    assert not path.exists()


def test_outputs_beyond_the_tolerance_remove_the_file(checkpoints, tmp_path):
    path = str(tmp_path / "aim.onnx")
    export_checkpoint(checkpoints["aim"], "onnx", path, speed_rounds=1)
    model = model_from_checkpoint(checkpoints["aim"]).eval()
    with pytest.raises(ExportError, match=r"differs from eager PyTorch by max \|diff\| .* > 1e-12 under onnxruntime"):
        verify_onnx(model, path, (3, 28, 28), tolerance=1e-12)
    assert not os.path.exists(path)


def test_cli_export_onnx_of_a_trained_run(fm_run, capsys):
    assert 0 < read_meta(fm_run)["model_kwargs"]["soft_mask_rate"] < 1
    assert main(["export", fm_run, "--format", "onnx"]) == 0
    out = capsys.readouterr().out
    path = os.path.join(fm_run, "export", "model.onnx")
    assert os.path.isfile(path)
    assert f"wrote {path} (" in out and " MB, opset 18, dynamic axes: batch)" in out
    assert "max |diff|" in out and "on inputs 1x1x28x28, 3x1x28x28" in out and "x\n" in out and "ratio" in out


# --- timm folders ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_timm_folder_round_trip(checkpoints, family, llm_dir, tmp_path):
    folder = str(tmp_path / "timm")
    report = export_checkpoint(checkpoints[family], "timm", folder)
    assert report["max_abs_diff"] == 0.0 and sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]
    model = model_from_checkpoint(checkpoints[family]).eval()
    config = json.load(open(os.path.join(folder, "config.json")))
    name, _, size = FAMILIES[family]
    assert config["architecture"] == name and config["num_classes"] == 4 and config["label_names"] == CLASSES
    assert config["pretrained_cfg"]["input_size"] == [3, size, size]
    assert {"mean", "std", "crop_pct", "interpolation"} <= set(config["pretrained_cfg"])
    x = images(size, 2)
    with torch.inference_mode():
        expected = model(x)
    aside = llm_dir + ".aside"
    if family == "vit_llm":   # the folder holds the frozen block: it needs no LLM file
        assert config["model_args"]["llm_path"] is None and config["llamavit"]["llm"]["source"] == "file"
        os.rename(llm_dir, aside)
    try:
        rebuilt = [timm.create_model(f"local-dir:{folder}", pretrained=True), model_from_checkpoint(folder),
                   llamavit.create_model(name, checkpoint_path=folder, **config["model_args"])]
        for other in rebuilt:
            with torch.inference_mode():
                assert torch.equal(other.eval()(x), expected), f"{family}: {type(other).__name__}"
    finally:
        if family == "vit_llm":
            os.rename(aside, llm_dir)
    meta = read_meta(folder)
    assert meta["model"] == name and meta["classes"] == CLASSES and meta["transform"]["img_size"] == size


def test_eval_and_predict_take_a_timm_folder(fm_run, tmp_path, capsys):
    folder = str(tmp_path / "fm_timm")
    assert main(["export", fm_run, "--format", "timm", "--output", folder]) == 0
    out = capsys.readouterr().out
    assert f"timm.create_model('local-dir:{folder}', pretrained=True)" in out and "max |diff| 0.00e+00" in out
    assert json.load(open(os.path.join(folder, "config.json")))["llamavit"]["data"] == "fashion_mnist"
    assert main(["eval", "--checkpoint", fm_run, "--subset", "64"]) == 0
    of_run = capsys.readouterr().out
    assert main(["eval", "--checkpoint", folder, "--data", "fashion_mnist", "--subset", "64"]) == 0
    assert capsys.readouterr().out == of_run
    assert main(["eval", "--checkpoint", folder, "--subset", "64"]) == 0   # the dataset config.json records
    assert capsys.readouterr().out == of_run
    from llamavit.data import build_dataset
    image = tmp_path / "shoe.png"
    build_dataset("fashion_mnist", "val")[0][0].save(image)
    assert main(["predict", str(image), "--checkpoint", fm_run, "--topk", "2"]) == 0
    of_run = capsys.readouterr().out
    assert main(["predict", str(image), "--checkpoint", folder, "--topk", "2"]) == 0
    assert capsys.readouterr().out == of_run


# --- TensorBoard ----------------------------------------------------------------------------------
def test_tensorboard_holds_the_logged_scalars_and_the_curves(fm_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(os.path.join(fm_run, "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    records = [json.loads(line) for line in open(os.path.join(fm_run, "log.jsonl"))]
    tags = events.Tags()["scalars"]
    assert {"loss", "lr", "img_per_s", "soft_mask_rate", "val_top1", "val_loss"} <= set(tags)
    for tag in ("loss", "lr", "soft_mask_rate", "val_top1"):
        logged = [(r["step"], r[tag]) for r in records if isinstance(r.get(tag), (int, float))]
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in logged]
        np.testing.assert_allclose([v for _, v in got], [v for _, v in logged], rtol=1e-6)
    assert 0 < events.Scalars("soft_mask_rate")[-1].value < 1
    assert events.Tags()["images"] == ["curves"]
    curve = events.Images("curves")[-1]
    assert curve.width > 100 and curve.height > 100


def test_tensorboard_missing_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    code = main(["train", "--model", "illama_tiny_patch16_224", "--model-kwargs", "patch_size=8", "embed_dim=16",
                 "depth=1", "num_heads=1", "--img-size", "16", "--data", "synthetic", "--batch-size", "16",
                 "--max-steps", "1", "--tensorboard", "--no-progress", "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "pip install 'llamavit[tensorboard]'" in err


# --- refusals -------------------------------------------------------------------------------------
def test_onnxruntime_missing_is_one_line(checkpoints, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    code = main(["export", checkpoints["illama"], "--format", "onnx", "--output", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "onnxruntime, not installed: pip install 'llamavit[export]'" in err


def test_bad_exports_are_one_line(checkpoints, tmp_path, capsys):
    dit = str(tmp_path / "dit")
    os.makedirs(dit)
    kwargs = dict(embed_dim=32, depth=1, num_heads=2, patch_size=4, img_size=16)
    save_weights(dit, llamavit.create_model("dit_llama_s_2", **kwargs),
                 {"model": "dit_llama_s_2", "model_kwargs": kwargs, "classes": CLASSES, "objective": "ddpm"})
    exists = tmp_path / "taken"
    exists.mkdir()
    cases = [(["export", dit, "--format", "onnx", "--output", str(tmp_path / "d.onnx")],
              "is a generation run, not a classifier"),
             (["export", checkpoints["illama"], "--format", "timm", "--output", str(exists)],
              f"--output {exists} exists already: export writes a new folder"),
             (["export", checkpoints["illama"], "--format", "tflite"], "invalid choice: 'tflite'"),
             (["export", str(tmp_path / "nothing"), "--format", "timm", "--output", str(tmp_path / "t")],
              "checkpoint not found")]
    for argv, expected in cases:
        try:
            code = main(argv)
        except SystemExit as e:   # argparse's usage errors
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err and expected in err, (argv, err)
    assert not os.path.exists(tmp_path / "d.onnx") and os.listdir(exists) == []
    with pytest.raises(ValueError, match="unknown export format 'tflite'; expected one of onnx, timm"):
        export_checkpoint(checkpoints["illama"], "tflite", str(tmp_path / "x"))



def test_tensorboard_of_a_resumed_run_drops_what_came_after_its_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from llamavit.train import TrainConfig, train
    out = tmp_path / "run"
    options = dict(model="illama_tiny_patch16_224", model_kwargs=dict(patch_size=8, embed_dim=16, depth=1,
                                                                       num_heads=1), img_size=16, data="synthetic",
                   epochs=1, batch_size=16, log_every=1, ckpt_every=2, tensorboard=True, progress=False,
                   output=str(out))
    train(TrainConfig(max_steps=3, **options))
    # killed after logging step 3, before its checkpoint: the run resumes from step 2
    for name in os.listdir(out / "checkpoints"):
        if name == "step-00000003":
            shutil.rmtree(out / "checkpoints" / name)
    (out / "checkpoints" / "latest").write_text("step-00000002")
    train(TrainConfig(resume=True, **options))
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    logged = [(r["step"], r["loss"]) for r in map(json.loads, open(out / "log.jsonl")) if "loss" in r]
    assert [s for s, _ in logged] == [1, 2, 3, 4]
    got = [(e.step, e.value) for e in events.Scalars("loss")]
    assert [s for s, _ in got] == [1, 2, 3, 4]
    np.testing.assert_allclose([v for _, v in got], [v for _, v in logged], rtol=1e-6)
