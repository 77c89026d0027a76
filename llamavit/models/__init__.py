"""Model families and the name registry."""
from ..errors import CheckpointError
from .convert import (check_state_dict, convert_state_dict, keys_report, load_backbone, load_checkpoint,
                      load_partial, read_state_dict)
from .illama import ILLaMA, ILLaMAConfig
from .point_encoder import PointEncoder, PointEncoderConfig, PointTokenizer
from .registry import create_model, list_models, model_family
from .video_encoder import VideoEncoder, VideoEncoderConfig
from .vit_llm import ViTLLM, ViTLLMConfig

__all__ = ["CheckpointError", "check_state_dict", "convert_state_dict", "keys_report", "load_backbone",
           "load_checkpoint", "load_partial", "read_state_dict", "ILLaMA", "ILLaMAConfig", "create_model",
           "list_models", "model_family", "PointEncoder", "PointEncoderConfig", "PointTokenizer", "VideoEncoder",
           "VideoEncoderConfig", "ViTLLM", "ViTLLMConfig"]
