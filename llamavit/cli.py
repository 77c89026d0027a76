"""The `llamavit` command: parses arguments and calls the library (nothing here that a library user would miss).

    llamavit models [PATTERN]            list model names
    llamavit info MODEL                  parameters, GFLOPs and config of a model
    llamavit train [--config F] [...]    supervised training (flags override the YAML config)
    llamavit pretrain aim|mae [...]      AIM pre-training (prefix-causal next-patch regression) or MAE
    llamavit probe --checkpoint RUN --head attentive|linear   train a head on the frozen trunk
    llamavit finetune --checkpoint-path RUN [...]   train everything from a pre-trained trunk
    llamavit eval --checkpoint RUN       top-1/top-5 of a checkpoint on a dataset
    llamavit predict IMG... --checkpoint RUN   top-5 classes of image files
    llamavit export RUN --format onnx|timm     an ONNX file (checked with onnxruntime) or a timm folder
    llamavit analyze activations|calibration|quantize|resolution|attention --checkpoint RUN
    llamavit ablate illama-ladder [--epochs N --seeds 0 1]   the ViT -> iLLaMA ablation ladder
    llamavit ablate aim [--arms A B --seeds 0 1 --smoke]     AIM's pre-training ablations and claims
    llamavit generate train|sample|eval  class-conditional DiT / DiT-LLaMA (DDPM or SiT flow), grids, FID
    llamavit scenes build --output DIR   Fashion-MNIST scenes in the ADE20K and COCO layouts
    llamavit segment train|eval|predict  semantic segmentation (UperNet / FPN / linear on any backbone)
    llamavit detect train|eval|predict   detection / instance segmentation (torchvision FCOS ... Mask R-CNN)
    llamavit shard --data D --output DIR write WebDataset shards
    llamavit demo                        a short Fashion-MNIST run, evaluation and predictions
Every trainer (train, pretrain, probe, finetune, generate train, segment train, detect train) runs on the one
step loop and takes its flags: --resume, --amp, --grad-accum-steps, --compile, --fsdp (under torchrun), --ema-decay, ...
"""
import argparse
import json
import sys
from typing import List, Optional

from .cli_analyses import add_ablate_parser, add_analyze_parser, cmd_ablate, cmd_analyze
from .cli_dense import add_detect_parser, add_scenes_parser, add_segment_parser, cmd_detect, cmd_scenes, cmd_segment
from .cli_generate import add_generate_parser, cmd_generate
from .cli_options import add_config_flags, config_from_args, flag_values, run_and_print
from .errors import USER_ERRORS
from .heap import keep_freed_memory

DESCRIPTION = "llamavit: build, train, evaluate and run LLaMA-style vision transformers."


def error_line(command: str, message: str) -> str:
    """The one line every user error gets: `llamavit: <command>: error: <message>`."""
    return f"llamavit: {command}: error: {' '.join(str(message).split())}"


