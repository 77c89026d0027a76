"""The `llamavit` command: parses arguments and calls the library.

    llamavit models [PATTERN]            list model names
    llamavit info MODEL                  parameters, GFLOPs and config of a model
    llamavit train [--config F] [...]    supervised training (flags override the YAML config)
    llamavit pretrain aim|mae [...]      AIM pre-training (prefix-causal next-patch regression) or MAE
    llamavit probe --checkpoint RUN --head attentive|linear   train a head on the frozen trunk
    llamavit finetune --checkpoint-path RUN [...]   train everything from a pre-trained trunk
    llamavit eval --checkpoint RUN       top-1/top-5 of a checkpoint on a dataset
    llamavit predict IMG... --checkpoint RUN   top-5 classes of image files
    llamavit analyze activations --checkpoint RUN   per-token activation/frequency heat maps per block
    llamavit analyze calibration|quantize|resolution|attention --checkpoint RUN   ECE, int8, resolution, attention
    llamavit ablate illama-ladder [--epochs N --seeds 0 1]   the ViT -> iLLaMA ablation ladder
    llamavit generate train|sample|eval  class-conditional DiT / DiT-LLaMA (DDPM or SiT flow), grids, FID
    llamavit demo                        a short Fashion-MNIST run, evaluation and predictions
"""
import argparse
import dataclasses
import json
import os
import sys
import typing
from typing import List, Optional

import yaml

DESCRIPTION = "llamavit: build, train, evaluate and run LLaMA-style vision transformers."

TRAIN_HELP = {
    "model": "model name (see `llamavit models`)",
    "model_kwargs": "extra model options as KEY=VALUE (e.g. patch_size=4 embed_dim=192)",
    "checkpoint_path": "initial weights: an official release file or a llamavit checkpoint",
    "img_size": "training image size (pixels)",
    "in_chans": "image channels the model takes (grayscale data is mapped to it)",
    "drop_path": "stochastic depth rate",
    "data": "'fashion_mnist', 'synthetic', or an ImageFolder directory (with train/ and val/ inside)",
    "train_subset": "use only the first N training images (0 = all)",
    "val_subset": "use only the first N validation images (0 = all)",
    "num_workers": "DataLoader worker processes",
    "mean": "normalisation mean per channel", "std": "normalisation std per channel",
    "scale": "RandomResizedCrop area range (two numbers)",
    "hflip": "horizontal flip probability",
    "auto_augment": "timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1",
    "re_prob": "random erasing probability",
    "crop_pct": "evaluation centre-crop fraction",
    "epochs": "training epochs (the cosine schedule spans them)",
    "batch_size": "images per optimiser step",
    "lr": "peak learning rate (AdamW)", "min_lr": "final learning rate of the cosine schedule",
    "warmup_epochs": "linear warm-up length in epochs (fractions allowed)",
    "warmup_lr": "learning rate at the start of warm-up",
    "weight_decay": "AdamW weight decay (not applied to 1-D params, pos_embed, cls_token)",
    "betas": "AdamW betas (two numbers)",
    "clip_grad": "clip the gradient norm to this value",
    "label_smoothing": "label smoothing", "mixup": "mixup alpha (0 = off)", "cutmix": "cutmix alpha (0 = off)",
    "ema_decay": "EMA decay of the weights (0 = no EMA)",
    "amp": "bf16 autocast",
    "grad_accum_steps": "split each rank's share of the global batch into this many micro-batches",
    "grad_checkpointing": "activation checkpointing in the model's blocks (less memory, more compute)",
    "compile": "torch.compile the model for training",
    "fsdp": "under torchrun: shard parameters, gradients and optimiser state with FSDP2 instead of DDP",
    "device": "auto (this rank's GPU if any, else CPU) | cpu | cuda",
    "soft_mask": "iLLaMA soft-mask schedule: none | constant | linear",
    "soft_mask_epochs": "soft-mask cut-off in epochs (r=1 before, 0 after; linear decays over it)",
    "output": "run directory (checkpoints, log.jsonl, curves.png, summary.json)",
    "seed": "random seed (data order, augmentation, dropout)",
    "resume": "continue from the run directory's latest checkpoint, exactly",
    "max_steps": "stop after N steps (the schedule still spans --epochs; resume continues it)",
    "log_every": "log every N steps", "ckpt_every": "also checkpoint every N steps",
    "eval_every": "evaluate every N epochs", "keep_checkpoints": "how many checkpoints to keep",
    "progress": "show a progress bar",
}


