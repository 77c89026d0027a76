"""Supervised training (`llamavit train`): the step loop (step_loop.py: data order, precision,
accumulation, EMA, DDP/FSDP, checkpoints, exact resume, log) with cross-entropy (label smoothing or
mixup/cutmix soft targets), the iLLaMA soft-mask schedule and per-epoch validation.
"""
import copy
import os
import sys
from dataclasses import asdict
from typing import Any, Dict, List, Tuple

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch.utils.data import DataLoader, IterableDataset, Subset

from ..data import (FASHION_MNIST_MEAN, FASHION_MNIST_STD, DatasetError, TransformConfig, build_dataset,
                    build_transform, check_classes, has_splits, is_shard_dir)
from ..eval.metrics import evaluate
from ..errors import CheckpointError
from ..models import create_model, load_backbone, load_checkpoint
from ..objectives.distillation import DistillationLoss
from .adapt import (DropPathSchedule, LoraSettings, add_lora, apply_freezing, base_record, drop_path_factor,
                    merge_lora, parameter_report, trainable_state_keys)
from .checkpoint import model_from_checkpoint, read_meta, resolve_checkpoint, save_weights
from .config import TrainConfig
from .distributed import all_reduce_sum
from .plots import plot_curves
from .schedules import soft_mask_rate
from .step_loop import StepLoop


def transform_config(cfg: TrainConfig) -> TransformConfig:
    """The image transform of a training config (Fashion-MNIST's statistics by default for it)."""
    mean, std = cfg.mean, cfg.std
    if cfg.data == "fashion_mnist" and mean is None:
        mean, std = FASHION_MNIST_MEAN, FASHION_MNIST_STD
    return TransformConfig(img_size=cfg.img_size, in_chans=cfg.in_chans, mean=mean, std=std, scale=cfg.scale,
                           hflip=cfg.hflip, auto_augment=cfg.auto_augment, re_prob=cfg.re_prob,
                           crop_pct=cfg.crop_pct, shift=cfg.shift)


TASK_INPUTS = {"points": ("num_points", "in_chans"), "video": ("num_frames", "img_size", "in_chans")}


def build_split(cfg: TrainConfig, split: str):
    """One split of the config's data for its task: images through timm transforms, point clouds sampled to
    num_points, clips of num_frames frames (training augmentation on the 'train' split)."""
    train = split == "train"
    if cfg.task == "points":
        from ..data.points import build_point_dataset
        return build_point_dataset(cfg.data, split, cfg.num_points, cfg.in_chans, train=train, seed=cfg.seed)
    if cfg.task == "video":
        from ..data.clips import build_clip_dataset
        return build_clip_dataset(cfg.data, split, cfg.num_frames, cfg.img_size, cfg.in_chans, train=train,
                                  seed=cfg.seed)
    return build_dataset(cfg.data, split, build_transform(transform_config(cfg), train), img_size=cfg.img_size,
                         in_chans=cfg.in_chans, seed=cfg.seed)


def task_model_kwargs(cfg: TrainConfig) -> Dict[str, Any]:
    """The input options a task's model is built with (a point encoder takes no image size)."""
    if cfg.task == "points":
        return {"in_chans": cfg.in_chans}
    if cfg.task == "video":
        return {"img_size": cfg.img_size, "in_chans": cfg.in_chans, "num_frames": cfg.num_frames}
    return {"img_size": cfg.img_size, "in_chans": cfg.in_chans}


def build_datasets(cfg: TrainConfig):
    """(train, val, classes) for the config's task; a folder must hold train/ and val/ splits."""
    if os.path.isdir(cfg.data) and not is_shard_dir(cfg.data) and not has_splits(cfg.data):
        raise DatasetError(f"{cfg.data} holds class folders only: training reads {cfg.data}/train/<class>/* and "
                           f"validates on {cfg.data}/val/<class>/*")
    train, val = build_split(cfg, "train"), build_split(cfg, "val")
    classes = list(train.classes)
    if len(classes) < 2:
        raise DatasetError(f"{cfg.data} has {len(classes)} class ({classes}): a classifier needs at least two")
    check_classes(val.classes, classes, f"the validation set of {cfg.data}")
    if isinstance(train, IterableDataset) and (cfg.train_subset or cfg.val_subset):
        raise ValueError("train_subset / val_subset need an indexable dataset; shards are streamed whole")
    if cfg.train_subset:
        train = Subset(train, range(min(cfg.train_subset, len(train))))
    if cfg.val_subset:
        val = Subset(val, range(min(cfg.val_subset, len(val))))
    return train, val, classes


