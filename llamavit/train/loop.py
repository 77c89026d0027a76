"""The supervised training loop.

Exact resume: the data order of epoch e is a permutation seeded by (seed, e); the augmentation of
sample i in epoch e is seeded by (seed, e, i); dropout/drop-path/mixup at step s are seeded by
(seed, s). A resumed run therefore sees the same batches, the same augmentations and the same
random masks as an uninterrupted one, and logs the same losses.

Under torchrun every rank walks the same global batches and trains on its slice of each (DDP, or
FSDP2 with `fsdp`); `batch_size` is the global batch, so the loss curve does not depend on the number
of processes or of gradient-accumulation steps. Rank 0 alone writes logs and checkpoints; checkpoints
hold full (gathered) tensors, so a run resumes on any world size.
"""
import contextlib
import itertools
import json
import math
import os
import random
import time
from dataclasses import asdict
from typing import Any, Dict, Iterator, List

import numpy as np
import torch
import torch.nn as nn
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, Subset
from tqdm import tqdm

from ..data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, TransformConfig, build_dataset, build_transform
from ..eval.metrics import evaluate
from ..models import create_model, load_checkpoint, read_state_dict
from .checkpoint import WEIGHTS_NAME, latest_checkpoint, load_training_state, save_checkpoint
from .config import TrainConfig
from .distributed import (DistEnv, all_reduce_sum, barrier, full_state_dicts, init_distributed, load_full_state_dicts,
                          wrap_model)
from .plots import plot_curves
from .schedules import soft_mask_rate


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped without writing a checkpoint."""


def _mix_seed(*parts: int) -> int:
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
    return h % (2 ** 31 - 1)


def seed_everything(seed: int) -> None:
    """Seed the Python, NumPy and torch CPU generators (train_step also calls torch.manual_seed per step)."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    # the CPU generator alone: torch.manual_seed also reseeds every accelerator and costs ~90 us,
    # too much to pay once per sample
    torch.random.default_generator.manual_seed(seed)


