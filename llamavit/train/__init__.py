"""Training: the one step loop and the trainers that plug a loss into it, configs, checkpoints, schedules."""
from ..errors import NonFiniteLossError
from .checkpoint import model_from_checkpoint, read_meta, resolve_checkpoint
from .config import LoopConfig, Options, TrainConfig
from .detect import DetectConfig, DetectTrainer, load_detector, train_detector
from .finetune import finetune, finetune_config
from .generate import GenerateConfig, GenerativeTrainer, train_generative
from .pretrain import MAE_DEFAULTS, PretrainConfig, Pretrainer, pretrain
from .probe import ProbeConfig, Prober, probe
from .schedules import soft_mask_rate
from .segment import SegmentConfig, SegmentTrainer, load_segmenter, segment
from .step_loop import StepLoop
from .supervised import Trainer, train

__all__ = ["NonFiniteLossError", "model_from_checkpoint", "read_meta", "resolve_checkpoint", "LoopConfig", "Options",
           "TrainConfig", "DetectConfig", "DetectTrainer", "load_detector", "train_detector", "finetune",
           "finetune_config", "GenerateConfig", "GenerativeTrainer", "train_generative", "MAE_DEFAULTS",
           "PretrainConfig", "Pretrainer", "pretrain", "Prober", "ProbeConfig", "probe", "soft_mask_rate",
           "SegmentConfig", "SegmentTrainer", "load_segmenter", "segment", "StepLoop", "Trainer", "train"]
