"""Probing (`llamavit probe`): train only a head on a frozen trunk, on the step loop.

Probe heads read `forward_features` (AIM: the mean of the probe layers' raw outputs; other models:
their final-norm tokens):
- 'attentive': AIM's attentive pooling head (BatchNorm over tokens, one learned query, bias-free k/v);
- 'linear': BatchNorm1d(affine=False) then Linear on the mean token (MAE's linear probe).
Without augmentation the trunk's features are computed once and cached (float16), so an epoch of
probing costs only the head. The head is checkpointed and resumed like any run; head.safetensors holds
the final head.
"""
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Subset, TensorDataset
from tqdm import tqdm

from ..data import (FASHION_MNIST_MEAN, FASHION_MNIST_STD, TransformConfig, build_dataset, build_transform,
                    check_classes)
from ..layers import AttentivePoolingHead, LinearProbeHead
from ..models import create_model, load_backbone
from .checkpoint import read_meta, resolve_checkpoint
from .config import LoopConfig
from .distributed import all_reduce_sum
from .step_loop import StepLoop

HEADS = ("attentive", "linear")
ATTENTIONS = ("bidirectional", "causal")


@dataclass
class ProbeConfig(LoopConfig):
    """Options of `llamavit probe` (with the step loop's, LoopConfig)."""
    _kind = "probe"
    checkpoint: Optional[str] = None        # llamavit run/checkpoint, or an official file with --model
    model: Optional[str] = None             # model name (default: the checkpoint's); alone = random trunk
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    head: str = "attentive"
    data: str = "fashion_mnist"
    train_subset: int = 0
    val_subset: int = 0
    img_size: int = 0                       # 0 = the checkpoint's
    in_chans: int = 0                       # 0 = the checkpoint's
    augment: bool = False                   # RandomResizedCrop + flip per step (no feature cache)
    attention: Optional[str] = None         # None = the trunk's own | 'bidirectional' | 'causal' (an explicit mask)
    batch_size: int = 256
    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    output: str = "runs/probe"

    _ranges = {"train_subset": (">=", 0), "val_subset": (">=", 0), "img_size": (">=", 0), "in_chans": (">=", 0),
               "lr": (">=", 0), "min_lr": (">=", 0), "warmup_epochs": (">=", 0), "weight_decay": (">=", 0)}

    def __post_init__(self):
        super().__post_init__()
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.attention not in (None, *ATTENTIONS):
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.checkpoint is None and self.model is None:
            raise ValueError("give a checkpoint to probe, or a model name to probe a randomly initialised trunk")


HELP = {
    "checkpoint": "llamavit run/checkpoint dir, or an official weights file (then --model names it)",
    "model": "model name (default: the checkpoint's); without --checkpoint: a randomly initialised trunk",
    "head": "attentive | linear",
    "attention": "the trunk's attention while probing: bidirectional | causal (default: the trunk's own)",
    "augment": "augment each step (RandomResizedCrop 0.4-1 + flip); no feature cache",
    "img_size": "input size (0 = the checkpoint's)", "in_chans": "input channels (0 = the checkpoint's)",
}


def load_trunk(cfg: ProbeConfig) -> Tuple[nn.Module, Dict[str, Any]]:
    """The frozen trunk (num_classes 0) and its build kwargs: a llamavit checkpoint, an official file, or random."""
    overrides = {"num_classes": 0, **cfg.model_kwargs}
    for name in ("img_size", "in_chans"):
        if getattr(cfg, name):
            overrides[name] = getattr(cfg, name)
    name, kwargs = checkpoint_model(cfg.checkpoint, cfg.model)
    kwargs = {**kwargs, **overrides}
    model = create_model(name, **kwargs)
    if cfg.checkpoint:
        load_backbone(model, resolve_checkpoint(cfg.checkpoint))
    return model, {"model": name, **kwargs}