class SeededAugmentation(Dataset):
    """Wraps a dataset so that sample i of epoch e is always augmented with the same random draws."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        seed_everything(_mix_seed(self.seed, self.epoch, index))
        return self.dataset[index]


class EpochBatchSampler(Sampler):
    """Batches of a (seed, epoch)-seeded permutation, full batches only, starting at `start_batch`.

    With world_size > 1, rank r gets the r-th of world_size equal slices of every global batch.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if num_samples < batch_size:
            raise ValueError(f"the training set has {num_samples} images, fewer than one batch of {batch_size}")
        if batch_size % world_size:
            raise ValueError(f"the global batch size {batch_size} must be divisible by the {world_size} processes")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start_batch = 0, 0

    def __len__(self) -> int:
        return self.num_samples // self.batch_size - self.start_batch

    def __iter__(self) -> Iterator[List[int]]:
        g = torch.Generator().manual_seed(_mix_seed(self.seed, self.epoch, 7919))
        order = torch.randperm(self.num_samples, generator=g).tolist()
        local = self.batch_size // self.world_size
        for b in range(self.start_batch, self.num_samples // self.batch_size):
            start = b * self.batch_size + self.rank * local
            yield order[start:start + local]


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


class Trainer:
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
        self.step = 0
        self.history: List[Dict[str, Any]] = []
        self.log_path = os.path.join(cfg.output, "log.jsonl")

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

    def try_resume(self) -> bool:
        ckpt = latest_checkpoint(self.cfg.output)
        if ckpt is None:
            return False
        state = load_training_state(ckpt)
        if self.cfg.fsdp:   # sharded parameters take the full tensors through torch.distributed.checkpoint
            load_full_state_dicts(self.model, self.optimizer, read_state_dict(os.path.join(ckpt, WEIGHTS_NAME)),
                                  state["optimizer"])
        else:               # the usual checks: a checkpoint of another model is refused by name
            load_checkpoint(self.model, ckpt)
            load_full_state_dicts(self.model, self.optimizer, None, state["optimizer"])
        if self.ema is not None:
            ema_path = os.path.join(ckpt, "ema.safetensors")
            load_checkpoint(self.ema.module, ema_path if os.path.isfile(ema_path) else ckpt)
        self.step = int(state["step"])
        # keep only the log lines up to the checkpoint, so the resumed log continues without duplicates
        if self.env.is_main and os.path.isfile(self.log_path):
            with open(self.log_path) as f:
                kept = [json.loads(line) for line in f if line.strip()]
            self.history = [r for r in kept if r.get("step", 0) <= self.step]
            with open(self.log_path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.history)
        return True

    # --- one step ------------------------------------------------------------------------------
    def train_step(self, images: torch.Tensor, targets: torch.Tensor) -> float:
        cfg = self.cfg
        if cfg.soft_mask != "none" and hasattr(self.model, "set_soft_mask_rate"):
            self.model.set_soft_mask_rate(soft_mask_rate(self.step, self.steps_per_epoch, cfg.soft_mask,
                                                         cfg.soft_mask_epochs))
        self.scheduler.step_update(self.step)
        step_seed = _mix_seed(cfg.seed, self.step, 104729 + self.env.rank)
        seed_everything(step_seed)
        torch.manual_seed(step_seed)
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
        if not math.isfinite(value):
            raise NonFiniteLossError(f"loss is {value} at step {self.step}; training stopped, nothing was saved "
                                     f"after the last good checkpoint in {os.path.join(cfg.output, 'checkpoints')}")
        if cfg.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)
        self.step += 1
        return value

    def log(self, record: Dict[str, Any]) -> None:
        self.history.append(record)
        if not self.env.is_main:
            return
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

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

    # --- the loop ------------------------------------------------------------------------------
    def _epoch_batches(self, epoch: int, start_batch: int):
        """This rank's batches of `epoch` from batch `start_batch` on (the same ones after a resume)."""
        self.train_set.epoch = epoch
        if not self.streaming:
            self.sampler.epoch, self.sampler.start_batch = epoch, start_batch
            return DataLoader(self.train_set, batch_sampler=self.sampler, num_workers=self.cfg.num_workers)
        local = self.cfg.batch_size // self.env.world_size
        loader = DataLoader(self.train_set, batch_size=local, num_workers=self.cfg.num_workers, drop_last=True)
        return itertools.islice(loader, start_batch, self.steps_per_epoch)

    def fit(self) -> Dict[str, Any]:
        cfg, main = self.cfg, self.env.is_main
        os.makedirs(cfg.output, exist_ok=True)
        resumed = cfg.resume and self.try_resume()
        if main:
            if not resumed and os.path.isfile(self.log_path):
                os.remove(self.log_path)
            with open(os.path.join(cfg.output, "config.json"), "w") as f:
                json.dump({**cfg.to_dict(), "world_size": self.env.world_size}, f, indent=2)
        stop_at = min(self.total_steps, cfg.max_steps) if cfg.max_steps else self.total_steps
        bar = tqdm(total=stop_at, initial=self.step, disable=not (cfg.progress and main), desc="train", unit="step",
                   dynamic_ncols=True)
        last_eval: Dict[str, float] = {}
        window_loss, window_n, window_t = 0.0, 0, time.perf_counter()
        self.model.train()
        while self.step < stop_at:
            loader = self._epoch_batches(self.step // self.steps_per_epoch, self.step % self.steps_per_epoch)
            for images, targets in loader:
                loss = self.train_step(images, targets)
                window_loss, window_n = window_loss + loss, window_n + 1
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == stop_at:
                    elapsed = time.perf_counter() - window_t
                    record = {"step": self.step, "epoch": self.step / self.steps_per_epoch,
                              "loss": window_loss / window_n, "lr": self.optimizer.param_groups[0]["lr"],
                              "soft_mask_rate": getattr(self.model, "soft_mask_rate", None),
                              "img_per_s": window_n * cfg.batch_size / max(elapsed, 1e-9)}
                    self.log(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                    img_s=f"{record['img_per_s']:.0f}")
                    window_loss, window_n, window_t = 0.0, 0, time.perf_counter()
                epoch_end = self.step % self.steps_per_epoch == 0
                if epoch_end and ((self.step // self.steps_per_epoch) % cfg.eval_every == 0 or
                                  self.step == self.total_steps):
                    last_eval = self.evaluate()
                    self.log({"step": self.step, "epoch": self.step / self.steps_per_epoch, **last_eval})
                    if main:
                        bar.write(f"epoch {self.step // self.steps_per_epoch}: " +
                                  ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
                    self.model.train()
                if epoch_end or (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or self.step == stop_at:
                    self.save()
                if self.step >= stop_at:
                    break
        bar.close()
        if self.step == self.total_steps and not last_eval:
            last_eval = self.evaluate()
        summary = {"steps": self.step, "epochs": self.step / self.steps_per_epoch, "resumed": resumed,
                   "final_train_loss": next((r["loss"] for r in reversed(self.history) if "loss" in r), None),
                   **last_eval}
        if main:
            plot_curves(self.history, os.path.join(cfg.output, "curves.png"))
            with open(os.path.join(cfg.output, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
        return summary


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
