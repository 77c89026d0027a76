"""The supervised training loop: a StepLoop (step_loop.py: exact resume, logs, checkpoints) with
evaluation, EMA, mixup, the soft-mask schedule, gradient accumulation and multi-process training.

Under torchrun every rank walks the same global batches and trains on its slice of each (DDP, or
FSDP2 with `fsdp`); `batch_size` is the global batch, so the loss curve does not depend on the number
of processes or of gradient-accumulation steps. Rank 0 alone writes logs and checkpoints; checkpoints
hold full (gathered) tensors, so a run resumes on any world size.
"""
import contextlib
import itertools
import os
from dataclasses import asdict
from typing import Any, Dict, Iterable

import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, IterableDataset, Subset

from ..data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, TransformConfig, build_dataset, build_transform
from ..eval.metrics import evaluate
from ..models import create_model, load_checkpoint, read_state_dict
from .checkpoint import WEIGHTS_NAME, load_training_state, save_checkpoint
from .config import TrainConfig
from .distributed import (DistEnv, all_reduce_sum, barrier, full_state_dicts, init_distributed, load_full_state_dicts,
                          wrap_model)
from .plots import plot_curves
from .schedules import soft_mask_rate
from .step_loop import EpochBatchSampler, SeededAugmentation, StepLoop, seed_everything


def transform_config(cfg: TrainConfig) -> TransformConfig:
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
    train = build_dataset(cfg.data, "train", build_transform(tcfg, True), **extra)
    val = build_dataset(cfg.data, "val", build_transform(tcfg, False), **extra)
    classes = list(train.classes)
    if isinstance(train, IterableDataset) and (cfg.train_subset or cfg.val_subset):
        raise ValueError("train_subset / val_subset need an indexable dataset; shards are streamed whole")
    if cfg.train_subset:
        train = Subset(train, range(min(cfg.train_subset, len(train))))
    if cfg.val_subset:
        val = Subset(val, range(min(cfg.val_subset, len(val))))
    return train, val, classes


