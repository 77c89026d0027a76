"""Command-line flags made from the run-configuration dataclasses, and the one way flags meet a YAML file.

Every field of a config dataclass becomes a flag (`--batch-size`, `--no-progress`, ...) whose default is
"not given", so that `config_from_args` can layer: defaults < the family's defaults < --config YAML < flags.
"""
import argparse
import dataclasses
import json
import os
import typing
from typing import Any, Dict, List, Mapping, Optional

import yaml

HELP = {
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
    "shift": "training: a random shift of up to N pixels (zero fill) instead of the random-resized crop",
    "epochs": "training epochs (the learning-rate schedule spans them; a fraction ends it inside an epoch)",
    "batch_size": "images per optimiser step, over all processes",
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
    "compile": "torch.compile the trained module",
    "fsdp": "under torchrun: shard parameters, gradients and optimiser state with FSDP2 instead of DDP",
    "device": "auto (this rank's GPU if any, else CPU) | cpu | cuda",
    "soft_mask": "iLLaMA soft-mask schedule: none | constant | linear",
    "soft_mask_epochs": "soft-mask cut-off in epochs (r=1 before, 0 after; linear decays over it)",
    "output": "run directory (checkpoints, log.jsonl, curves.png, summary.json)",
    "seed": "random seed (data order, augmentation, dropout)",
    "resume": "continue from the run directory's latest checkpoint, exactly",
    "allow_config_change": "with --resume: go on with options other than the run's (refused otherwise; logged)",
    "max_steps": "stop after N steps (the schedule still spans --epochs; resume continues it)",
    "log_every": "log every N steps", "ckpt_every": "also checkpoint every N steps",
    "eval_every": "evaluate every N epochs", "keep_checkpoints": "how many checkpoints to keep",
    "progress": "show a progress bar",
    "tensorboard": "also write <output>/tensorboard: every number of log.jsonl as a scalar, the run's PNGs as images "
                   "(needs llamavit[tensorboard])",
    # adaptation (docs/adaptation.md)
    "init_from_llm": "initialise iLLaMA / VisionLLaMA blocks from an LLM by weight selection: smollm2 or a path",
    "drop_mode": "iLLaMA's stochastic-depth schedule: standard | early | late",
    "drop_schedule": "with drop_mode early: constant | linear (decays to 0 over the cut-off)",
    "drop_cutoff_epochs": "epochs before the early / late drop-path switch",
    "layer_decay": "layer-wise learning-rate decay (timm's, e.g. 0.75; blocks nearer the input learn slower)",
    "freeze": "parameter-name globs to freeze, e.g. 'blocks.*' 'patch_embed.*'",
    "trainable": "parameter-name globs: train only these (plus LoRA adapters), e.g. 'head.*' '*mapper*'",
    "lora_rank": "LoRA rank (peft): train adapters on the trunk and the head only (0 = off)",
    "lora_alpha": "LoRA alpha: the update is scaled by alpha / rank (default: the rank)",
    "lora_dropout": "dropout on the LoRA adapters' input",
    "lora_targets": "which linear layers of the blocks get adapters: qkv proj mlp",
    "merge": "with LoRA: also write <output>/merged, the adapters folded into a plain checkpoint",
    "teacher": "distillation teacher: a llamavit run / checkpoint of the same classes, or timm:NAME (pretrained)",
    "distill": "DeiT's distillation: none | soft | hard",
    "distill_alpha": "weight of the distillation term (1 - alpha on the label loss)",
    "distill_tau": "soft distillation temperature",
}


def parse_kv(items: List[str]) -> Dict[str, Any]:
    """['a=1', 'b=[1, 2]'] -> {'a': 1, 'b': [1, 2]} (values read as YAML)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"model option {item!r} must look like KEY=VALUE")
        key, value = item.split("=", 1)
        out[key] = yaml.safe_load(value)
    return out


def add_config_flags(p: argparse.ArgumentParser, config_cls: type, extra_help: Optional[dict] = None,
                     skip: tuple = ()) -> None:
    """One flag per field of `config_cls` (except `skip`); flags not given stay absent from the namespace."""
    hints = typing.get_type_hints(config_cls)
    helps = {**HELP, **(extra_help or {})}
    for f in dataclasses.fields(config_cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        hint, help_text = hints[f.name], helps.get(f.name, "")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text += f" (default: {default})" if default is not None else ""
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if hint is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif "Dict" in str(hint):   # model_kwargs, backbone_kwargs
            p.add_argument(flag, nargs="+", metavar="KEY=VALUE", **kw)
        elif "Tuple[int" in str(hint):
            p.add_argument(flag, nargs="+", type=int, **kw)
        elif "Tuple[str" in str(hint):   # freeze / trainable patterns, LoRA targets
            p.add_argument(flag, nargs="+", type=str, **kw)
        elif "Tuple" in str(hint):
            p.add_argument(flag, nargs="+", type=float, **kw)
        elif hint in (int, float):
            p.add_argument(flag, type=hint, **kw)
        elif "float" in str(hint):
            p.add_argument(flag, type=float, **kw)
        else:
            p.add_argument(flag, type=str, **kw)


def flag_values(args: argparse.Namespace, config_cls: type) -> Dict[str, Any]:
    """The config fields given on the command line (KEY=VALUE lists of the dict options parsed)."""
    hints = typing.get_type_hints(config_cls)
    names = {f.name for f in dataclasses.fields(config_cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    for name, value in values.items():
        if "Dict" in str(hints[name]):
            values[name] = parse_kv(value)
    return values


def config_from_args(config_cls: type, args: argparse.Namespace, defaults: Optional[Mapping[str, Any]] = None,
                     **fixed):
    """config_cls from defaults < --config YAML (if the command has one) < flags < fixed."""
    return config_cls.from_yaml(getattr(args, "config", None), defaults, **{**flag_values(args, config_cls), **fixed})


def run_and_print(run, cfg, drop=()) -> None:
    """Run a trainer; rank 0 prints its summary as JSON (the process group is left on the way out)."""
    from .train.distributed import shutdown_distributed
    finished = False
    try:
        summary = run(cfg)
        finished = True
    finally:
        shutdown_distributed(finished)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in summary.items() if k not in drop}, indent=2))
