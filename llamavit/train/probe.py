"""Probing (`llamavit probe`): train only a head on a frozen trunk; and fine-tuning (`llamavit finetune`).

Probe heads read `forward_features` (AIM: the mean of the probe layers' raw outputs; other models:
their final-norm tokens):
- 'attentive': AIM's attentive pooling head (BatchNorm over tokens, one learned query, bias-free k/v);
- 'linear': BatchNorm1d(affine=False) then Linear on the mean token (MAE's linear probe).
Without augmentation the trunk's features are computed once and cached (float16), so an epoch of
probing costs only the head.
"""
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch.utils.data import DataLoader, Subset, TensorDataset
from tqdm import tqdm

from ..data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, TransformConfig, build_dataset, build_transform
from ..layers.attentive_pool import AttentivePoolingHead
from ..models import create_model, read_state_dict
from ..models.registry import filter_fn_for
from .checkpoint import read_meta, resolve_checkpoint
from .config import Options, TrainConfig
from .loop import Trainer

HEADS = ("attentive", "linear")


@dataclass
class ProbeConfig(Options):
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
    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    output: str = "runs/probe"
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.checkpoint is None and self.model is None:
            raise ValueError("give a checkpoint to probe, or a model name to probe a randomly initialised trunk")


HELP = {
    "checkpoint": "llamavit run/checkpoint dir, or an official weights file (then --model names it)",
    "model": "model name (default: the checkpoint's); without --checkpoint: a randomly initialised trunk",
    "head": "attentive | linear", "augment": "augment each step (RandomResizedCrop 0.4-1 + flip); no feature cache",
    "img_size": "input size (0 = the checkpoint's)", "in_chans": "input channels (0 = the checkpoint's)",
}


class LinearProbeHead(nn.Module):
    """Mean token -> BatchNorm1d(affine=False) -> Linear. (B, N, D) or (B, D) -> (B, num_classes)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.bn(x.mean(dim=1) if x.ndim == 3 else x))


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
        load_backbone(model, cfg.checkpoint)
    return model, {"model": name, **kwargs}


def checkpoint_model(checkpoint: Optional[str], model: Optional[str]) -> Tuple[str, Dict[str, Any]]:
    """(model name, build kwargs): from a llamavit checkpoint's metadata unless another model is named."""
    meta = read_meta(checkpoint) if checkpoint else {}
    if "model" in meta and model in (None, meta["model"]):
        return meta["model"], dict(meta.get("model_kwargs", {}))
    if model is None:
        raise ValueError(f"{checkpoint} is not a llamavit checkpoint: name its model with --model")
    return model, {}


def load_backbone(model: nn.Module, path: str) -> nn.Module:
    """Load every trunk weight of `path` into `model`; classifier weights that do not fit are left as initialised."""
    state = filter_fn_for(model)(read_state_dict(resolve_checkpoint(path)), model)
    own = model.state_dict()
    fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = set(own) - set(fits)
    classifier = {k for k in own if _is_classifier(model, k)}
    if missing - classifier:
        from ..models.convert import CheckpointError, _keys_report
        raise CheckpointError(f"{path} lacks trunk weights of {type(model).__name__}: {_keys_report(missing - classifier)}")
    model.load_state_dict(fits, strict=False)
    return model


def _is_classifier(model: nn.Module, key: str) -> bool:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    names = {f"{n}.{p}" for n, m in model.named_modules() if m is head for p, _ in m.named_parameters()}
    return key in names


def _transform(cfg: ProbeConfig, kwargs: Dict[str, Any], train: bool):
    mean, std = (FASHION_MNIST_MEAN, FASHION_MNIST_STD) if cfg.data == "fashion_mnist" else (None, None)
    tcfg = TransformConfig(img_size=kwargs.get("img_size", 224), in_chans=kwargs.get("in_chans", 3), mean=mean,
                           std=std, scale=(0.4, 1.0), crop_pct=1.0)
    return build_transform(tcfg, is_training=train and cfg.augment)


@torch.no_grad()
def extract_features(model: nn.Module, dataset, batch_size: int = 256, progress: bool = False):
    """Frozen features of a whole dataset: (float16 (M, N, D) tokens, int64 (M,) labels)."""
    model.eval()
    feats, labels = [], []
    for images, targets in tqdm(DataLoader(dataset, batch_size=batch_size), disable=not progress, desc="features"):
        feats.append(model.forward_features(images).half())
        labels.append(targets)
    return torch.cat(feats), torch.cat(labels)


