"""Self-supervised objectives with parameters of their own (decoders, mask tokens) around a llamavit trunk:
AIM's next-patch regression and MAE's masked reconstruction; and the dense tasks' losses around their heads.
The step loop trains them (train/pretrain.py, train/segment.py)."""
from .aim import (AutoregressiveObjective, DecoderConfig, PixelDecoder, decoder_block, next_patch_loss,
                  sample_prefix_lengths)
from .mae import MAEDecoderConfig, MAEObjective, random_masking
from .segmentation import IGNORE_INDEX, SegmentationObjective
from .targets import normalized_targets, patchify, unpatchify

__all__ = ["AutoregressiveObjective", "DecoderConfig", "PixelDecoder", "decoder_block", "next_patch_loss",
           "sample_prefix_lengths", "MAEDecoderConfig", "MAEObjective", "random_masking", "IGNORE_INDEX",
           "SegmentationObjective", "normalized_targets", "patchify", "unpatchify"]
