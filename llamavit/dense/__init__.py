"""Dense prediction: backbone adapters (feature pyramids), segmentation heads, the segmenter, and torchvision's
detectors on the same backbones."""
from .detection import DETECTORS, batch_targets, build_detector, detect, detection_losses, draw_detections
from .heads import HEADS, FCNHead, FPNHead, LinearHead, UperNetHead, create_head
from .pyramid import (PYRAMIDS, BackboneConfig, DenseBackbone, MultiLevelNeck, SimpleFeaturePyramid, create_backbone,
                      default_block_indices, trunk_group_matcher)
from .segmenter import Segmenter, SegmenterConfig, create_segmenter, predict_logits, slide_logits

__all__ = ["DETECTORS", "batch_targets", "build_detector", "detect", "detection_losses", "draw_detections", "HEADS",
           "FCNHead", "FPNHead", "LinearHead", "UperNetHead", "create_head", "PYRAMIDS", "BackboneConfig",
           "DenseBackbone", "MultiLevelNeck", "SimpleFeaturePyramid", "create_backbone", "default_block_indices",
           "trunk_group_matcher",
           "Segmenter", "SegmenterConfig", "create_segmenter", "predict_logits", "slide_logits"]
