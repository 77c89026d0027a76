"""Self-supervised objectives with parameters of their own (decoders, mask tokens) around a llamavit trunk:
AIM's next-patch prediction (orders, targets, its masked baseline) and MAE's masked reconstruction; and the dense
tasks' losses around their heads. The step loop trains them (train/pretrain.py, train/segment.py)."""
from .aim import (TARGETS, AutoregressiveObjective, DecoderConfig, MaskedObjective, PatchPredictionObjective,
                  PixelDecoder, decoder_block, masked_patch_loss, next_patch_loss, patch_targets, random_patch_mask,
                  sample_prefix_lengths, trunk_patch_size)
from .codebook import PatchCodebook, fit_codebook, load_codebook, save_codebook
from .mae import MAEDecoderConfig, MAEObjective, random_masking
from .orders import ORDERS, patch_order, visit_rank
from .segmentation import IGNORE_INDEX, SegmentationObjective
from .targets import normalized_targets, patchify, unnormalize_like, unpatchify

__all__ = ["TARGETS", "AutoregressiveObjective", "DecoderConfig", "MaskedObjective", "PatchPredictionObjective",
           "PixelDecoder", "decoder_block", "masked_patch_loss", "next_patch_loss", "patch_targets",
           "random_patch_mask", "sample_prefix_lengths", "trunk_patch_size", "PatchCodebook", "fit_codebook",
           "load_codebook", "save_codebook", "ORDERS", "patch_order", "visit_rank", "MAEDecoderConfig",
           "MAEObjective", "random_masking", "IGNORE_INDEX", "SegmentationObjective", "normalized_targets",
           "patchify", "unnormalize_like", "unpatchify"]
