"""Supervised training (`llamavit train`): the step loop (step_loop.py: data order, precision,
accumulation, EMA, DDP/FSDP, checkpoints, exact resume, log) with cross-entropy (label smoothing or
mixup/cutmix soft targets), the iLLaMA soft-mask schedule and per-epoch validation.
"""
import os
from dataclasses import asdict
from typing import Any, Dict

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch.utils.data import DataLoader, IterableDataset, Subset

from ..data import (FASHION_MNIST_MEAN, FASHION_MNIST_STD, DatasetError, TransformConfig, build_dataset,
                    build_transform, check_classes, has_splits, is_shard_dir)
from ..eval.metrics import evaluate
from ..models import create_model, load_checkpoint
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
                           crop_pct=cfg.crop_pct)


def build_datasets(cfg: TrainConfig):
    """(train, val) datasets with timm transforms; val is None when the data has no held-out split."""
    tcfg = transform_config(cfg)
    extra = {"img_size": cfg.img_size, "in_chans": cfg.in_chans, "seed": cfg.seed}
    if os.path.isdir(cfg.data) and not is_shard_dir(cfg.data) and not has_splits(cfg.data):
        raise DatasetError(f"{cfg.data} holds class folders only: training reads {cfg.data}/train/<class>/* and "
                           f"validates on {cfg.data}/val/<class>/*")
    train = build_dataset(cfg.data, "train", build_transform(tcfg, True), **extra)
    val = build_dataset(cfg.data, "val", build_transform(tcfg, False), **extra)
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
    label smoothing, the soft-mask schedule and per-epoch evaluation (of the EMA too)."""

    def __init__(self, cfg: TrainConfig):
        self.init_loop(cfg)
        train_set, self.val_set, self.classes = build_datasets(cfg)
        self.init_data(train_set)
        self.model_kwargs = {"num_classes": len(self.classes), "img_size": cfg.img_size, "in_chans": cfg.in_chans,
                             **cfg.model_kwargs}
        if cfg.drop_path:
            self.model_kwargs["drop_path_rate"] = cfg.drop_path
        model = create_model(cfg.model, **self.model_kwargs)
        if cfg.checkpoint_path:
            load_checkpoint(model, cfg.checkpoint_path)
        self.init_training(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas,
                           warmup_steps=int(cfg.warmup_epochs * self.steps_per_epoch), warmup_lr=cfg.warmup_lr,
                           min_lr=cfg.min_lr, ema_decay=cfg.ema_decay)
        self.mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                               num_classes=len(self.classes))
            self.criterion = SoftTargetCrossEntropy()
        elif cfg.label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(cfg.label_smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        self.last_eval: Dict[str, float] = {}

    def meta(self) -> Dict[str, Any]:
        """Model, options, classes, eval transform; an iLLaMA's soft-mask rate as it is now (the forward
        depends on it: `eval` must run the checkpoint as training validated it)."""
        kwargs = dict(self.model_kwargs)
        if hasattr(self.model, "soft_mask_rate"):
            kwargs["soft_mask_rate"] = self.model.soft_mask_rate
        return {"model": self.cfg.model, "model_kwargs": kwargs, "classes": self.classes,
                "transform": asdict(transform_config(self.cfg))}

    def extra_state(self) -> Dict[str, Any]:
        return {"soft_mask_rate": getattr(self.model, "soft_mask_rate", None)}

    def load_extra_state(self, state: Dict[str, Any]) -> None:
        if state.get("soft_mask_rate") is not None:
            self.model.set_soft_mask_rate(state["soft_mask_rate"])

    # --- StepLoop hooks ------------------------------------------------------------------------
    def record_extras(self) -> Dict[str, Any]:
        return {"soft_mask_rate": getattr(self.model, "soft_mask_rate", None)}

    def before_step(self) -> None:
        cfg = self.cfg
        if cfg.soft_mask != "none" and hasattr(self.model, "set_soft_mask_rate"):
            self.model.set_soft_mask_rate(soft_mask_rate(self.step, self.steps_per_epoch, cfg.soft_mask,
                                                         cfg.soft_mask_epochs))

    def prepare_batch(self, images: torch.Tensor, targets: torch.Tensor):
        images, targets = super().prepare_batch(images, targets)
        return self.mixup(images, targets) if self.mixup is not None else (images, targets)

    def loss(self, images: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"loss": self.criterion(self.train_module(images), targets)}

    def after_step(self) -> None:
        epoch, rest = divmod(self.step, self.steps_per_epoch)
        if rest == 0 and (epoch % self.cfg.eval_every == 0 or self.step == self.total_steps):
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

    def summary_extras(self) -> Dict[str, Any]:
        return dict(self.last_eval)

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


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Train according to cfg and return the summary (final loss, validation metrics)."""
    return Trainer(cfg).fit()