class OneLineParser(argparse.ArgumentParser):
    """argparse, with its usage errors as one line (and where to read the usage) instead of the usage block. Every
    command's parser takes `--threads N` (the CPU threads it computes with); a command may redefine it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, conflict_handler="resolve", **kwargs)
        if " " in self.prog:   # a command, not the top-level parser
            # SUPPRESS: a nested command's parser does not overwrite the value given to its parent
            self.add_argument("--threads", type=int, default=argparse.SUPPRESS,
                              help="CPU threads to compute with (default: torch's, all cores)")

    def error(self, message: str):
        text = f"{message} (see `{self.prog} --help`)"
        line = error_line(self.prog.split(" ", 1)[1], text) if " " in self.prog else f"llamavit: error: {text}"
        self.exit(2, line + "\n")


def build_parser() -> argparse.ArgumentParser:
    """The `llamavit` argument parser: every command and its flags."""
    from .train import PretrainConfig, ProbeConfig, TrainConfig
    from .train.pretrain import HELP as PRETRAIN_HELP
    from .train.probe import HELP as PROBE_HELP
    parser = OneLineParser(prog="llamavit", description=DESCRIPTION)
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineParser)

    p = sub.add_parser("models", help="list model names", description="List llamavit model names.")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style pattern, e.g. 'illama*'")
    p.add_argument("--pretrained", action="store_true",
                   help="only the weights llamavit ships (NAME.TAG for create_model(NAME, pretrained=True))")

    p = sub.add_parser("info", help="parameters, GFLOPs and config of a model",
                       description="Parameters, forward GFLOPs per image and the resolved config of a model.")
    p.add_argument("model", help="model name")
    p.add_argument("--img-size", type=int, help="input size (default: the model's)")
    p.add_argument("--num-classes", type=int, help="classifier classes (default: the model's)")
    p.add_argument("--in-chans", type=int, help="input channels (default: the model's)")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("train", help="train a model", description=(
        "Supervised training. Options come from --config (YAML mapping of the option names below, with "
        "underscores) and are overridden by flags."))
    p.add_argument("--config", help="YAML file of training options")
    add_config_flags(p, TrainConfig)

    p = sub.add_parser("pretrain", help="self-supervised pre-training (AIM, MAE)", description=(
        "AIM pre-training of any llamavit trunk that takes an attention mask (prefix-causal attention, MLP "
        "pixel decoder, next-patch regression), or MAE of the plain VisionLLaMA. Options from --config (YAML) "
        "overridden by flags."))
    p.add_argument("objective", choices=["aim", "masked", "mae"],
                   help="pre-training objective (masked: AIM's masked baseline, same trunk; mae: plain VisionLLaMA)")
    p.add_argument("--config", help="YAML file of pre-training options")
    add_config_flags(p, PretrainConfig, PRETRAIN_HELP, skip=("objective",))

    p = sub.add_parser("probe", help="train a head on a frozen trunk", description=(
        "Probe a frozen trunk: --head attentive (AIM's attentive pooling) or linear (BatchNorm + Linear on the "
        "mean token). Features are computed once and cached unless --augment."))
    p.add_argument("--config", help="YAML file of probe options")
    add_config_flags(p, ProbeConfig, PROBE_HELP)

    p = sub.add_parser("finetune", help="fine-tune a pre-trained model", description=(
        "Supervised training of every weight from a pre-trained checkpoint (--checkpoint-path; its model and "
        "options are used unless --model is given), fresh classifier, bidirectional attention."))
    p.add_argument("--config", help="YAML file of training options")
    add_config_flags(p, TrainConfig)

    p = sub.add_parser("eval", help="evaluate a checkpoint", description="Top-1/top-5 accuracy of a checkpoint.")
    add_weights_choice(p)
    p.add_argument("--data", help="dataset (default: the one the checkpoint was trained on)")
    p.add_argument("--subset", type=int, default=0, help="evaluate on the first N images only")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--ema", action="store_true", help="use the EMA weights if the checkpoint has them")

    p = sub.add_parser("predict", help="classify image files", description="Top-k classes of image files.")
    p.add_argument("images", nargs="+", help="image files (any size; converted to the model's input)")
    add_weights_choice(p)
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--ema", action="store_true", help="use the EMA weights if the checkpoint has them")

    p = sub.add_parser("export", help="export a classifier as ONNX or as a timm folder", description=(
        "Export a trained image classifier: --format onnx (checked against eager PyTorch with onnxruntime) or "
        "--format timm (config.json + model.safetensors for timm.create_model('local-dir:PATH'); see docs/export.md)."))
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT",
                   help="run directory, checkpoint directory, weights file or timm folder")
    p.add_argument("--format", required=True, choices=["onnx", "timm"], help="onnx file or timm folder")
    p.add_argument("--output", help="file (onnx) or folder (timm) to write; must not exist (default: "
                                    "<run>/export/model.onnx or <run>/export/timm)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights if the checkpoint has them")
    p.add_argument("--dynamic-size", action="store_true",
                   help="onnx: dynamic height and width as well as batch (the families that allow it: docs/export.md)")

    add_analyze_parser(sub)    # activations | calibration | quantize | resolution | attention
    add_ablate_parser(sub)
    add_generate_parser(sub)   # generate train | sample | eval
    add_scenes_parser(sub)     # scenes build
    add_segment_parser(sub)    # segment train | eval | predict
    add_detect_parser(sub)     # detect train | eval | predict

    p = sub.add_parser("shard", help="write WebDataset tar shards of a dataset", description=(
        "Write the train and val splits of Fashion-MNIST or an ImageFolder directory as WebDataset tar shards "
        "(PNG + class index) with an index per split; `--data <shard dir>` then streams them in training."))
    p.add_argument("--data", required=True, help="'fashion_mnist' or an ImageFolder directory (with train/ and val/)")
    p.add_argument("--output", required=True, help="directory for the shards")
    p.add_argument("--max-count", type=int, default=10000, help="samples per shard (default: 10000)")
    p.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"])

    p = sub.add_parser("demo", help="short Fashion-MNIST run: train, evaluate, predict",
                       description="Train the demo iLLaMA briefly on Fashion-MNIST, evaluate it and classify "
                                   "a few test images.")
    p.add_argument("--output", default="runs/demo", help="run directory (default: runs/demo)")
    p.add_argument("--epochs", type=int, default=1, help="training epochs (default: 1)")
    p.add_argument("--train-subset", type=int, default=0,
                   help="use only the first N training images (default: all 60000)")
    return parser


def add_weights_choice(p: argparse.ArgumentParser) -> None:
    """--checkpoint PATH or --model NAME (weights llamavit ships): one of the two."""
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--checkpoint", help="run directory, checkpoint directory, weights file or timm folder")
    group.add_argument("--model", help="weights llamavit ships, NAME.TAG (`llamavit models --pretrained`)")


def shipped_checkpoint(args) -> None:
    """Point args.checkpoint at the folder of --model's shipped weights."""
    if getattr(args, "model", None):
        from .models.registry import shipped_folder
        args.checkpoint = shipped_folder(args.model)