class Prober:
    """Trains a probe head on a frozen trunk; reports validation top-1 after every epoch."""

    def __init__(self, cfg: ProbeConfig):
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.trunk, self.model_kwargs = load_trunk(cfg)
        self.trunk.eval().requires_grad_(False)
        train_set = build_dataset(cfg.data, "train", _transform(cfg, self.model_kwargs, True),
                                  img_size=self.model_kwargs.get("img_size", 224), seed=cfg.seed)
        val_set = build_dataset(cfg.data, "val", _transform(cfg, self.model_kwargs, False),
                                img_size=self.model_kwargs.get("img_size", 224), seed=cfg.seed)
        self.classes = list(train_set.classes)
        if cfg.train_subset:
            train_set = Subset(train_set, range(min(cfg.train_subset, len(train_set))))
        if cfg.val_subset:
            val_set = Subset(val_set, range(min(cfg.val_subset, len(val_set))))
        self.val_set = TensorDataset(*extract_features(self.trunk, val_set, progress=cfg.progress))
        self.train_set = train_set if cfg.augment else TensorDataset(
            *extract_features(self.trunk, train_set, progress=cfg.progress))
        dim = self.trunk.num_features
        heads = getattr(getattr(self.trunk, "cfg", None), "num_heads", max(1, dim // 64))
        self.head = (AttentivePoolingHead(dim, len(self.classes), heads) if cfg.head == "attentive"
                     else LinearProbeHead(dim, len(self.classes)))
        self.steps_per_epoch = max(1, len(self.train_set) // cfg.batch_size)
        total = cfg.epochs * self.steps_per_epoch
        self.optimizer = create_optimizer_v2(self.head, "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = CosineLRScheduler(self.optimizer, t_initial=total, lr_min=cfg.min_lr,
                                           warmup_t=int(cfg.warmup_epochs * self.steps_per_epoch),
                                           warmup_lr_init=1e-6, t_in_epochs=False)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.augment:
            with torch.no_grad():
                return self.trunk.forward_features(x)
        return x.float()

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        self.head.eval()
        correct, loss, n = 0, 0.0, 0
        for feats, y in DataLoader(self.val_set, batch_size=1024):
            logits = self.head(feats.float())
            correct += (logits.argmax(-1) == y).sum().item()
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            n += y.numel()
        self.head.train()
        return {"val_top1": 100.0 * correct / n, "val_loss": loss / n}

    def fit(self) -> Dict[str, Any]:
        cfg = self.cfg
        os.makedirs(cfg.output, exist_ok=True)
        g = torch.Generator().manual_seed(cfg.seed)
        history, step = [], 0
        self.head.train()
        for epoch in range(cfg.epochs):
            loader = DataLoader(self.train_set, batch_size=cfg.batch_size, shuffle=True, drop_last=True, generator=g)
            total = 0.0
            for x, y in tqdm(loader, disable=not cfg.progress, desc=f"probe {epoch + 1}/{cfg.epochs}"):
                self.scheduler.step_update(step)
                loss = F.cross_entropy(self.head(self._features(x)), y)
                if not math.isfinite(loss.item()):
                    raise ValueError(f"probe loss is {loss.item()} at step {step}")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                total, step = total + loss.item(), step + 1
            history.append({"epoch": epoch + 1, "train_loss": total / max(1, len(loader)), **self.evaluate()})
        summary = {"head": cfg.head, "model": self.model_kwargs["model"], "checkpoint": cfg.checkpoint,
                   "val_top1": history[-1]["val_top1"], "best_val_top1": max(h["val_top1"] for h in history),
                   "history": history}
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, os.path.join(cfg.output, "head.safetensors"),
                  metadata={"head": cfg.head, "classes": json.dumps(self.classes)})
        with open(os.path.join(cfg.output, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        return summary


def probe(cfg: ProbeConfig) -> Dict[str, Any]:
    """Probe a frozen trunk and return the summary (validation top-1 per epoch)."""
    return Prober(cfg).fit()


def finetune(cfg: TrainConfig) -> Dict[str, Any]:
    """Supervised training of every weight, starting from the trunk of `cfg.checkpoint_path` (a fresh
    classifier), with bidirectional attention (iLLaMA's soft-mask rate held at 1 unless a schedule is given)."""
    if not cfg.checkpoint_path:
        raise ValueError("finetune needs --checkpoint-path (a pre-trained llamavit run or an official file)")
    trainer = Trainer(dataclasses.replace(cfg, checkpoint_path=None))
    load_backbone(trainer.model, cfg.checkpoint_path)
    if trainer.ema is not None:
        trainer.ema.module.load_state_dict(trainer.model.state_dict())
    if cfg.soft_mask == "none" and hasattr(trainer.model, "set_soft_mask_rate"):
        trainer.model.set_soft_mask_rate(1.0)
    return trainer.fit()
