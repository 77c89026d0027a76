"""The bad inputs a user can give llamavit, each with the one line it must answer (the table of docs/bad_inputs.md).

`tests/test_bad_inputs.py` runs every case; `python tests/bad_inputs.py` runs them and writes
docs/bad_inputs.md (input -> the message llamavit printed, paths shown as <dir>).

A case is (id, argv, expected part of the message). argv may use {dir} (a scratch directory), {run} (a trained
tiny iLLaMA run), {image} (an image file), {dit} (a DiT generation run), {pre} (an AIM pre-training run) and
the files `Context.make` writes there.
"""
import os
import re
import sys
from pathlib import Path

MODEL = ["--model", "illama_tiny_patch16_224", "--img-size", "28", "--in-chans", "1", "--no-progress"]
KWARGS = ["patch_size=4", "embed_dim=32", "depth=2", "num_heads=2"]
ILLAMA = "illama_tiny_patch16_224"


def train(*extra, data="synthetic", output="{dir}/out", kw=KWARGS):
    """`llamavit train` of a tiny iLLaMA for one epoch, with `extra` flags (the later flag wins)."""
    return ["train", *MODEL, "--model-kwargs", *kw, "--data", data, "--batch-size", "16", "--epochs", "1",
            "--output", output, *extra]


def points(data):
    """`llamavit train --task points` of a tiny point encoder on a point-file folder."""
    return ["train", "--task", "points", "--model", "point_encoder_tiny", "--model-kwargs", "embed_dim=32", "depth=1",
            "num_heads=2", "num_groups=4", "group_size=4", "--data", data, "--num-points", "16", "--in-chans", "3",
            "--batch-size", "1", "--epochs", "1", "--no-progress", "--output", "{dir}/pts"]


def clips(data):
    """`llamavit train --task video` of a tiny video encoder on a clip-folder tree."""
    return ["train", "--task", "video", "--model", "video_encoder_tiny", "--model-kwargs", "embed_dim=32", "depth=1",
            "num_heads=2", "patch_size=4", "--data", data, "--num-frames", "4", "--img-size", "16", "--in-chans", "1",
            "--batch-size", "2", "--epochs", "1", "--no-progress", "--output", "{dir}/vid"]


def segment(data, *extra):
    """`llamavit segment train` of a tiny linear-head segmenter on `data`."""
    return ["segment", "train", "--data", data, "--output", "{dir}/seg", "--img-size", "32", "--batch-size", "1",
            "--head", "linear", "--backbone-kwargs", "embed_dims=[8,8,8,8]", "depths=[1,1,1,1]",
            "num_heads=[1,1,1,1]", "mlp_multiple_of=8", "--no-progress", *extra]


def finetune(*extra):
    """`llamavit finetune` of the trained tiny run for one epoch, with `extra` flags."""
    return ["finetune", "--checkpoint-path", "{run}", "--data", "synthetic", "--batch-size", "16", "--epochs", "1",
            "--no-progress", "--output", "{dir}/ft", *extra]


def pretrain(*extra, objective="aim"):
    """`llamavit pretrain aim|mae` of a tiny AIM for one step, with `extra` flags."""
    return ["pretrain", objective, "--model", "aim_600m_patch14_224", "--model-kwargs", "embed_dim=32", "depth=1",
            "num_heads=2", "patch_size=8", "probe_layers=1", "--img-size", "32", "--data", "synthetic",
            "--decoder-dim", "16", "--decoder-depth", "1", "--batch-size", "16", "--max-steps", "1",
            "--output", "{dir}/pre_case", "--no-progress", *extra]


def kwargs(*items):
    return train(kw=list(items))


