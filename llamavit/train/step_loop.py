"""The step loop shared by every trainer: supervised (loop.py), AIM/MAE pre-training, diffusion.

Exact resume: the data order of epoch e is a permutation seeded by (seed, e) (EpochBatchSampler); the
augmentation of sample i in epoch e is seeded by (seed, e, i) (SeededAugmentation); a trainer seeds its
step's random draws (dropout, masks, noise) by (seed, step). A resumed run therefore sees the same
batches, augmentations and random draws as an uninterrupted one, and logs the same losses.

A subclass builds, in its __init__, `cfg` (with output, resume, max_steps, progress, log_every,
ckpt_every, batch_size, num_workers), `train_set` (a SeededAugmentation), `sampler` (an
EpochBatchSampler), `steps_per_epoch`, `total_steps` and `optimizer`, calls `init_loop()`, and
implements `train_step(*batch) -> {'loss': ..., other terms}` (advancing `self.step`), `save()`,
`restore(checkpoint_dir) -> step` and `trained_module()`. The loop gives every trainer the same data
order, JSONL log with windowed means, checkpoint cadence, progress bar and summary.json; the hooks
below let the supervised loop add evaluation, streaming shards and multi-process runs.
"""
import json
import math
import os
import random
import time
from typing import Any, Dict, Iterable, Iterator, List, Optional

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from .checkpoint import latest_checkpoint


# what a run writes at the top of its output directory (a trainer may add plots beside them)
RUN_FILES = ("checkpoints", "log.jsonl", "config.json", "summary.json", "curves.png")


def set_aside_earlier_run(output: str) -> Optional[str]:
    """Move an earlier run's files (RUN_FILES) into output/previous-<time>/ so a fresh run in the same
    directory neither mixes its checkpoints with them nor deletes them; -> that folder, or None."""
    present = [name for name in RUN_FILES if os.path.exists(os.path.join(output, name))]
    if not {"checkpoints", "log.jsonl"} & set(present):
        return None
    base = dest = os.path.join(output, "previous-" + time.strftime("%Y%m%d-%H%M%S"))
    suffix = 1
    while os.path.exists(dest):
        dest, suffix = f"{base}-{suffix}", suffix + 1
    os.makedirs(dest)
    for name in present:
        os.replace(os.path.join(output, name), os.path.join(dest, name))
    return dest


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped without writing a checkpoint."""


def mix_seed(*parts: int) -> int:
    """One 31-bit seed from several integers (seed, epoch, index, ...); different tuples, different seeds."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) + 0x9E3779B97F4A7C15 + (h << 6) + (h >> 2))) & 0xFFFFFFFFFFFFFFFF
    return h % (2 ** 31 - 1)