def cmd_models(args) -> None:
    from .models import list_models
    names = list_models(args.pattern, pretrained=args.pretrained)
    if not names:
        raise ValueError(f"no {'shipped weights match' if args.pretrained else 'model matches'} {args.pattern!r}")
    print("\n".join(names))


def cmd_info(args) -> None:
    from .info import model_info
    kwargs = {k: v for k, v in (("img_size", args.img_size), ("num_classes", args.num_classes),
                                ("in_chans", args.in_chans)) if v is not None}
    info = model_info(args.model, **kwargs)
    if args.json:
        print(json.dumps(info, indent=2, default=list))
        return
    print(f"{info['model']}: {info['params']:,} parameters ({info['trainable_params']:,} trainable), "
          f"{info['gflops']:.2f} GFLOPs per {info['input_size'][1]}x{info['input_size'][2]} image (forward)")
    for key, value in info["config"].items():
        print(f"  {key}: {value}")


def cmd_train(args) -> None:
    from .train import TrainConfig, train
    run_and_print(train, config_from_args(TrainConfig, args))


def cmd_finetune(args) -> None:
    from .train import TrainConfig, finetune, finetune_config
    from .train.config import yaml_values
    options = {**yaml_values(args.config), **flag_values(args, TrainConfig)}   # the flags win, as everywhere
    if not options.get("checkpoint_path"):
        raise ValueError("finetune needs --checkpoint-path (a pre-trained llamavit run or an official file)")
    run_and_print(finetune, finetune_config(options.pop("checkpoint_path"), **options))


def cmd_pretrain(args) -> None:
    from .train import MAE_DEFAULTS, PretrainConfig, pretrain
    defaults = MAE_DEFAULTS if args.objective == "mae" else None
    run_and_print(pretrain, config_from_args(PretrainConfig, args, defaults, objective=args.objective))


def cmd_probe(args) -> None:
    from .train import ProbeConfig, probe
    run_and_print(probe, config_from_args(ProbeConfig, args), drop=("history",))


def cmd_eval(args) -> None:
    from .eval import evaluate
    from .eval.loaders import eval_loader
    from .train import model_from_checkpoint
    shipped_checkpoint(args)
    model = model_from_checkpoint(args.checkpoint, use_ema=args.ema)
    loader, data, n = eval_loader(args.checkpoint, args.data, args.subset, args.batch_size)
    metrics = evaluate(model, loader)
    print(f"{data} ({n} images): top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  "
          f"loss {metrics['loss']:.4f}")


def cmd_predict(args) -> None:
    from .eval.loaders import checkpoint_transform
    from .predict import predict_images
    from .train import model_from_checkpoint, read_meta
    shipped_checkpoint(args)
    transform = checkpoint_transform(args.checkpoint)   # refuses runs that are not classifiers, before loading
    model = model_from_checkpoint(args.checkpoint, use_ema=args.ema)
    results = predict_images(model, args.images, transform, read_meta(args.checkpoint)["classes"], args.topk)
    for path, top in zip(args.images, results):
        print(f"{path}: " + ", ".join(f"{name} {prob:.1%}" for name, prob in top))


def cmd_export(args) -> None:
    from .export import describe, export_checkpoint
    report = export_checkpoint(args.checkpoint, args.format, args.output, use_ema=args.ema,
                               dynamic_size=args.dynamic_size)
    print("\n".join(describe(report)))


def cmd_shard(args) -> None:
    from .data import build_dataset, write_shards
    for split in args.splits:
        dataset = build_dataset(args.data, split)
        index = write_shards(dataset, args.output, split, list(dataset.classes), max_count=args.max_count)
        print(f"{split}: {index['count']} samples in {len(index['shards'])} shard(s) -> {args.output}")


def cmd_demo(args) -> None:
    from .demo import run_demo
    run_demo(args.output, epochs=args.epochs, train_subset=args.train_subset)


COMMANDS = {"models": cmd_models, "info": cmd_info, "train": cmd_train, "pretrain": cmd_pretrain, "probe": cmd_probe,
            "finetune": cmd_finetune, "eval": cmd_eval, "predict": cmd_predict, "export": cmd_export,
            "analyze": cmd_analyze, "ablate": cmd_ablate, "generate": cmd_generate, "shard": cmd_shard,
            "demo": cmd_demo, "scenes": cmd_scenes, "segment": cmd_segment, "detect": cmd_detect}


def set_threads(threads: Optional[int]) -> None:
    """torch's intra-op threads for this process (None: leave torch's default)."""
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    import torch
    torch.set_num_threads(threads)


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command; user errors print one line and return 2 (no traceback)."""
    args = build_parser().parse_args(argv)
    try:
        set_threads(getattr(args, "threads", None))
        keep_freed_memory()
        COMMANDS[args.command](args)
    except USER_ERRORS as e:
        if args.debug:
            raise
        print(error_line(args.command, e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llamavit: {args.command}: interrupted; the last checkpoint is intact", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
