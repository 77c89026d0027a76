"""Fine-tuning (`llamavit finetune`): supervised training from a pre-trained trunk (every weight, or LoRA
adapters / the parameters the freeze patterns leave)."""
from typing import Any, Dict

from .config import TrainConfig
from .probe import checkpoint_model
from .supervised import Trainer


def finetune_config(checkpoint_path: str, **options) -> TrainConfig:
    """The TrainConfig of a fine-tuning run from `checkpoint_path`: unless `model` is given, the checkpoint's
    model, input size, channels and architecture options (the run's own options win; the classifier is new)."""
    if "model" not in options:
        name, kwargs = checkpoint_model(checkpoint_path, None)
        options["model"] = name
        for key in ("img_size", "in_chans"):
            if key in kwargs:
                options.setdefault(key, kwargs[key])
        arch = {k: v for k, v in kwargs.items() if k not in ("num_classes", "img_size", "in_chans")}
        options["model_kwargs"] = {**arch, **options.get("model_kwargs", {})}
    return TrainConfig.from_dict({**options, "checkpoint_path": checkpoint_path})


def finetune(cfg: TrainConfig) -> Dict[str, Any]:
    """Supervised training from the trunk of `cfg.checkpoint_path` (a fresh classifier) of every weight, or of
    what the adaptation options leave trainable (LoRA adapters, --trainable / --freeze), with bidirectional
    attention (iLLaMA's soft-mask rate held at 1 unless a schedule is given)."""
    if not cfg.checkpoint_path:
        raise ValueError("finetune needs --checkpoint-path (a pre-trained llamavit run or an official file)")
    trainer = Trainer(cfg, backbone_only=True)
    if cfg.soft_mask == "none" and hasattr(trainer.model, "set_soft_mask_rate"):
        trainer.model.set_soft_mask_rate(1.0)
    return trainer.fit()