def checkpoint_model(checkpoint: Optional[str], model: Optional[str]) -> Tuple[str, Dict[str, Any]]:
    """(model name, build kwargs): from a llamavit checkpoint's metadata unless another model is named."""
    meta = read_meta(checkpoint) if checkpoint else {}
    if "model" in meta and model in (None, meta["model"]):
        return meta["model"], dict(meta.get("model_kwargs", {}))
    if model is None:
        raise ValueError(f"{checkpoint} is not a llamavit checkpoint: name its model with --model")
    return model, {}


def _transform(cfg: ProbeConfig, kwargs: Dict[str, Any], train: bool):
    mean, std = (FASHION_MNIST_MEAN, FASHION_MNIST_STD) if cfg.data == "fashion_mnist" else (None, None)
    tcfg = TransformConfig(img_size=kwargs.get("img_size", 224), in_chans=kwargs.get("in_chans", 3), mean=mean,
                           std=std, scale=(0.4, 1.0), crop_pct=1.0)
    return build_transform(tcfg, is_training=train and cfg.augment)


@torch.no_grad()
def trunk_features(model: nn.Module, images: torch.Tensor, attention: Optional[str] = None,
                   num_tokens: Optional[int] = None) -> torch.Tensor:
    """forward_features (B, T, D) with the trunk's own attention (None), or with an explicit all-tokens mask:
    'bidirectional' (every token sees every token) or 'causal' (token i sees tokens j <= i). num_tokens: T when
    known (else one image's forward tells it)."""
    if attention is None:
        return model.forward_features(images)
    total = num_tokens or model.forward_features(images[:1]).shape[1]
    mask = torch.ones(total, total, dtype=torch.bool, device=images.device)
    return model.forward_features(images, attn_mask=mask if attention == "bidirectional" else mask.tril())


@torch.no_grad()
def extract_features(model: nn.Module, dataset, batch_size: int = 256, progress: bool = False, device=None,
                     attention: Optional[str] = None):
    """Frozen features of a whole dataset (trunk_features with `attention`): (float16 (M, T, D) tokens on the
    CPU, int64 (M,) labels)."""
    model.eval()
    feats, labels, num_tokens = [], [], None
    for images, targets in tqdm(DataLoader(dataset, batch_size=batch_size), disable=not progress, desc="features"):
        images = images.to(device)
        if attention is not None and num_tokens is None:   # every image has the same size: one forward tells T
            num_tokens = model.forward_features(images[:1]).shape[1]
        feats.append(trunk_features(model, images, attention, num_tokens).half().cpu())
        labels.append(targets)
    return torch.cat(feats), torch.cat(labels)