class Trainer(StepLoop):
    """Supervised training of one llamavit model according to a TrainConfig."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.env: DistEnv = init_distributed(cfg.device)
        env = self.env
        if cfg.batch_size % (env.world_size * cfg.grad_accum_steps):
            raise ValueError(f"batch_size {cfg.batch_size} (global) must be divisible by processes x "
                             f"grad_accum_steps = {env.world_size} x {cfg.grad_accum_steps}")
        if cfg.fsdp and cfg.ema_decay > 0:
            raise ValueError("EMA of an FSDP-sharded model is not supported: use ema_decay=0 with --fsdp")
        seed_everything(cfg.seed)
        train_set, self.val_set, self.classes = build_datasets(cfg)
        self.streaming = isinstance(train_set, IterableDataset)
        if self.streaming:   # shards: each rank streams its own shards, augmentation seeded per sample key
            if len(train_set) < cfg.batch_size:
                raise ValueError(f"the training set has {len(train_set)} images, fewer than one batch of "
                                 f"{cfg.batch_size}")
            train_set.rank, train_set.world_size = env.rank, env.world_size
            self.train_set, self.sampler = train_set, None
        else:
            self.train_set = SeededAugmentation(train_set, cfg.seed)
            self.sampler = EpochBatchSampler(len(train_set), cfg.batch_size, cfg.seed, env.rank, env.world_size)
        self.steps_per_epoch = len(train_set) // cfg.batch_size
        self.total_steps = cfg.epochs * self.steps_per_epoch

        self.model_kwargs = {"num_classes": len(self.classes), "img_size": cfg.img_size, "in_chans": cfg.in_chans,
                             **cfg.model_kwargs}
        if cfg.drop_path:
            self.model_kwargs["drop_path_rate"] = cfg.drop_path
        self.model = create_model(cfg.model, **self.model_kwargs)
        if cfg.checkpoint_path:
            load_checkpoint(self.model, cfg.checkpoint_path)
        if cfg.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        self.model.to(env.device)
        # what the training step calls: DDP / FSDP2 (which shards self.model in place) / compiled
        self.train_model = wrap_model(self.model, env, cfg.fsdp)
        if cfg.compile:
            self.train_model = torch.compile(self.train_model)
        self.optimizer = create_optimizer_v2(self.model, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay,
                                             betas=tuple(cfg.betas))
        self.scheduler = CosineLRScheduler(
            self.optimizer, t_initial=self.total_steps, lr_min=cfg.min_lr, warmup_t=int(cfg.warmup_epochs *
            self.steps_per_epoch), warmup_lr_init=cfg.warmup_lr, t_in_epochs=False)
        self.mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                               num_classes=len(self.classes))
            self.criterion = SoftTargetCrossEntropy()
        elif cfg.label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(cfg.label_smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()
        self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.init_loop()
        self.last_eval: Dict[str, float] = {}

    # --- checkpoints ---------------------------------------------------------------------------
    def meta(self) -> Dict[str, Any]:
        return {"model": self.cfg.model, "model_kwargs": self.model_kwargs, "classes": self.classes,
                "transform": asdict(transform_config(self.cfg))}

    def save(self) -> str:
        """Checkpoint (collective under FSDP: every rank gathers, rank 0 writes)."""
        model_sd, optim_sd = full_state_dicts(self.model, self.optimizer)
        path = ""
        if self.env.is_main:
            state = {"step": self.step, "optimizer": optim_sd, "config": self.cfg.to_dict()}
            ema = self.ema.module if self.ema is not None else None
            path = save_checkpoint(self.cfg.output, self.step, self.model, self.meta(), state, ema=ema,
                                   keep=self.cfg.keep_checkpoints, model_state=model_sd)
        barrier(self.env)
        return path

    def restore(self, checkpoint_dir: str) -> int:
        state = load_training_state(checkpoint_dir)
        if self.cfg.fsdp:   # sharded parameters take the full tensors through torch.distributed.checkpoint
            load_full_state_dicts(self.model, self.optimizer,
                                  read_state_dict(os.path.join(checkpoint_dir, WEIGHTS_NAME)), state["optimizer"])
        else:               # the usual checks: a checkpoint of another model is refused by name
            load_checkpoint(self.model, checkpoint_dir)
            load_full_state_dicts(self.model, self.optimizer, None, state["optimizer"])
        if self.ema is not None:
            ema_path = os.path.join(checkpoint_dir, "ema.safetensors")
            load_checkpoint(self.ema.module, ema_path if os.path.isfile(ema_path) else checkpoint_dir)
        return int(state["step"])

    # --- StepLoop hooks ------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.env.is_main

    def trained_module(self) -> nn.Module:
        return self.model

    def run_config(self) -> Dict[str, Any]:
        return {**self.cfg.to_dict(), "world_size": self.env.world_size}

    def record_extras(self) -> Dict[str, Any]:
        return {"soft_mask_rate": getattr(self.model, "soft_mask_rate", None)}

    def epoch_batches(self, epoch: int, start_batch: int) -> Iterable:
        """This rank's batches of `epoch` from batch `start_batch` on (the same ones after a resume)."""
        if not self.streaming:
            return super().epoch_batches(epoch, start_batch)
        self.train_set.epoch = epoch
        local = self.cfg.batch_size // self.env.world_size
        loader = DataLoader(self.train_set, batch_size=local, num_workers=self.cfg.num_workers, drop_last=True)
        return itertools.islice(loader, start_batch, self.steps_per_epoch)

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

    # --- one step ------------------------------------------------------------------------------
    def train_step(self, images: torch.Tensor, targets: torch.Tensor) -> Dict[str, float]:
        """One optimiser step on a global batch (this rank's slice of it) -> {'loss': global-batch mean}."""
        cfg = self.cfg
        if cfg.soft_mask != "none" and hasattr(self.model, "set_soft_mask_rate"):
            self.model.set_soft_mask_rate(soft_mask_rate(self.step, self.steps_per_epoch, cfg.soft_mask,
                                                         cfg.soft_mask_epochs))
        self.scheduler.step_update(self.step)
        self.seed_step(104729 + self.env.rank)
        device = self.env.device
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        self.optimizer.zero_grad(set_to_none=True)
        accum = cfg.grad_accum_steps
        local_loss = 0.0
        for i, (x, y) in enumerate(zip(images.chunk(accum), targets.chunk(accum))):
            last = i == accum - 1
            # DDP: all-reduce gradients only once, on the last micro-batch
            sync = contextlib.nullcontext() if last or not hasattr(self.train_model, "no_sync") \
                else self.train_model.no_sync()
            with sync:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):
                    loss = self.criterion(self.train_model(x), y) / accum
                loss.backward()
            local_loss += loss.item()
        # the global-batch mean, the same on every rank (so a NaN stops every rank at once)
        value = all_reduce_sum(torch.tensor([local_loss], dtype=torch.float64), self.env).item() / self.env.world_size
        self.check_loss(value)
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)
        self.step += 1
        return {"loss": value}

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