CASES = [
    # model options
    ("model option of the wrong type", kwargs("patch_size=4", "embed_dim=abc"),
     f"{ILLAMA} option embed_dim must be an integer, got 'abc'"),
    ("model option not an integer", kwargs("patch_size=4", "embed_dim=48.5"),
     "option embed_dim must be an integer, got 48.5"),
    ("negative depth", kwargs("patch_size=4", "depth=-1"), "option depth must be > 0, got -1"),
    ("zero heads", kwargs("patch_size=4", "num_heads=0"), "option num_heads must be > 0, got 0"),
    ("heads that do not divide the width", kwargs("patch_size=4", "embed_dim=36", "num_heads=8"),
     "dim (36) must be divisible by num_heads (8)"),
    ("unknown model option", kwargs("patch_size=4", "depth_rate=2"), "unknown option(s) ['depth_rate']"),
    ("model option without a value", kwargs("patch_size"), "model option 'patch_size' must look like KEY=VALUE"),
    ("image size not a multiple of the patch", ["info", ILLAMA, "--img-size", "28"],
     "img_size 28x28 is not a multiple of the patch size 16x16"),
    ("unknown model", ["train", "--model", "illama_tiny", "--output", "{dir}/out"],
     "unknown model 'illama_tiny'; did you mean"),
    # the command line itself
    ("a flag without its value", ["train", "--batch-size"], "argument --batch-size: expected one argument (see "
     "`llamavit train --help`)"),
    ("an unknown flag", ["train", "--batchsize", "16"], "unrecognized arguments: --batchsize 16"),
    ("a value of the wrong type for a flag", ["train", "--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
    ("an unknown command", ["trian"], "invalid choice: 'trian'"),
    # training options
    ("log interval 0", train("--log-every", "0"), "training option log_every must be > 0, got 0"),
    ("evaluation interval 0", train("--eval-every", "0"), "training option eval_every must be > 0, got 0"),
    ("negative max steps", train("--max-steps", "-5"), "training option max_steps must be >= 0, got -5"),
    ("one number for a range", train("--scale", "0.5"), "training option scale must be 2 numbers, got [0.5]"),
    ("a reversed range", train("--scale", "1.0", "0.5"), "training option scale must be two numbers 0 < low <= high"),
    ("one beta", train("--betas", "0.9"), "training option betas must be 2 numbers, got [0.9]"),
    ("label smoothing above 1", train("--label-smoothing", "1.5"), "option label_smoothing must be in [0, 1), got 1.5"),
    ("batch not split evenly", train("--grad-accum-steps", "3"),
     "batch_size 16 (global) must be divisible by processes x grad_accum_steps = 1 x 3"),
    ("batch larger than the data", train("--batch-size", "1000"),
     "the training set has 64 images, fewer than one batch of 1000"),
    ("YAML value of the wrong type", ["train", "--config", "{dir}/three.yaml", *MODEL, "--data", "synthetic",
                                      "--output", "{dir}/out"],
     "training option epochs must be a number, got 'three'"),
    ("YAML file that is not a mapping", train("--config", "{dir}/list.yaml"), "must hold a mapping of option: value"),
    ("invalid YAML", train("--config", "{dir}/broken.yaml"), "is not valid YAML"),
    ("missing config file", train("--config", "{dir}/nope.yaml"), "config file not found"),
    ("config file that is a directory", train("--config", "{dir}"), "is a directory; expected a YAML file"),
    ("unknown option in YAML", train("--config", "{dir}/unknown.yaml"), "unknown training option(s) ['lrr']"),
    # data and output
    ("missing dataset", train(data="{dir}/missing"),
     "is neither 'fashion_mnist', 'digits', 'synthetic' nor an existing directory"),
    ("damaged image in an ImageFolder", train("--batch-size", "4", data="{dir}/images"), "cannot read image"),
    ("output that is a file", train(output="{dir}/afile"), "is a file; expected a directory for the run"),
    ("output under a file", train(output="{dir}/afile/run"), "lies under a file; expected a directory path"),
    # checkpoints
    ("no such checkpoint", ["eval", "--checkpoint", "{dir}/no_run"], "checkpoint not found"),
    ("truncated weights", ["predict", "{image}", "--checkpoint", "{dir}/truncated"], "cannot read safetensors file"),
    ("random bytes as weights", ["eval", "--checkpoint", "{dir}/random_bytes"], "cannot read safetensors file"),
    ("a run that has no checkpoint yet", ["eval", "--checkpoint", "{dir}/empty_run"],
     "is a run directory without a complete checkpoint yet"),
    ("EMA asked of a run without it", ["predict", "{image}", "--checkpoint", "{run}", "--ema"],
     "has no EMA weights (the run was trained without --ema-decay): drop --ema"),
    ("predict with a generation run", ["predict", "{image}", "--checkpoint", "{dit}"],
     "is a generation run, not a classifier: use `llamavit generate sample`"),
    ("eval of a pre-training run", ["eval", "--checkpoint", "{pre}"],
     "is a pre-training or probe run, not a classifier"),
    ("resume with other options", train("--lr", "0.5", "--resume", output="{run}"),
     "--resume with other options than the run in"),
    # export
    ("export of a generation run", ["export", "{dit}", "--format", "onnx", "--output", "{dir}/dit.onnx"],
     "is a generation run, not a classifier: use `llamavit generate sample`"),
    ("export to a path that exists", ["export", "{run}", "--format", "timm", "--output", "{dir}/afile"],
     "exists already: export writes a new folder; remove it or give another path"),
    ("an unknown export format", ["export", "{run}", "--format", "tflite"],
     "argument --format: invalid choice: 'tflite'"),
    # images and predict
    ("no such image", ["predict", "{dir}/none.png", "--checkpoint", "{run}"], "image not found"),
    ("a file that is not an image", ["predict", "{dir}/three.yaml", "--checkpoint", "{run}"], "cannot read image"),
    ("top-k of 0", ["predict", "{image}", "--checkpoint", "{run}", "--topk", "0"], "topk must be at least 1, got 0"),
    # dense prediction
    ("segmentation without data", ["segment", "train", "--output", "{dir}/seg"], "segmentation needs --data"),
    ("segmentation data in neither layout", segment("{dir}/images"), "neither the ADE20K layout"),
    ("a COCO annotation file without its keys", segment("{dir}/coco_only"),
     "is not COCO instances JSON: missing key 'images'"),
    ("detection of an ADE20K-only directory", ["detect", "train", "--data", "{dir}/ade_size", "--output",
                                               "{dir}/det"], "has the ADE20K layout only"),
    ("an annotation of another size than its image", segment("{dir}/ade_size"), "is 6x6 but its image is 8x8"),
    ("a label above the classes", segment("{dir}/ade_label"), "has label 9 above K=2"),
    ("an empty COCO annotation file", ["detect", "train", "--data", "{dir}/coco_empty", "--output", "{dir}/det"],
     "is empty"),
    ("a missing validation split", segment("{dir}/ade_train_only"), "validation not found"),
    ("a native pyramid on a plain trunk", segment("{dir}/ade_ok", "--backbone", "visionllama_small_patch16_224",
                                                  "--pyramid", "native", "--backbone-kwargs", "depth=1",
                                                  "embed_dim=16", "num_heads=1"), "is a plain trunk"),
    ("an unknown backbone", segment("{dir}/ade_ok", "--backbone", "resnet_9000"), "unknown backbone 'resnet_9000'"),
    ("segment eval of a classifier run", ["segment", "eval", "--checkpoint", "{run}"],
     "is not a dense checkpoint; expected one made by `llamavit segment train`"),
    ("scenes into a directory holding other data", ["scenes", "build", "--output", "{dir}/images"],
     "is not empty and holds no scenes.json"),
    # adaptation
    ("a LoRA rank below 0", finetune("--lora-rank", "-2"), "lora_rank must be >= 0, got -2"),
    ("LoRA options without a rank", finetune("--lora-alpha", "16"),
     "lora_alpha configure LoRA adapters: give --lora-rank >= 1 as well"),
    ("an unknown LoRA target", finetune("--lora-rank", "4", "--lora-targets", "qkv,ffn"),
     "lora_targets must name some of ['mlp', 'proj', 'qkv'], got ['qkv', 'ffn']"),
    ("a freeze pattern that matches nothing", finetune("--freeze", "block.*"),
     "--freeze pattern 'block.*' matches no parameter of ILLaMA (names look like"),
    ("a teacher without --distill", train("--teacher", "{run}"), "distillation needs both --teacher"),
    # AIM's ablations
    ("an unknown patch order", pretrain("--order", "zigzag"), "order must be one of ('raster', 'reverse_raster'"),
    ("a token target for MAE", pretrain("--target", "tokens", objective="mae"),
     "the MAE objective predicts normalised pixels only, got target 'tokens'"),
    ("a codebook larger than its patches", pretrain("--target", "tokens", "--codebook-size", "512",
                                                    "--codebook-images", "2"),
     "a codebook of 512 codes needs at least 512 patches"),
    ("probing under an unknown attention", ["probe", "--checkpoint", "{pre}", "--attention", "full"],
     "attention must be one of ('bidirectional', 'causal'), got 'full'"),
    ("an ablation file with an unknown claim kind", ["ablate", "aim", "--config", "{dir}/bad_ablation.yaml"],
     "claim 'c' has kind 'bigger'; expected one of"),
    ("an unknown task", train("--task", "audio"), "task must be one of ('image', 'points', 'video'), got 'audio'"),
    ("a point file with too few columns", points("{dir}/clouds"), "row 1 has 2 columns"),
    ("a clip with a missing frame", clips("{dir}/clips"), "frame 2 is missing"),
    ("a frozen-LLM ablation naming an unknown arm", ["ablate", "llm-layers", "--config", "{dir}/bad_llm.yaml"],
     "claim 'c' names unknown arm(s) ['layer_3']"),
    ("a frozen LLM layer beyond the LLM's depth", train("--model", "vit_smollm2_tiny_patch16_224", "--model-kwargs",
                                                         "patch_size=7", "embed_dim=32", "depth=1", "num_heads=2",
                                                         "llm_layers=[40]"), "40"),
]


class Context:
    """The files the cases refer to, made once under `root`."""

    def __init__(self, root: Path):
        self.root = root

    def make(self) -> "Context":
        import torch
        from safetensors.torch import save_file

        from llamavit.cli import main
        from PIL import Image

        from llamavit.data import SyntheticImages
        r = self.root
        r.mkdir(parents=True, exist_ok=True)
        (r / "three.yaml").write_text("epochs: three\n")
        (r / "list.yaml").write_text("- 1\n- 2\n")
        (r / "broken.yaml").write_text("lr: [1, 2\n")
        (r / "unknown.yaml").write_text("lrr: 0.1\n")
        (r / "bad_ablation.yaml").write_text("arms: [{name: a}, {name: b}]\n"
                                             "claims: [{name: c, kind: bigger, arms: [a, b]}]\n")
        (r / "bad_llm.yaml").write_text("llm_model: vit_smollm2_tiny_patch16_224\nsweep: {layers: [0]}\n"
                                        "claims: [{name: c, kind: greater, arms: [layer_3, layer_0]}]\n")
        for split in ("train", "val"):   # point files: one class's file has rows of 2 columns
            for label in ("a", "b"):
                (r / "clouds" / split / label).mkdir(parents=True)
                (r / "clouds" / split / label / "0.txt").write_text("0 0 0\n1 0 0\n0 1 0\n0 0 1\n" * 8)
        (r / "clouds" / "train" / "b" / "0.txt").write_text("0 0\n1 0\n")
        for split in ("train", "val"):   # clips of 4 frames; one lacks frame 2
            for label in ("a", "b"):
                clip = r / "clips" / split / label / "c0"
                clip.mkdir(parents=True)
                for t in range(4):
                    Image.new("L", (16, 16), 40 * t).save(clip / f"frame_{t:03d}.png")
        (r / "clips" / "train" / "a" / "c0" / "frame_002.png").unlink()
        (r / "afile").write_text("")
        (r / "truncated").mkdir()
        (r / "truncated" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\"")
        save_file({"x": torch.zeros(1)}, str(r / "ok.safetensors"))
        (r / "random_bytes").mkdir()
        (r / "random_bytes" / "model.safetensors").write_bytes(os.urandom(256))
        (r / "empty_run" / "checkpoints").mkdir(parents=True)
        images = SyntheticImages(num_samples=8, num_classes=2, img_size=28)
        for split in ("train", "val"):
            for i in range(len(images)):
                image, label = images[i]
                folder = r / "images" / split / f"c{label}"
                folder.mkdir(parents=True, exist_ok=True)
                image.save(folder / f"{i}.png")
        (r / "images" / "train" / "c0" / "0.png").write_bytes(b"not a png")
        images[0][0].save(r / "image.png")
        self.make_dense()
        quiet = ["--no-progress"]
        assert main(self.argv(train(output="{run}"))) == 0
        assert main(["generate", "train", "--model", "dit_llama_s_2", "--model-kwargs", "embed_dim=32", "depth=1",
                     "num_heads=2", "patch_size=4", "--data", "synthetic", "--img-size", "16", "--batch-size", "16",
                     "--max-steps", "1", "--output", str(r / "dit"), *quiet]) == 0
        assert main(["pretrain", "aim", "--model", "aim_600m_patch14_224", "--model-kwargs", "embed_dim=32", "depth=1",
                     "num_heads=2", "patch_size=8", "probe_layers=1", "--img-size", "32", "--data", "synthetic",
                     "--decoder-dim", "16", "--decoder-depth", "1", "--batch-size", "16", "--max-steps", "1",
                     "--output", str(r / "pre"), *quiet]) == 0
        return self

    def make_dense(self) -> None:
        """ADE20K- and COCO-layout directories, each with one fault (and one without)."""
        from PIL import Image
        r = self.root

        def ade(name, mask_size=8, label=1, splits=("training", "validation")):
            for split in splits:
                for d in ("images", "annotations"):
                    (r / name / d / split).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8)).save(r / name / "images" / split / "a.jpg")
                Image.new("L", (mask_size, mask_size), label).save(r / name / "annotations" / split / "a.png")
            (r / name / "objectInfo.csv").write_text("Idx,Ratio,Train,Val,Name\n1,0.5,1,1,wall\n2,0.5,1,1,floor\n")
        ade("ade_ok", mask_size=32)
        ade("ade_size", mask_size=6)
        ade("ade_label", label=9)
        ade("ade_train_only", splits=("training",))
        (r / "coco_only" / "annotations").mkdir(parents=True)
        (r / "coco_only" / "annotations" / "instances_train.json").write_text("{}")
        (r / "coco_empty" / "annotations").mkdir(parents=True)
        (r / "coco_empty" / "annotations" / "instances_train.json").write_text("")
        (r / "coco_empty" / "annotations" / "instances_val.json").write_text("")

    def argv(self, template) -> list:
        subs = {"{dir}": str(self.root), "{run}": str(self.root / "run"), "{image}": str(self.root / "image.png"),
                "{dit}": str(self.root / "dit"), "{pre}": str(self.root / "pre")}
        out = []
        for arg in template:
            for key, value in subs.items():
                arg = arg.replace(key, value)
            out.append(arg)
        return out


