"""The step loop shared by pre-training (AIM, MAE) and diffusion training.

A subclass builds, in its __init__, `cfg` (with output, resume, max_steps, progress, log_every,
ckpt_every, batch_size, num_workers), `train_set` (a SeededAugmentation), `sampler` (an
EpochBatchSampler), `steps_per_epoch`, `total_steps` and `optimizer`, calls `init_loop()`, and
implements `train_step(*batch) -> {'loss': ..., other terms}` (advancing `self.step`), `save()`,
`restore(checkpoint_dir) -> step` and `trained_module()`. The loop then gives every such trainer the
same epoch-seeded data order (resume is exact), JSONL log with windowed means, checkpoint cadence,
progress bar and summary.json. The supervised loop (loop.py) adds evaluation, EMA and distribution
on top of the same pieces.
"""
import json
import math
import os
import time
from typing import Any, Dict, List

import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .checkpoint import latest_checkpoint
from .loop import NonFiniteLossError


class StepLoop:
    """fit(): train from step `self.step` to the end (or `max_steps`, or `time_limit_s()`), then summarise."""

    progress_desc = "train"

    def init_loop(self) -> None:
        self.step = 0
        self.history: List[Dict[str, Any]] = []
        self.log_path = os.path.join(self.cfg.output, "log.jsonl")

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
    def time_limit_s(self) -> float:
        """Stop (with a checkpoint) after this many seconds of training; 0 = no limit."""
        return 0.0

    def after_step(self) -> None:
        pass

    def after_fit(self) -> None:
        pass

    def summary_extras(self) -> Dict[str, Any]:
        return {}

    # --- shared ---------------------------------------------------------------------------------
    def check_loss(self, value: float) -> None:
        if not math.isfinite(value):
            raise NonFiniteLossError(f"loss is {value} at step {self.step}; training stopped, nothing was saved after "
                                     f"the last good checkpoint in {os.path.join(self.cfg.output, 'checkpoints')}")

    def try_resume(self) -> bool:
        ckpt = latest_checkpoint(self.cfg.output)
        if ckpt is None:
            return False
        self.step = self.restore(ckpt)
        if os.path.isfile(self.log_path):   # drop log lines written after the checkpoint
            with open(self.log_path) as f:
                self.history = [r for r in map(json.loads, filter(str.strip, f)) if r.get("step", 0) <= self.step]
            with open(self.log_path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.history)
        return True

    def log(self, record: Dict[str, Any]) -> None:
        self.history.append(record)
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def fit(self) -> Dict[str, Any]:
        cfg = self.cfg
        os.makedirs(cfg.output, exist_ok=True)
        resumed = cfg.resume and self.try_resume()
        if not resumed and os.path.isfile(self.log_path):
            os.remove(self.log_path)
        with open(os.path.join(cfg.output, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2)
        stop_at = min(self.total_steps, cfg.max_steps) if cfg.max_steps else self.total_steps
        bar = tqdm(total=stop_at, initial=self.step, disable=not cfg.progress, desc=self.progress_desc, unit="step",
                   dynamic_ncols=True)
        window: Dict[str, float] = {}
        window_n, window_t, start = 0, time.perf_counter(), time.perf_counter()
        limit = self.time_limit_s()
        self.trained_module().train()
        while self.step < stop_at:
            epoch = self.step // self.steps_per_epoch
            self.train_set.epoch = self.sampler.epoch = epoch
            self.sampler.start_batch = self.step % self.steps_per_epoch
            for batch in DataLoader(self.train_set, batch_sampler=self.sampler, num_workers=cfg.num_workers):
                for k, v in self.train_step(*batch).items():
                    window[k] = window.get(k, 0.0) + v
                window_n += 1
                bar.update(1)
                if limit and time.perf_counter() - start >= limit:
                    stop_at = self.step
                if self.step % cfg.log_every == 0 or self.step == stop_at:
                    elapsed = time.perf_counter() - window_t
                    record = {"step": self.step, "epoch": self.step / self.steps_per_epoch,
                              **{k: v / window_n for k, v in window.items()},
                              "lr": self.optimizer.param_groups[0]["lr"],
                              "img_per_s": window_n * cfg.batch_size / max(elapsed, 1e-9)}
                    self.log(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                    window, window_n, window_t = {}, 0, time.perf_counter()
                self.after_step()
                epoch_end = self.step % self.steps_per_epoch == 0
                if epoch_end or (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or self.step == stop_at:
                    self.save()
                if self.step >= stop_at:
                    break
        bar.close()
        self.after_fit()
        summary = {"steps": self.step, "epochs": self.step / self.steps_per_epoch, "resumed": resumed,
                   "train_seconds": time.perf_counter() - start,
                   "final_loss": next((r["loss"] for r in reversed(self.history) if "loss" in r), None),
                   **self.summary_extras()}
        with open(os.path.join(cfg.output, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        return summary
