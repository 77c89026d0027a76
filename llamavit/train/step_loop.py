"""The one step loop every trainer runs on: supervised training, AIM and MAE pre-training, diffusion
training, probing and fine-tuning.

The loop owns everything but the loss: data order, autocast, gradient accumulation (with DDP's
`no_sync`), clipping, the non-finite stop, EMA (timm's ModelEmaV3), `torch.compile`, DDP/FSDP2
wrapping, checkpoints, exact resume, the JSONL log (and TensorBoard, --tensorboard), the progress bar and
summary.json. A trainer's __init__ builds its config (a LoopConfig), datasets and modules and calls, in order,

    self.init_loop(cfg)                         # process group, seeds
    self.init_data(train_set)                   # sampler, steps per epoch (or streaming shards)
    self.init_training(module, model=..., ...)  # device, DDP/FSDP, compile, optimiser, schedule, EMA

and implements `loss(*micro_batch) -> {'loss': scalar tensor, other scalar terms}` (called under
autocast, on the wrapped module `self.train_module`) and `meta()` (the facts a checkpoint records to
rebuild the model). Optional hooks: `prepare_batch` (device move and the step's random draws, on the
whole local batch before it is split), `before_step`, `after_step`, `after_fit`, `record_extras`,
`summary_extras`, `time_limit_s`.

Exact resume: the data order of epoch e is a permutation seeded by (seed, e) (EpochBatchSampler); the
augmentation of sample i in epoch e is seeded by (seed, e, i) (SeededAugmentation); the loop seeds each
step's random draws (dropout, masks, noise) by (seed, step, the trainer's salt). A resumed run therefore
sees the same batches, augmentations and random draws as an uninterrupted one, and logs the same losses.

Under torchrun every rank walks the same global batches and trains on its slice of each (DDP, or FSDP2
with `fsdp`); rank 0 alone writes logs and checkpoints; checkpoints hold full (gathered) tensors, so a
run resumes on any world size, with or without FSDP.
"""
import contextlib
import fcntl
import itertools
import json
import math
import os
import random
import socket
import sys
import time
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler, PolyLRScheduler
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, TensorDataset
from tqdm import tqdm

from ..data.seeding import mix_seed
from ..errors import CheckpointError, DamagedCheckpointError, NonFiniteLossError, RunDirectoryBusy
from ..models import load_checkpoint, load_partial, read_state_dict
from .checkpoint import (EMA_NAME, LATEST, WEIGHTS_NAME, atomic_write_text, complete_checkpoints, latest_checkpoint,
                         load_training_state, remove_stale_temporaries, save_checkpoint)
from .config import LoopConfig
from .distributed import (DistEnv, all_reduce_sum, barrier, bf16_speedup, cpu_has_native_bf16, full_state_dicts,
                          init_distributed, load_full_state_dicts, wrap_model)
from .tensorboard import DIR_NAME as TENSORBOARD_DIR
from .tensorboard import TensorBoardLog, require_tensorboard

# options a resumed run may change: they do not change the numbers the run computes
# (the global batch stays: processes, FSDP and accumulation only split it)
RESUME_FREE_OPTIONS = {"resume", "allow_config_change", "max_steps", "progress", "log_every", "ckpt_every",
                       "keep_checkpoints", "num_workers", "device", "compile", "grad_checkpointing", "fsdp",
                       "grad_accum_steps", "eval_every", "max_minutes", "recon_every", "output", "tensorboard"}

# what a run writes at the top of its output directory (a trainer may add plots beside them)
RUN_FILES = ("checkpoints", "log.jsonl", "config.json", "summary.json", "curves.png", TENSORBOARD_DIR)


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


