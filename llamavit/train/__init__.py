"""Training: config, loop, checkpoints, schedules."""
from .checkpoint import model_from_checkpoint, read_meta, resolve_checkpoint
from .config import TrainConfig
from .loop import Trainer, train
from .step_loop import NonFiniteLossError
from .schedules import soft_mask_rate

__all__ = ["model_from_checkpoint", "read_meta", "resolve_checkpoint", "TrainConfig", "NonFiniteLossError",
           "Trainer", "train", "soft_mask_rate"]