def _parse_kv(items: List[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"model option {item!r} must look like KEY=VALUE")
        key, value = item.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def _add_train_flags(p: argparse.ArgumentParser, config_cls=None, extra_help: Optional[dict] = None) -> None:
    from .train import TrainConfig
    config_cls = config_cls or TrainConfig
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        flag = "--" + f.name.replace("_", "-")
        hint, help_text = hints[f.name], {**TRAIN_HELP, **(extra_help or {})}.get(f.name, "")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text += f" (default: {default})" if default is not None else ""
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if hint is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.name == "model_kwargs":
            p.add_argument(flag, nargs="+", metavar="KEY=VALUE", **kw)
        elif "Tuple" in str(hint):
            p.add_argument(flag, nargs="+", type=float, **kw)
        elif hint in (int, float):
            p.add_argument(flag, type=hint, **kw)
        elif "float" in str(hint):
            p.add_argument(flag, type=float, **kw)
        else:
            p.add_argument(flag, type=str, **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamavit", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list model names", description="List llamavit model names.")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style pattern, e.g. 'illama*'")

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
    _add_train_flags(p)

    from .train.aim_pretrain import HELP as PRETRAIN_HELP, PretrainConfig
    p = sub.add_parser("pretrain", help="self-supervised pre-training (AIM)", description=(
        "AIM pre-training of any llamavit trunk that takes an attention mask: prefix-causal attention, MLP "
        "pixel decoder, next-patch regression. Options from --config (YAML) overridden by flags."))
    p.add_argument("objective", choices=["aim", "mae"], help="pre-training objective (mae: plain VisionLLaMA)")
    p.add_argument("--config", help="YAML file of pre-training options")
    _add_train_flags(p, PretrainConfig, PRETRAIN_HELP)

    from .train.probe import HELP as PROBE_HELP, ProbeConfig
    p = sub.add_parser("probe", help="train a head on a frozen trunk", description=(
        "Probe a frozen trunk: --head attentive (AIM's attentive pooling) or linear (BatchNorm + Linear on the "
        "mean token). Features are computed once and cached unless --augment."))
    _add_train_flags(p, ProbeConfig, PROBE_HELP)

    p = sub.add_parser("finetune", help="fine-tune a pre-trained model", description=(
        "Supervised training of every weight from a pre-trained checkpoint (--checkpoint-path; its model and "
        "options are used unless --model is given), fresh classifier, bidirectional attention."))
    p.add_argument("--config", help="YAML file of training options")
    _add_train_flags(p)

    p = sub.add_parser("eval", help="evaluate a checkpoint", description="Top-1/top-5 accuracy of a checkpoint.")
    p.add_argument("--checkpoint", required=True, help="run directory, checkpoint directory or weights file")
    p.add_argument("--data", help="dataset (default: the one the checkpoint was trained on)")
    p.add_argument("--subset", type=int, default=0, help="evaluate on the first N images only")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--ema", action="store_true", help="use the EMA weights if the checkpoint has them")

    p = sub.add_parser("predict", help="classify image files", description="Top-k classes of image files.")
    p.add_argument("images", nargs="+", help="image files (any size; converted to the model's input)")
    p.add_argument("--checkpoint", required=True, help="run directory, checkpoint directory or weights file")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--ema", action="store_true", help="use the EMA weights if the checkpoint has them")

    p = sub.add_parser("analyze", help="analyses of a trained model (activations, ...)",
                       description="Analyses the papers report, run on a llamavit checkpoint.")
    analyses = p.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    a = analyses.add_parser("activations", help="per-token activation magnitude and frequency after each block",
                            description="Information filtering (frozen-LLM paper, section 4): heat maps over the "
                                        "image of each patch token's centred-feature L2 norm and high-frequency "
                                        "content after every block; PNG per image + activations.json.")
    a.add_argument("--checkpoint", required=True, help="run directory, checkpoint directory or weights file")
    a.add_argument("--data", help="dataset (default: the one the checkpoint was trained on)")
    a.add_argument("--num-images", type=int, default=8, help="first N validation images (default: 8)")
    a.add_argument("--high-pass", type=float, default=0.25,
                   help="frequency cut-off in cycles per token, 0.5 = Nyquist (default: 0.25)")
    a.add_argument("--output", default="runs/activations", help="output directory (default: runs/activations)")
    a.add_argument("--ema", action="store_true", help="use the EMA weights if the checkpoint has them")
    from .cli_analyses import add_ablate_parser, add_analysis_parsers
    add_analysis_parsers(analyses)   # calibration, quantize, resolution, attention
    add_ablate_parser(sub)
    from .cli_generate import add_generate_parser
    add_generate_parser(sub, _add_train_flags)   # generate train | sample | eval

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
    p.add_argument("--train-subset", type=int, default=0, help="use only the first N training images (default: all 60000)")
    return parser


def cmd_models(args) -> None:
    from .models import list_models
    names = list_models(args.pattern)
    if not names:
        raise ValueError(f"no model matches {args.pattern!r}")
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


def train_config_from_args(args):
    from .train import TrainConfig
    values = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    if "model_kwargs" in values:
        values["model_kwargs"] = _parse_kv(values["model_kwargs"])
    if args.config:
        return TrainConfig.from_yaml(args.config, **values)
    return TrainConfig.from_dict(values)


def cmd_train(args) -> None:
    from .train import train
    from .train.distributed import shutdown_distributed
    cfg = train_config_from_args(args)
    try:
        summary = train(cfg)
    finally:
        shutdown_distributed()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))