def seed_everything(seed: int) -> None:
    """Seed the Python, NumPy and torch CPU generators (train steps also call torch.manual_seed per step)."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    # the CPU generator alone: torch.manual_seed also reseeds every accelerator and costs ~90 us,
    # too much to pay once per sample
    torch.random.default_generator.manual_seed(seed)


def make_output_dir(output: str) -> None:
    """Create the run directory, or say in one line why it cannot be one (a file, under a file, not writable)."""
    try:
        os.makedirs(output, exist_ok=True)
    except FileExistsError:
        raise ValueError(f"--output {output} is a file; expected a directory for the run") from None
    except NotADirectoryError:
        raise ValueError(f"--output {output} lies under a file; expected a directory path") from None
    except PermissionError as e:
        raise ValueError(f"cannot create --output {output}: {e.strerror}") from None
    if not os.access(output, os.W_OK | os.X_OK):
        raise ValueError(f"--output {output} is not writable")


def read_log(path: str) -> List[Dict[str, Any]]:
    """The records of a log.jsonl. A torn last line (a run killed while writing it) is dropped; a damaged line
    before it is an error naming the file and line."""
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path} line {i + 1} is not a JSON record ({e.msg}): the log is damaged; move it "
                             f"aside to resume without it") from None
    return records


class RunDirectoryLock:
    """An exclusive lock on a run directory for the life of a run (`<output>/.lock`, an flock: the kernel drops
    it when the process ends, even by SIGKILL, so a dead run never blocks the next). A second run into the same
    directory is refused in one line naming the holder."""

    NAME = ".lock"

    def __init__(self, output: str):
        self.path, self.fd = os.path.join(output, self.NAME), None

    def __enter__(self) -> "RunDirectoryLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirectoryBusy(f"{os.path.dirname(self.path)} is in use by another run ({holder}): wait for it "
                                   f"to end, or train into another --output") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}"
                 .encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


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
    collate_fn = None                    # the DataLoader's (None: torch's default); detection pads its targets
    step_salt = 104729                   # each trainer draws its step's randomness from (seed, step, salt + rank)

    def amp_pays_off(self) -> bool:
        """--amp runs bf16 autocast only where bf16 is faster: on a CPU a matmul in both dtypes decides (once per
        process, `bf16_speedup`); otherwise fp32, with one line saying why. The numbers of the run then depend on
        the machine's answer, which config.json's `amp_in_effect` records."""
        if self.env.device.type != "cpu":
            return True
        speedup = bf16_speedup("cpu")
        if speedup >= 1.0:
            return True
        if self.env.is_main:
            flags = "has" if cpu_has_native_bf16() else "lacks"
            print(f"note: --amp ignored: a bf16 matmul runs {1 / speedup:.1f}x slower than float32 on this CPU (it "
                  f"{flags} AVX512-BF16 / AMX); training in float32", file=sys.stderr)
        return False

    # --- set-up, called by the trainer's __init__ in this order --------------------------------
    def init_loop(self, cfg: LoopConfig) -> None:
        """Join the process group (under torchrun), seed, check the batch splits."""
        self.cfg = cfg
        self.env: DistEnv = init_distributed(cfg.device)
        if cfg.batch_size % (self.env.world_size * cfg.grad_accum_steps):
            raise ValueError(f"batch_size {cfg.batch_size} (global) must be divisible by processes x "
                             f"grad_accum_steps = {self.env.world_size} x {cfg.grad_accum_steps}")
        seed_everything(cfg.seed)
        self.amp = cfg.amp and self.amp_pays_off()
        self.step = 0
        self.history: List[Dict[str, Any]] = []
        self.log_path = os.path.join(cfg.output, "log.jsonl")
        self.bar = None
        self.tensorboard: Optional[TensorBoardLog] = None   # rank 0 with --tensorboard, while fit() runs
        if cfg.tensorboard and self.env.is_main:
            require_tensorboard()   # before any work: the missing package is one line
        # the log's running window: sums of each term and their count since the last record (checkpointed,
        # so a resumed run logs the means an uninterrupted one logs)
        self.window: Dict[str, float] = {}
        self.window_n = 0

    def init_data(self, train_set: Dataset) -> None:
        """Training data: an indexable dataset (seeded order and augmentation), a TensorDataset (batches
        indexed in memory) or streaming shards (each rank streams its own)."""
        cfg, env = self.cfg, self.env
        self.streaming = isinstance(train_set, IterableDataset)
        if len(train_set) < cfg.batch_size:
            raise ValueError(f"the training set has {len(train_set)} images, fewer than one batch of {cfg.batch_size}")
        if self.streaming:
            train_set.rank, train_set.world_size = env.rank, env.world_size
            self.train_set, self.sampler = train_set, None
        else:
            self.sampler = EpochBatchSampler(len(train_set), cfg.batch_size, cfg.seed, env.rank, env.world_size)
            self.train_set = train_set if isinstance(train_set, TensorDataset) else SeededAugmentation(train_set,
                                                                                                       cfg.seed)
        self.steps_per_epoch = len(train_set) // cfg.batch_size
        self.total_steps = max(1, round(cfg.epochs * self.steps_per_epoch))

    def init_training(self, module: nn.Module, model: Optional[nn.Module] = None, lr: float = 1e-3,
                      weight_decay: float = 0.0, betas: Tuple[float, float] = (0.9, 0.999),
                      warmup_steps: int = 0, warmup_lr: float = 1e-6, min_lr: float = 0.0,
                      schedule: str = "cosine", ema_decay: float = 0.0, ema_class: type = ModelEmaV3,
                      layer_decay: Optional[float] = None, saved_keys: Optional[List[str]] = None) -> None:
        """Place and wrap the trained `module` (DDP / FSDP2 / compile), and build its optimiser and schedule.

        model: the part of `module` whose weights make the checkpoint's model.safetensors (the trunk of a
        pre-training objective); default the module itself. The rest of the module (a decoder) is saved
        with the optimiser. schedule: 'cosine' or 'poly' (timm's, per step, with linear warm-up; poly of power
        1 as mmseg's PolyLR) or 'constant'.
        ema_decay > 0: an EMA of `model` (`ema_class`: timm's ModelEmaV3 or a subclass), updated after every
        optimiser step with the number of steps done. layer_decay: timm's layer-wise learning-rate decay (the
        module's group_matcher). saved_keys: the only entries of `model`'s state dict its checkpoints store (a
        LoRA run's adapters and head; the rest is rebuilt from the base checkpoint); default all.
        Frozen parameters (requires_grad False) get no optimiser state.
        """
        cfg = self.cfg
        self.module, self.model = module, model if model is not None else module
        self.model_prefix = next((name + "." for name, m in module.named_modules() if m is self.model and name), "")
        if cfg.grad_checkpointing:
            self.model.set_grad_checkpointing(True)
        module.to(self.env.device)
        # what the step calls: DDP / FSDP2 (which shards `module` in place) / compiled
        self.train_module = wrap_model(module, self.env, cfg.fsdp)
        if cfg.compile:
            self.train_module = torch.compile(self.train_module)
        self.saved_keys = saved_keys
        self.optimizer = create_optimizer_v2(module, "adamw", lr=lr, weight_decay=weight_decay, betas=tuple(betas),
                                             layer_decay=layer_decay)
        self.scheduler = None
        if schedule == "cosine":
            self.scheduler = CosineLRScheduler(self.optimizer, t_initial=self.total_steps, lr_min=min_lr,
                                               warmup_t=warmup_steps, warmup_lr_init=warmup_lr, t_in_epochs=False)
        elif schedule == "poly":
            self.scheduler = PolyLRScheduler(self.optimizer, t_initial=self.total_steps, power=1.0, lr_min=min_lr,
                                             warmup_t=warmup_steps, warmup_lr_init=warmup_lr, t_in_epochs=False)
        elif schedule != "constant":
            raise ValueError(f"schedule must be 'cosine', 'poly' or 'constant', got {schedule!r}")
        self.ema = ema_class(self.model, decay=ema_decay) if ema_decay > 0 else None

    # --- to implement ---------------------------------------------------------------------------
    def loss(self, *batch: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Loss terms of one micro-batch, {'loss': scalar to minimise, name: scalar to log}."""
        raise NotImplementedError

    def meta(self) -> Dict[str, Any]:
        """JSON-able facts a checkpoint records to rebuild the model (model, model_kwargs, classes, ...)."""
        raise NotImplementedError

    # --- optional hooks -------------------------------------------------------------------------
    def prepare_batch(self, *batch) -> Tuple[torch.Tensor, ...]:
        """This rank's batch -> tensors with the batch dimension first, on the device (the loop splits them
        into micro-batches). Draw the step's random values here (the generators are seeded for the step)."""
        return tuple(t.to(self.env.device, non_blocking=True) for t in batch)

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def after_fit(self) -> None:
        pass

    def record_extras(self) -> Dict[str, Any]:
        """Extra fields of every training log record."""
        return {}

    def summary_extras(self) -> Dict[str, Any]:
        return {}

    def time_limit_s(self) -> float:
        """Stop (with a checkpoint) after this many seconds of training; 0 = no limit."""
        return 0.0

    def extra_state(self) -> Dict[str, Any]:
        """State outside the module and the optimiser that a resumed run needs (checkpointed in state.pt)."""
        return {}

    def load_extra_state(self, state: Dict[str, Any]) -> None:
        """Take back what extra_state() returned."""

    def run_config(self) -> Dict[str, Any]:
        """What config.json records."""
        return {**self.cfg.to_dict(), "world_size": self.env.world_size, "amp_in_effect": self.amp}

    # --- shared ---------------------------------------------------------------------------------
    @property
    def is_main(self) -> bool:
        """Whether this process writes logs and files (rank 0 of a multi-process run)."""
        return self.env.is_main

    def seed_step(self, salt: int) -> int:
        """Seed every global generator for the current step (dropout, masks, noise); returns the seed."""
        seed = mix_seed(self.cfg.seed, self.step, salt)
        seed_everything(seed)
        torch.manual_seed(seed)
        return seed

    def epoch_batches(self, epoch: int, start_batch: int) -> Iterable:
        """This rank's batches of `epoch` from batch `start_batch` on (the same ones after a resume)."""
        if self.streaming:
            self.train_set.epoch = epoch
            local = self.cfg.batch_size // self.env.world_size
            loader = DataLoader(self.train_set, batch_size=local, num_workers=self.cfg.num_workers, drop_last=True,
                                collate_fn=self.collate_fn)
            return itertools.islice(loader, start_batch, self.steps_per_epoch)
        self.sampler.epoch, self.sampler.start_batch = epoch, start_batch
        if isinstance(self.train_set, TensorDataset):   # cached tensors (probe features): index whole batches
            return (tuple(t[idx] for t in self.train_set.tensors) for idx in map(torch.tensor, self.sampler))
        self.train_set.epoch = epoch
        return DataLoader(self.train_set, batch_sampler=self.sampler, num_workers=self.cfg.num_workers,
                          collate_fn=self.collate_fn)

    def train_step(self, *batch) -> Dict[str, float]:
        """One optimiser step on a global batch (this rank's slice of it) -> the global-batch mean of each term."""
        cfg = self.cfg
        self.before_step()
        if self.scheduler is not None:
            self.scheduler.step_update(self.step)
        self.seed_step(self.step_salt + self.env.rank)
        batch = self.prepare_batch(*batch)
        self.optimizer.zero_grad(set_to_none=True)
        accum, names, sums = cfg.grad_accum_steps, None, None
        for i, micro in enumerate(zip(*(t.chunk(accum) for t in batch))):
            # DDP: all-reduce gradients only once, on the last micro-batch
            sync = contextlib.nullcontext() if i == accum - 1 or not hasattr(self.train_module, "no_sync") \
                else self.train_module.no_sync()
            with sync:
                with torch.autocast(self.env.device.type, dtype=torch.bfloat16, enabled=self.amp):
                    terms = self.loss(*micro)
                (terms["loss"] / accum).backward()
            values = torch.stack([v.detach().float() for v in terms.values()]) / accum
            names, sums = list(terms), values if sums is None else sums + values
        # the global-batch means, the same on every rank (so a NaN stops every rank at once)
        means = all_reduce_sum(sums.double().cpu(), self.env) / self.env.world_size
        record = dict(zip(names, means.tolist()))
        self.check_finite("loss", record["loss"])
        if cfg.clip_grad:
            norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), cfg.clip_grad)
            self.check_finite("gradient norm", float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm))
        self.optimizer.step()
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)
        return record

    def check_finite(self, what: str, value: float) -> None:
        """Raise NonFiniteLossError (the last good checkpoint is kept) unless value is finite."""
        if not math.isfinite(value):
            raise NonFiniteLossError(f"{what} is {value} at step {self.step}; training stopped, {self._kept()}")

    def _kept(self) -> str:
        """What is left to resume from, for the non-finite stops."""
        latest = latest_checkpoint(self.cfg.output)
        if latest is None:
            return "before any checkpoint was written (lower the learning rate and start again)"
        return f"nothing was saved after the last good checkpoint, {latest}"

    def _check_weights_finite(self) -> None:
        """Before a checkpoint: a finite loss can still come with an update that made the weights non-finite."""
        bad = sum(int(not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all())
                  for p in self.module.parameters() if p.is_floating_point())
        if all_reduce_sum(torch.tensor([float(bad)], dtype=torch.float64), self.env).item():
            raise NonFiniteLossError(f"the weights became NaN or infinite at step {self.step} (is the learning rate "
                                     f"too high?); training stopped, {self._kept()}")

    # --- checkpoints ----------------------------------------------------------------------------
    def save(self) -> str:
        """Checkpoint: the model's weights + meta in model.safetensors, the rest of the module, the optimiser
        and the step in state.pt, the EMA beside them (collective under FSDP: every rank gathers, rank 0 writes)."""
        self._check_weights_finite()
        module_sd, optim_sd = full_state_dicts(self.module, self.optimizer)
        path = ""
        if self.is_main:
            p = self.model_prefix
            model_sd = {k[len(p):]: v for k, v in module_sd.items() if k.startswith(p)}
            rest = {k: v for k, v in module_sd.items() if not k.startswith(p)}
            if self.saved_keys is not None:
                model_sd = {k: model_sd[k] for k in self.saved_keys}
            state = {"step": self.step, "optimizer": optim_sd, "config": self.cfg.to_dict(), "module_rest": rest,
                     "log_window": {"sums": dict(self.window), "count": self.window_n}, "extra": self.extra_state()}
            path = save_checkpoint(self.cfg.output, self.step, self.model, self.meta(), state,
                                   ema=self.ema.module if self.ema is not None else None,
                                   keep=self.cfg.keep_checkpoints, model_state=model_sd)
        barrier(self.env)
        return path

    def restore(self, checkpoint_dir: str, state: Optional[Dict[str, Any]] = None) -> int:
        """Load weights, the rest of the module, the optimiser, the EMA and the loop's state from a checkpoint
        (its state.pt read already: `state`); -> its step."""
        state = state if state is not None else load_training_state(checkpoint_dir)
        rest = state.get("module_rest", {})
        if self.cfg.fsdp:   # sharded parameters take the full tensors through torch.distributed.checkpoint
            p = self.model_prefix
            model_sd = read_state_dict(os.path.join(checkpoint_dir, WEIGHTS_NAME))
            full = {**{p + k: v for k, v in model_sd.items()}, **rest}
            load_full_state_dicts(self.module, self.optimizer, full, state["optimizer"])
        elif self.saved_keys is not None:   # a LoRA run's adapters and head over the rebuilt base
            load_partial(self.model, os.path.join(checkpoint_dir, WEIGHTS_NAME), self.saved_keys)
            load_full_state_dicts(self.module, self.optimizer, None, state["optimizer"])
        else:               # the usual checks: a checkpoint of another model is refused by name
            load_checkpoint(self.model, checkpoint_dir)
            if self.module is not self.model:
                _load_rest(self.module, rest, self.model_prefix, checkpoint_dir)
            load_full_state_dicts(self.module, self.optimizer, None, state["optimizer"])
        if self.ema is not None:
            ema_path = os.path.join(checkpoint_dir, EMA_NAME)
            load_checkpoint(self.ema.module, ema_path if os.path.isfile(ema_path) else checkpoint_dir)
        window = state.get("log_window", {"sums": {}, "count": 0})
        self.window, self.window_n = dict(window["sums"]), int(window["count"])
        self.load_extra_state(state.get("extra", {}))
        return int(state["step"])

    def try_resume(self) -> bool:
        """Restore the run directory's latest checkpoint and cut the log back to it; -> whether there was one."""
        ckpt = latest_checkpoint(self.cfg.output)
        if ckpt is None:
            if self.is_main:
                print(f"--resume: {self.cfg.output} holds no checkpoint yet; starting a fresh run")
            return False
        changes = self._restore_newest_intact(ckpt)
        if self.is_main and os.path.isfile(self.log_path):   # drop what came after the checkpoint, and stops' records
            # a stop's partial record goes (its window is in the checkpoint); the run's own last record stays
            self.history = [r for r in read_log(self.log_path) if r.get("step", 0) <= self.step
                            and not (r.get("partial") and r["step"] < self.total_steps)]
            with open(self.log_path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.history)
        if changes:
            self.log({"step": self.step, "config_change": changes})
        return True

    def _restore_newest_intact(self, latest: str) -> Dict[str, list]:
        """Restore `latest`, or, when a file of it cannot be read, the newest intact checkpoint before it (the
        damaged one is moved to damaged-step-*, nothing is deleted); -> the option changes (see below)."""
        candidates = [latest] + [c for c in complete_checkpoints(self.cfg.output)
                                 if os.path.basename(c) < os.path.basename(latest)]
        for i, ckpt in enumerate(candidates):
            try:
                state = load_training_state(ckpt)
                changes = self.check_resumed_config(state.get("config", {}))
                self.step = self.restore(ckpt, state)
                return changes
            except DamagedCheckpointError as e:
                if i == len(candidates) - 1:
                    raise DamagedCheckpointError(f"no intact checkpoint to resume from in {self.cfg.output}: "
                                                 f"{e}") from e
                if self.is_main:
                    aside = base = os.path.join(os.path.dirname(ckpt), "damaged-" + os.path.basename(ckpt))
                    suffix = 1
                    while os.path.exists(aside):
                        aside, suffix = f"{base}-{suffix}", suffix + 1
                    os.replace(ckpt, aside)
                    atomic_write_text(os.path.join(os.path.dirname(ckpt), LATEST), os.path.basename(candidates[i + 1]))
                    print(f"--resume: {ckpt} is damaged ({e}); moved to {aside}, resuming from the one before")
        return {}

    def check_resumed_config(self, saved: Dict[str, Any]) -> Dict[str, list]:
        """The options that differ from the checkpointed run's ({name: [old, new]}, those that do not change the
        numbers left out); refused unless allow_config_change."""
        now = json.loads(json.dumps(self.cfg.to_dict()))   # tuples as lists, as the checkpoint's JSON-able copy
        before = json.loads(json.dumps(saved, default=list))
        changes = {k: [before[k], v] for k, v in now.items()
                   if k in before and before[k] != v and k not in RESUME_FREE_OPTIONS}
        if changes and not self.cfg.allow_config_change:
            listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
            raise ValueError(f"--resume with other options than the run in {self.cfg.output} ({listed}): resume "
                             f"with the run's options, or pass --allow-config-change to go on with the new ones "
                             f"(the change is logged)")
        return changes

    def log(self, record: Dict[str, Any]) -> None:
        """Append a record to the history and (rank 0) to log.jsonl, and its numbers to TensorBoard (--tensorboard)."""
        self.history.append(record)
        if self.is_main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.tensorboard is not None:
                self.tensorboard.scalars(record)

    # --- the loop -------------------------------------------------------------------------------
    def fit(self) -> Dict[str, Any]:
        """Train to the end (or max_steps / the time limit), checkpointing on the way; -> the summary.
        Rank 0 holds the run directory's lock throughout: a second run into it is refused."""
        make_output_dir(self.cfg.output)
        with RunDirectoryLock(self.cfg.output) if self.is_main else contextlib.nullcontext():
            try:
                return self._fit()
            finally:
                if self.tensorboard is not None:
                    self.tensorboard.close()
                    self.tensorboard = None

    def _fit(self) -> Dict[str, Any]:
        cfg, main = self.cfg, self.is_main
        if main:
            remove_stale_temporaries(cfg.output)
        resumed = cfg.resume and self.try_resume()
        if main:
            moved = None if resumed else set_aside_earlier_run(cfg.output)
            if moved:
                print(f"{cfg.output} held an earlier run (not resumed): its files were moved to {moved}")
            with open(os.path.join(cfg.output, "config.json"), "w") as f:
                json.dump(self.run_config(), f, indent=2)
            if cfg.tensorboard:   # a resumed run drops the events an interrupted one wrote after its checkpoint
                self.tensorboard = TensorBoardLog(cfg.output, purge_step=self.step + 1 if resumed else None)
        stop_at = min(self.total_steps, cfg.max_steps) if cfg.max_steps else self.total_steps
        self.bar = tqdm(total=stop_at, initial=self.step, disable=not (cfg.progress and main),
                        desc=self.progress_desc, unit="step", dynamic_ncols=True)
        window_t = start = time.perf_counter()
        limit = self.time_limit_s()
        self.module.train()
        while self.step < stop_at:
            for batch in self.epoch_batches(self.step // self.steps_per_epoch, self.step % self.steps_per_epoch):
                for k, v in self.train_step(*batch).items():
                    self.window[k] = self.window.get(k, 0.0) + v
                self.window_n += 1
                self.bar.update(1)
                if limit and time.perf_counter() - start >= limit:
                    stop_at = self.step
                boundary = self.step % cfg.log_every == 0
                if boundary or self.step == stop_at:
                    elapsed = time.perf_counter() - window_t
                    record = {"step": self.step, "epoch": self.step / self.steps_per_epoch,
                              **{k: v / self.window_n for k, v in self.window.items()},
                              "lr": self.optimizer.param_groups[0]["lr"], **self.record_extras(),
                              "img_per_s": self.window_n * cfg.batch_size / max(elapsed, 1e-9)}
                    if not boundary:   # a stop inside a window: its window goes on in the checkpoint, and a
                        record["partial"] = True   # resumed run drops this record (its log stays the whole run's)
                    self.log(record)
                    self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                         img_s=f"{record['img_per_s']:.0f}")
                    if boundary:
                        self.window, self.window_n, window_t = {}, 0, time.perf_counter()
                self.after_step()
                epoch_end = self.step % self.steps_per_epoch == 0
                if epoch_end or (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or self.step == stop_at:
                    self.save()
                if self.step >= stop_at:
                    break
        self.bar.close()
        self.after_fit()
        if self.tensorboard is not None:   # the plots after_fit wrote (curves.png, reconstructions, samples)
            self.tensorboard.images(cfg.output, self.step)
        summary = {"steps": self.step, "epochs": self.step / self.steps_per_epoch, "resumed": resumed,
                   "train_seconds": time.perf_counter() - start,
                   "final_train_loss": next((r["loss"] for r in reversed(self.history) if "loss" in r), None),
                   **self.summary_extras()}
        if main:
            with open(os.path.join(cfg.output, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
        return summary


def _load_rest(module: nn.Module, rest: Dict[str, torch.Tensor], model_prefix: str, source: str) -> None:
    """Load the checkpoint's non-model entries (a decoder, a mask token) into `module`, strictly."""
    result = module.load_state_dict(rest, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(model_prefix)]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{source} does not fit the trained module: missing {sorted(missing)[:8]}, "
                              f"unexpected {sorted(result.unexpected_keys)[:8]}")