def run_case(ctx: Context, argv_template) -> tuple:
    """(exit code, stderr) of one case, in this process."""
    import contextlib
    import io

    from llamavit.cli import main
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = main(ctx.argv(argv_template))
        except SystemExit as e:   # argparse's own usage errors
            code = e.code
    return code, err.getvalue()


def write_docs(path: Path, rows) -> None:
    lines = ["# Bad inputs", "",
             "What llamavit answers to each bad input its tests try (`tests/bad_inputs.py`; this page is written by",
             "`python tests/bad_inputs.py`). Every answer is one line on stderr and exit status 2; `llamavit --debug",
             "...` shows the traceback instead. Back to the [README](../README.md).", "",
             "| case | command | answer |", "|---|---|---|"]
    for case, argv, message in rows:
        lines.append(f"| {case} | `llamavit {' '.join(argv)}` | {message.replace('|', '/')} |")
    path.write_text("\n".join(lines) + "\n")


def main(out: str) -> None:
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(Path(tmp) / "cases").make()
        rows = []
        for case, template, expected in CASES:
            code, err = run_case(ctx, template)
            assert code == 2 and expected in err, (case, code, err)
            message = err.strip().replace(str(ctx.root), "<dir>")
            shown = [re.sub(r"^<dir>", "<dir>", a.replace(str(ctx.root), "<dir>")) for a in ctx.argv(template)]
            rows.append((case, shown, message))
    write_docs(Path(out), rows)
    print(f"{len(rows)} cases -> {out}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).resolve().parent.parent / "docs" / "bad_inputs.md"))