def cmd_pretrain(args) -> None:
    from .train.aim_pretrain import PretrainConfig, pretrain
    values = {k: v for k, v in vars(args).items() if k not in ("command", "config", "objective")}
    if "model_kwargs" in values:
        values["model_kwargs"] = _parse_kv(values["model_kwargs"])
    if args.config:
        with open(args.config) as f:
            values = {**(yaml.safe_load(f) or {}), **values}
    if args.objective == "mae":
        from .train.mae import MAE_DEFAULTS, pretrain_mae
        print(json.dumps(pretrain_mae(PretrainConfig.from_dict({**MAE_DEFAULTS, **values})), indent=2))
        return
    print(json.dumps(pretrain(PretrainConfig.from_dict(values)), indent=2))


def cmd_probe(args) -> None:
    from .train.probe import ProbeConfig, probe
    values = {k: v for k, v in vars(args).items() if k != "command"}
    if "model_kwargs" in values:
        values["model_kwargs"] = _parse_kv(values["model_kwargs"])
    summary = probe(ProbeConfig.from_dict(values))
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))


def cmd_finetune(args) -> None:
    from .train.probe import checkpoint_model, finetune
    if getattr(args, "checkpoint_path", None) and "model" not in vars(args):
        name, kwargs = checkpoint_model(args.checkpoint_path, None)
        args.model = name
        for key in ("img_size", "in_chans"):
            if key in kwargs and key not in vars(args):
                setattr(args, key, kwargs[key])
        own = {k: v for k, v in kwargs.items() if k not in ("num_classes", "img_size", "in_chans")}
        args.model_kwargs = [f"{k}={json.dumps(v)}" for k, v in own.items()] + list(getattr(args, "model_kwargs", []))
    print(json.dumps(finetune(train_config_from_args(args)), indent=2))


