"""llamavit: LLaMA-style vision transformers in plain PyTorch.

    import llamavit
    model = llamavit.create_model("illama_tiny_patch16_224", checkpoint_path="illama_tiny.pth")
    llamavit.list_models("illama*")
"""
from .models import CheckpointError, create_model, list_models, load_checkpoint

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "load_checkpoint", "CheckpointError", "__version__"]