class Prober(StepLoop):
    """Trains a probe head on a frozen trunk; reports validation top-1 after every epoch."""

    progress_desc = "probe"

    def __init__(self, cfg: ProbeConfig):
        self.init_loop(cfg)
        self.trunk, self.model_kwargs = load_trunk(cfg)
        self.trunk.eval().requires_grad_(False).to(self.env.device)
        train_set = build_dataset(cfg.data, "train", _transform(cfg, self.model_kwargs, True),
                                  img_size=self.model_kwargs.get("img_size", 224), seed=cfg.seed)
        val_set = build_dataset(cfg.data, "val", _transform(cfg, self.model_kwargs, False),
                                img_size=self.model_kwargs.get("img_size", 224), seed=cfg.seed)
        self.classes = list(train_set.classes)
        check_classes(val_set.classes, self.classes, f"the validation set of {cfg.data}")
        if cfg.train_subset:
            train_set = Subset(train_set, range(min(cfg.train_subset, len(train_set))))
        if cfg.val_subset:
            val_set = Subset(val_set, range(min(cfg.val_subset, len(val_set))))
        device = self.env.device
        extract = dict(progress=cfg.progress, device=device, attention=cfg.attention)
        self.val_set = TensorDataset(*extract_features(self.trunk, val_set, **extract))
        self.init_data(train_set if cfg.augment else TensorDataset(*extract_features(self.trunk, train_set, **extract)))
        dim = self.trunk.num_features
        heads = getattr(getattr(self.trunk, "cfg", None), "num_heads", max(1, dim // 64))
        head = (AttentivePoolingHead(dim, len(self.classes), heads) if cfg.head == "attentive"
                else LinearProbeHead(dim, len(self.classes)))
        self.init_training(head, lr=cfg.lr, weight_decay=cfg.weight_decay,
                           warmup_steps=int(cfg.warmup_epochs * self.steps_per_epoch), warmup_lr=1e-6,
                           min_lr=cfg.min_lr, ema_decay=cfg.ema_decay)

    def meta(self) -> Dict[str, Any]:
        return {"probe_head": self.cfg.head, "attention": self.cfg.attention, "trunk": self.model_kwargs,
                "trunk_checkpoint": self.cfg.checkpoint, "classes": self.classes}

    def prepare_batch(self, x: torch.Tensor, y: torch.Tensor):
        x, y = x.to(self.env.device), y.to(self.env.device)
        if self.cfg.augment:   # images: the frozen trunk's features of this step's augmented batch
            x = trunk_features(self.trunk, x, self.cfg.attention)
        return x.float(), y

    def loss(self, features: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"loss": F.cross_entropy(self.train_module(features), targets)}

    def after_step(self) -> None:
        if self.step % self.steps_per_epoch == 0:
            self.log({"step": self.step, "epoch": self.step / self.steps_per_epoch, **self.evaluate()})

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """Top-1 and loss of the head on the cached validation features (every world_size-th on each rank)."""
        self.module.eval()
        sums = torch.zeros(3, dtype=torch.float64)
        shard = Subset(self.val_set, range(self.env.rank, len(self.val_set), self.env.world_size))
        for feats, y in DataLoader(shard, batch_size=1024):
            logits = self.module(feats.float().to(self.env.device)).float().cpu()
            sums += torch.tensor([(logits.argmax(-1) == y).sum().item(),
                                  F.cross_entropy(logits, y, reduction="sum").item(), y.numel()], dtype=torch.float64)
        self.module.train()
        correct, loss, n = all_reduce_sum(sums, self.env).tolist()
        return {"val_top1": 100.0 * correct / n, "val_loss": loss / n}

    def summary_extras(self) -> Dict[str, Any]:
        """Final and best validation top-1, and per evaluation: the epoch, the mean training loss since the
        evaluation before it, validation top-1 and loss (from the log, so a resumed run reports them all)."""
        history, since = [], []
        for r in self.history:
            if "loss" in r:
                since.append(r["loss"])
            elif "val_top1" in r:
                history.append({"epoch": r["epoch"], "train_loss": sum(since) / max(1, len(since)),
                                "val_top1": r["val_top1"], "val_loss": r["val_loss"]})
                since = []
        final = history[-1] if history and history[-1]["epoch"] == self.step / self.steps_per_epoch else None
        final = final or self.evaluate()   # a run stopped within an epoch: evaluated here, not logged
        return {"head": self.cfg.head, "model": self.model_kwargs["model"], "checkpoint": self.cfg.checkpoint,
                "val_top1": final["val_top1"],
                "best_val_top1": max([h["val_top1"] for h in history] + [final["val_top1"]]),
                "history": history}

    def after_fit(self) -> None:
        if self.is_main:
            head = {k: v.detach().contiguous().cpu() for k, v in self.module.state_dict().items()}
            save_file(head, os.path.join(self.cfg.output, "head.safetensors"),
                      metadata={"head": self.cfg.head, "classes": json.dumps(self.classes)})


def probe(cfg: ProbeConfig) -> Dict[str, Any]:
    """Probe a frozen trunk and return the summary (validation top-1 per epoch)."""
    return Prober(cfg).fit()