def _eval_loader(ckpt: str, data: Optional[str], subset: int, batch_size: int):
    from torch.utils.data import DataLoader, Subset
    from .data import TransformConfig, build_dataset, build_transform
    from .train import read_meta
    from .train.checkpoint import load_training_state, resolve_checkpoint
    meta = read_meta(ckpt)
    if "transform" not in meta:
        raise ValueError(f"{ckpt} is not a llamavit training checkpoint (no transform metadata)")
    tcfg = TransformConfig(**meta["transform"])
    if data is None:
        data = load_training_state(resolve_checkpoint(ckpt))["config"]["data"]
    ds = build_dataset(data, "val", build_transform(tcfg, is_training=False), img_size=tcfg.img_size,
                       in_chans=tcfg.in_chans)
    if subset:
        ds = Subset(ds, range(min(subset, len(ds))))
    return DataLoader(ds, batch_size=batch_size), data, len(ds)


def cmd_eval(args) -> None:
    from .eval import evaluate
    from .train import model_from_checkpoint
    model = model_from_checkpoint(args.checkpoint, use_ema=args.ema)
    loader, data, n = _eval_loader(args.checkpoint, args.data, args.subset, args.batch_size)
    metrics = evaluate(model, loader)
    print(f"{data} ({n} images): top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  "
          f"loss {metrics['loss']:.4f}")


def cmd_predict(args) -> None:
    from .data import TransformConfig
    from .predict import predict_images
    from .train import model_from_checkpoint, read_meta
    meta = read_meta(args.checkpoint)
    model = model_from_checkpoint(args.checkpoint, use_ema=args.ema)
    results = predict_images(model, args.images, TransformConfig(**meta["transform"]), meta["classes"], args.topk)
    for path, top in zip(args.images, results):
        print(f"{path}: " + ", ".join(f"{name} {prob:.1%}" for name, prob in top))


def cmd_analyze(args) -> None:
    from .cli_analyses import run_analysis
    from .train import model_from_checkpoint, read_meta
    if run_analysis(args):
        return
    if args.analysis == "activations":
        import torch
        from .eval.activations import ActivationConfig, analyze_activations, save_activation_report
        model = model_from_checkpoint(args.checkpoint, use_ema=args.ema)
        loader, data, _ = _eval_loader(args.checkpoint, args.data, args.num_images, args.num_images)
        images, targets = next(iter(loader))
        classes = read_meta(args.checkpoint).get("classes")
        labels = [classes[t] if classes else str(int(t)) for t in targets.tolist()]
        cfg = ActivationConfig(high_pass=args.high_pass)
        with torch.no_grad():
            result = analyze_activations(model, images, cfg)
        paths = save_activation_report(result, images, args.output, labels, cfg)
        print(f"{data}: {len(labels)} images, {len(result['blocks'])} blocks -> {args.output} "
              f"({len(paths) - 1} PNG + activations.json)")


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
            "finetune": cmd_finetune, "eval": cmd_eval, "predict": cmd_predict, "analyze": cmd_analyze,
            "shard": cmd_shard, "demo": cmd_demo}


def cmd_ablate(args) -> None:
    from .cli_analyses import cmd_ablate as run
    run(args)


COMMANDS["ablate"] = cmd_ablate


def cmd_generate(args) -> None:
    from .cli_generate import cmd_generate as run
    run(args, _parse_kv)


COMMANDS["generate"] = cmd_generate


def main(argv: Optional[List[str]] = None) -> int:
    from .data import DatasetError
    from .models import CheckpointError
    from .predict import ImageReadError
    from .train import NonFiniteLossError
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (CheckpointError, DatasetError, ImageReadError, NonFiniteLossError, ValueError, TypeError,
            FileNotFoundError) as e:
        print(f"llamavit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llamavit {args.command}: interrupted; the last checkpoint is intact", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