def seed_everything(seed: int) -> None:
    """Seed the Python, NumPy and torch CPU generators (train steps also call torch.manual_seed per step)."""
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
        seed_everything(mix_seed(self.seed, self.epoch, index))
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
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, 7919))
        order = torch.randperm(self.num_samples, generator=g).tolist()
        local = self.batch_size // self.world_size
        for b in range(self.start_batch, self.num_samples // self.batch_size):
            start = b * self.batch_size + self.rank * local
            yield order[start:start + local]


class StepLoop:
    """fit(): train from step `self.step` to the end (or `max_steps`, or `time_limit_s()`), then summarise."""

    progress_desc = "train"

    def init_loop(self) -> None:
        self.step = 0
        self.history: List[Dict[str, Any]] = []
        self.log_path = os.path.join(self.cfg.output, "log.jsonl")
        self.bar = None

    # --- to implement ---------------------------------------------------------------------------
    def train_step(self, *batch) -> Dict[str, float]:
        raise NotImplementedError

    def save(self) -> str:
        raise NotImplementedError

    def restore(self, checkpoint_dir: str) -> int:
        """Load weights and training state from a checkpoint directory; return its step."""
        raise NotImplementedError

    def trained_module(self) -> nn.Module:
        raise NotImplementedError

    # --- optional hooks -------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        """Whether this process writes logs and files (rank 0 of a multi-process run)."""
        return True

    def epoch_batches(self, epoch: int, start_batch: int) -> Iterable:
        """The batches of `epoch` from batch `start_batch` on (the same ones after a resume)."""
        self.train_set.epoch = self.sampler.epoch = epoch
        self.sampler.start_batch = start_batch
        return DataLoader(self.train_set, batch_sampler=self.sampler, num_workers=self.cfg.num_workers)

    def time_limit_s(self) -> float:
        """Stop (with a checkpoint) after this many seconds of training; 0 = no limit."""
        return 0.0

    def record_extras(self) -> Dict[str, Any]:
        """Extra fields of every training log record."""
        return {}

    def run_config(self) -> Dict[str, Any]:
        """What config.json records."""
        return self.cfg.to_dict()

    def after_step(self) -> None:
        pass

    def after_fit(self) -> None:
        pass

    def summary_extras(self) -> Dict[str, Any]:
        return {}

    # --- shared ---------------------------------------------------------------------------------
    def seed_step(self, salt: int) -> int:
        """Seed every global generator for the current step (dropout, masks, noise); returns the seed.

        Each trainer passes its own salt, so two objectives at the same step draw differently."""
        seed = mix_seed(self.cfg.seed, self.step, salt)
        seed_everything(seed)
        torch.manual_seed(seed)
        return seed

    def check_loss(self, value: float) -> None:
        if not math.isfinite(value):
            raise NonFiniteLossError(f"loss is {value} at step {self.step}; training stopped, nothing was saved after "
                                     f"the last good checkpoint in {os.path.join(self.cfg.output, 'checkpoints')}")

    def try_resume(self) -> bool:
        ckpt = latest_checkpoint(self.cfg.output)
        if ckpt is None:
            return False
        self.step = self.restore(ckpt)
        if self.is_main and os.path.isfile(self.log_path):   # drop log lines written after the checkpoint
            with open(self.log_path) as f:
                self.history = [r for r in map(json.loads, filter(str.strip, f)) if r.get("step", 0) <= self.step]
            with open(self.log_path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.history)
        return True

    def log(self, record: Dict[str, Any]) -> None:
        self.history.append(record)
        if self.is_main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def fit(self) -> Dict[str, Any]:
        cfg, main = self.cfg, self.is_main
        os.makedirs(cfg.output, exist_ok=True)
        resumed = cfg.resume and self.try_resume()
        if main:
            moved = None if resumed else set_aside_earlier_run(cfg.output)
            if moved:
                print(f"{cfg.output} held an earlier run (not resumed): its files were moved to {moved}")
            with open(os.path.join(cfg.output, "config.json"), "w") as f:
                json.dump(self.run_config(), f, indent=2)
        stop_at = min(self.total_steps, cfg.max_steps) if cfg.max_steps else self.total_steps
        self.bar = tqdm(total=stop_at, initial=self.step, disable=not (cfg.progress and main),
                        desc=self.progress_desc, unit="step", dynamic_ncols=True)
        window: Dict[str, float] = {}
        window_n, window_t, start = 0, time.perf_counter(), time.perf_counter()
        limit = self.time_limit_s()
        self.trained_module().train()
        while self.step < stop_at:
            for batch in self.epoch_batches(self.step // self.steps_per_epoch, self.step % self.steps_per_epoch):
                for k, v in self.train_step(*batch).items():
                    window[k] = window.get(k, 0.0) + v
                window_n += 1
                self.bar.update(1)
                if limit and time.perf_counter() - start >= limit:
                    stop_at = self.step
                if self.step % cfg.log_every == 0 or self.step == stop_at:
                    elapsed = time.perf_counter() - window_t
                    record = {"step": self.step, "epoch": self.step / self.steps_per_epoch,
                              **{k: v / window_n for k, v in window.items()},
                              "lr": self.optimizer.param_groups[0]["lr"], **self.record_extras(),
                              "img_per_s": window_n * cfg.batch_size / max(elapsed, 1e-9)}
                    self.log(record)
                    self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                         img_s=f"{record['img_per_s']:.0f}")
                    window, window_n, window_t = {}, 0, time.perf_counter()
                self.after_step()
                epoch_end = self.step % self.steps_per_epoch == 0
                if epoch_end or (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or self.step == stop_at:
                    self.save()
                if self.step >= stop_at:
                    break
        self.bar.close()
        self.after_fit()
        summary = {"steps": self.step, "epochs": self.step / self.steps_per_epoch, "resumed": resumed,
                   "train_seconds": time.perf_counter() - start,
                   "final_train_loss": next((r["loss"] for r in reversed(self.history) if "loss" in r), None),
                   **self.summary_extras()}
        if main:
            with open(os.path.join(cfg.output, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
        return summary