class Trainer(StepLoop):
    """Supervised training of one llamavit model according to a TrainConfig: the step loop with mixup,
    label smoothing, the soft-mask and drop-path schedules, the adaptation options (freezing, LoRA, layer
    decay, distillation; docs/adaptation.md) and per-epoch evaluation (of the EMA too).

    backbone_only: take only the trunk of cfg.checkpoint_path (a fresh classifier: fine-tuning)."""

    def __init__(self, cfg: TrainConfig, backbone_only: bool = False):
        self.init_loop(cfg)
        train_set, self.val_set, self.classes = build_datasets(cfg)
        self.init_data(train_set)
        self.model_kwargs = {"num_classes": len(self.classes), **task_model_kwargs(cfg), **cfg.model_kwargs}
        if cfg.drop_path:
            self.model_kwargs["drop_path_rate"] = cfg.drop_path
        model = create_model(cfg.model, init_from_llm=cfg.init_from_llm, **self.model_kwargs)
        if cfg.checkpoint_path:
            path = resolve_checkpoint(cfg.checkpoint_path)
            load_backbone(model, path) if backbone_only else load_checkpoint(model, path)
        self.lora = None
        if cfg.lora_rank:
            settings = LoraSettings(cfg.lora_rank, cfg.lora_alpha or float(cfg.lora_rank), cfg.lora_dropout,
                                    cfg.lora_targets)
            self.lora = {**settings.to_dict(), "base": base_record(cfg.checkpoint_path, backbone_only)}
            add_lora(model, settings)
        apply_freezing(model, cfg.freeze, cfg.trainable)
        self.parameters_report = parameter_report(model)
        self.drop_schedule = DropPathSchedule(model) if cfg.drop_mode != "standard" else None
        self.init_training(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas,
                           warmup_steps=int(cfg.warmup_epochs * self.steps_per_epoch), warmup_lr=cfg.warmup_lr,
                           min_lr=cfg.min_lr, ema_decay=cfg.ema_decay, layer_decay=cfg.layer_decay,
                           saved_keys=trainable_state_keys(model) if self.lora else None)
        self.mixup = None
        if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.task != "image":
            raise ValueError(f"mixup / cutmix mix images: --task {cfg.task} takes neither")
        if cfg.mixup > 0 or cfg.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                               num_classes=len(self.classes))
            self.criterion = SoftTargetCrossEntropy()
        elif cfg.label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(cfg.label_smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        self.distillation = None
        if cfg.teacher:
            teacher, teacher_size = load_teacher(cfg.teacher, self.classes, self.env.device)
            self.distillation = DistillationLoss(self.criterion, teacher, cfg.distill, cfg.distill_alpha,
                                                 cfg.distill_tau, teacher_size if teacher_size != cfg.img_size else 0)
        self.last_eval: Dict[str, float] = {}
        if self.is_main and (cfg.lora_rank or cfg.freeze or cfg.trainable):   # what the adaptation left to train
            report = self.parameters_report
            print(f"trainable parameters: {report['trainable']:,} of {report['total']:,} "
                  f"({100 * report['fraction']:.2f} %)", file=sys.stderr)

    def meta(self) -> Dict[str, Any]:
        """Model, options, classes, eval transform; an iLLaMA's soft-mask rate as it is now (the forward
        depends on it: `eval` must run the checkpoint as training validated it)."""
        kwargs = dict(self.model_kwargs)
        if hasattr(self.model, "soft_mask_rate"):
            kwargs["soft_mask_rate"] = self.model.soft_mask_rate
        cfg = self.cfg
        inputs = ({"transform": asdict(transform_config(cfg))} if cfg.task == "image" else
                  {"task": cfg.task, "inputs": {k: getattr(cfg, k) for k in TASK_INPUTS[cfg.task]}})
        return {"model": self.cfg.model, "model_kwargs": kwargs, "classes": self.classes, **inputs,
                **({"lora": self.lora} if self.lora else {})}

    def run_config(self) -> Dict[str, Any]:
        """config.json also records what the adaptation options left trainable."""
        return {**super().run_config(), "parameters": self.parameters_report}

    def extra_state(self) -> Dict[str, Any]:
        return {"soft_mask_rate": getattr(self.model, "soft_mask_rate", None)}

    def load_extra_state(self, state: Dict[str, Any]) -> None:
        if state.get("soft_mask_rate") is not None:
            self.model.set_soft_mask_rate(state["soft_mask_rate"])

    # --- StepLoop hooks ------------------------------------------------------------------------
    def record_extras(self) -> Dict[str, Any]:
        extras = {"soft_mask_rate": getattr(self.model, "soft_mask_rate", None)}
        if self.drop_schedule is not None:
            extras["drop_path_rate"] = self.drop_schedule.rate
        return extras

    def before_step(self) -> None:
        cfg = self.cfg
        if cfg.soft_mask != "none" and hasattr(self.model, "set_soft_mask_rate"):
            self.model.set_soft_mask_rate(soft_mask_rate(self.step, self.steps_per_epoch, cfg.soft_mask,
                                                         cfg.soft_mask_epochs))
        if self.drop_schedule is not None:
            self.drop_schedule.set_factor(drop_path_factor(self.step, self.steps_per_epoch, cfg.drop_mode,
                                                           cfg.drop_schedule, cfg.drop_cutoff_epochs))

    def prepare_batch(self, images: torch.Tensor, targets: torch.Tensor):
        images, targets = super().prepare_batch(images, targets)
        return self.mixup(images, targets) if self.mixup is not None else (images, targets)

    def loss(self, images: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        logits = self.train_module(images)
        if self.distillation is not None:
            return self.distillation(images, logits, targets)
        return {"loss": self.criterion(logits, targets)}

    def after_step(self) -> None:
        epoch, rest = divmod(self.step, self.steps_per_epoch)
        if (rest == 0 and epoch % self.cfg.eval_every == 0) or self.step == self.total_steps:
            self.last_eval = self.evaluate()
            self.log({"step": self.step, "epoch": self.step / self.steps_per_epoch, **self.last_eval})
            if self.is_main:
                self.bar.write(f"epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in self.last_eval.items()))
            self.model.train()

    def after_fit(self) -> None:
        if self.step == self.total_steps and not self.last_eval:
            self.last_eval = self.evaluate()
        if self.is_main:
            plot_curves(self.history, os.path.join(self.cfg.output, "curves.png"))
            if self.cfg.merge and self.step == self.total_steps:
                self.merged_path = self.write_merged()

    def write_merged(self) -> str:
        """<output>/merged/model.safetensors: the LoRA adapters folded into a copy of the weights, a plain
        checkpoint of the model (what `create_model(name, checkpoint_path=...)` and `llamavit eval` load)."""
        merged = merge_lora(copy.deepcopy(self.model).cpu())
        meta = {k: v for k, v in self.meta().items() if k != "lora"}
        out = os.path.join(self.cfg.output, "merged")
        os.makedirs(out, exist_ok=True)
        return save_weights(out, merged, meta)

    def summary_extras(self) -> Dict[str, Any]:
        extras = {**self.last_eval, "trainable_parameters": self.parameters_report["trainable"],
                  "total_parameters": self.parameters_report["total"]}
        if getattr(self, "merged_path", None):
            extras["merged"] = self.merged_path
        return extras

    def evaluate(self) -> Dict[str, float]:
        """Validation metrics over the whole set; each rank evaluates every world_size-th image."""
        env = self.env
        if isinstance(self.val_set, IterableDataset):   # shards: each rank reads its own
            self.val_set.rank, self.val_set.world_size = env.rank, env.world_size
            shard = self.val_set
        else:
            shard = Subset(self.val_set, range(env.rank, len(self.val_set), env.world_size))
        loader = _Counted(DataLoader(shard, batch_size=max(self.cfg.batch_size, 256), num_workers=self.cfg.num_workers))
        models = {"val": self.model, **({"val_ema": self.ema.module} if self.ema is not None else {})}
        result = {}
        for prefix, model in models.items():
            loader.count = 0
            try:
                metrics = evaluate(model, loader, device=str(env.device))
            except ValueError:   # this rank had no validation images
                metrics = {}
            names = sorted(metrics) or ["loss", "top1", "top5"]
            n = loader.count
            sums = torch.tensor([n] + [metrics.get(k, 0.0) * n for k in names], dtype=torch.float64)
            sums = all_reduce_sum(sums, env)
            result.update({f"{prefix}_{k}": (sums[i + 1] / sums[0]).item() for i, k in enumerate(names)})
        return result


class _Counted:
    """Iterates a loader of (images, labels) and counts the samples that went through."""

    def __init__(self, loader):
        self.loader, self.count = loader, 0

    def __iter__(self):
        for images, targets in self.loader:
            self.count += len(targets)
            yield images, targets


def load_teacher(spec: str, classes: List[str], device) -> Tuple[nn.Module, int]:
    """(the distillation teacher in eval mode, its input size): a llamavit run / checkpoint, or 'timm:NAME'
    with timm's pretrained weights; refused when it predicts other classes than the student's."""
    if spec.startswith("timm:"):
        try:
            teacher = create_model(spec, pretrained=True, num_classes=len(classes))
        except Exception as e:   # noqa: BLE001 - no network, unknown name: one line
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"cannot build the teacher {spec} with pretrained weights: {why}") from e
        size = int(teacher.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    else:
        meta = read_meta(spec)
        theirs = meta.get("classes")
        if theirs is not None and list(theirs) != list(classes):
            raise CheckpointError(f"the teacher {spec} predicts {len(theirs)} classes ({', '.join(theirs[:3])}, …) "
                                  f"but the student {len(classes)} ({', '.join(classes[:3])}, …): distil from a "
                                  f"teacher of the same classes")
        teacher = model_from_checkpoint(spec)
        size = int(meta.get("transform", {}).get("img_size", 0))
    return teacher.eval().requires_grad_(False).to(device), size


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Train according to cfg and return the summary (final loss, validation metrics)."""
    return Trainer(cfg).fit()
