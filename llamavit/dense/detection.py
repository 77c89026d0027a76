"""Object detection and instance segmentation on a DenseBackbone with torchvision's detectors.

    fcos         FCOS (Tian et al. 2019): one point per location, levels P2-P7 (FPN + LastLevelP6P7)
    retinanet    RetinaNet (Lin et al. 2017): 9 anchors per location (3 scales x 3 ratios), P2-P7
    faster_rcnn  Faster R-CNN with FPN: RPN on P2-P6 (FPN + LastLevelMaxPool), RoIAlign 7x7 on P2-P5
    mask_rcnn    Mask R-CNN: Faster R-CNN + a 14x14 RoIAlign mask head

The backbone's four maps go through torchvision's FeaturePyramidNetwork. Images come from our data pipeline
already normalised and at the training size, so the detector's transform only batches them and pads to the
backbone's `size_divisor`: it neither resizes nor renormalises. Anchors sit at the pyramid's own strides
(torchvision would infer integer strides and power-of-2 RoI scales, wrong for the 3.5-px levels of patch-14
trunks). Labels are 1..C, 0 is the background; `num_classes` counts it (C + 1).
"""
import math
from collections import OrderedDict
from inspect import signature
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7
from torchvision.ops.poolers import LevelMapper
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from .pyramid import DenseBackbone

DETECTORS = ("fcos", "retinanet", "faster_rcnn", "mask_rcnn")
_CLASSES = {"fcos": FCOS, "retinanet": RetinaNet, "faster_rcnn": FasterRCNN, "mask_rcnn": MaskRCNN}
_ANCHOR_SCALE = {"retinanet": 4.0, "faster_rcnn": 8.0, "mask_rcnn": 8.0}   # anchor side / stride, as torchvision
_FIXED = ("min_size", "max_size", "image_mean", "image_std")   # the data pipeline's job, see the module doc
_OURS = ("fpn_channels", "anchor_scale", "size_divisible")


class DetectionFPN(nn.Module):
    """A DenseBackbone + torchvision's FPN: images (B, C, H, W) -> OrderedDict '0'..'3' (strides of the
    backbone) + 'p6', 'p7' (extra 'p6p7') or 'pool' (extra 'pool'), each (B, out_channels, H / s, W / s)."""

    def __init__(self, backbone: DenseBackbone, fpn_channels: int = 256, extra: str = "p6p7"):
        super().__init__()
        if extra not in ("p6p7", "pool"):
            raise ValueError(f"extra must be 'p6p7' or 'pool', got {extra!r}")
        # P6 from P5 (in == out channels), as torchvision's FCOS and RetinaNet (v1) on ResNet
        blocks = LastLevelP6P7(fpn_channels, fpn_channels) if extra == "p6p7" else LastLevelMaxPool()
        self.body = backbone
        self.fpn = FeaturePyramidNetwork(list(backbone.out_channels), fpn_channels, extra_blocks=blocks)
        self.out_channels = fpn_channels
        last = backbone.strides[-1]
        extra_strides = [2 * last, 4 * last] if extra == "p6p7" else [2 * last]
        self.strides = [float(s) for s in backbone.strides] + extra_strides
        self.names = [str(i) for i in range(len(backbone.strides))] + (["p6", "p7"] if extra == "p6p7" else ["pool"])

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """(B, C, H, W) -> OrderedDict name -> (B, out_channels, H / stride, W / stride), finest first."""
        maps = self.body(images)
        return self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))


class PyramidAnchorGenerator(AnchorGenerator):
    """torchvision's AnchorGenerator at given (possibly fractional) strides, one per map. torchvision infers a
    level's stride as padded side // map side, an integer (3 instead of 3.5 for patch-14 levels), and rounds the
    cell anchors to whole pixels (a 3.5-px FCOS anchor would become 4): neither is done here."""

    def __init__(self, sizes: Sequence[Sequence[float]], aspect_ratios: Sequence[Sequence[float]],
                 strides: Sequence[float]):
        super().__init__(tuple(tuple(s) for s in sizes), tuple(tuple(a) for a in aspect_ratios))
        if len(strides) != len(sizes):
            raise ValueError(f"{len(strides)} strides for {len(sizes)} anchor levels: give one stride per level")
        self.strides = [float(s) for s in strides]

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32, device=None):
        """(A, 4) zero-centred xyxy cell anchors, A = len(scales) * len(aspect_ratios), not rounded."""
        scales = torch.as_tensor(scales, dtype=dtype, device=device)
        h_ratios = torch.sqrt(torch.as_tensor(aspect_ratios, dtype=dtype, device=device))
        ws = (1 / h_ratios[:, None] * scales[None, :]).view(-1)
        hs = (h_ratios[:, None] * scales[None, :]).view(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2

    def forward(self, image_list, feature_maps: List[torch.Tensor]) -> List[torch.Tensor]:
        """-> per image (sum_l A_l * H_l * W_l, 4) xyxy anchors centred at (x, y) * stride of each level."""
        if len(feature_maps) != len(self.strides):
            raise ValueError(f"{len(feature_maps)} feature maps for {len(self.strides)} anchor strides")
        device = feature_maps[0].device
        self.set_cell_anchors(feature_maps[0].dtype, device)
        strides = [[torch.tensor(s, device=device)] * 2 for s in self.strides]
        per_level = self.grid_anchors([list(m.shape[-2:]) for m in feature_maps], strides)
        return [torch.cat(per_level) for _ in image_list.image_sizes]


class PyramidRoIAlign(MultiScaleRoIAlign):
    """MultiScaleRoIAlign at the pyramid's strides (each twice the one before). torchvision infers each level's
    scale as the nearest power of 2 (1/4 for a 3.5-px level); here they are 1 / stride, and the FPN paper's
    level rule k = 4 + log2(sqrt(wh) / 224) is applied with 224 scaled as the strides are (196 for patch 14)."""

    def __init__(self, featmap_names: List[str], output_size: int, sampling_ratio: int, strides: Sequence[float]):
        super().__init__(featmap_names, output_size, sampling_ratio)
        if len(strides) != len(featmap_names) or any(b != 2 * a for a, b in zip(strides, strides[1:])):
            raise ValueError(f"RoI levels need one stride per map, each twice the one before, got {list(strides)}")
        k_min = round(math.log2(strides[0]))
        self.scales = [1.0 / s for s in strides]
        self.map_levels = LevelMapper(k_min, k_min + len(strides) - 1, 224 * strides[0] / 2 ** k_min, 4)


class PassThroughTransform(GeneralizedRCNNTransform):
    """GeneralizedRCNNTransform that never resizes (with mean 0, std 1 normalising is the identity too): it
    batches the images and pads them to `size_divisible`. torchvision's own resize would rescale a non-square
    image so that its long side is max_size."""

    def resize(self, image, target=None):
        return image, target


def _defaults(arch: str, body: DetectionFPN, anchor_scale: Optional[float]) -> dict:
    """torchvision's options for `arch` on `body`, with anchors at its strides and small-image defaults."""
    strides, n = body.strides, len(body.strides)
    if arch == "fcos":   # FCOS's loss takes the anchor side as the level's stride: it must equal it
        anchors = PyramidAnchorGenerator([(s,) for s in strides], [(1.0,)] * n, strides)
        return dict(anchor_generator=anchors, score_thresh=0.05, nms_thresh=0.6, detections_per_img=100,
                    topk_candidates=1000)
    scale = anchor_scale if anchor_scale is not None else _ANCHOR_SCALE[arch]
    if arch == "retinanet":   # 3 scales per octave, as the paper and torchvision
        sizes = [tuple(scale * s * 2 ** (k / 3) for k in range(3)) for s in strides]
        anchors = PyramidAnchorGenerator(sizes, [(0.5, 1.0, 2.0)] * n, strides)
        return dict(anchor_generator=anchors, score_thresh=0.05, nms_thresh=0.5, detections_per_img=100,
                    topk_candidates=1000)
    names, pooled = body.names[:-1], body.strides[:-1]   # RoIs from P2-P5, not from the max-pooled level
    options = dict(rpn_anchor_generator=PyramidAnchorGenerator([(scale * s,) for s in strides],
                                                               [(0.5, 1.0, 2.0)] * n, strides),
                   box_roi_pool=PyramidRoIAlign(names, 7, 2, pooled),
                   box_score_thresh=0.05, box_detections_per_img=100,
                   # 128 sampled RoIs per image as Fast / py-faster-rcnn; torchvision's 512 is for 800-px COCO images
                   box_batch_size_per_image=128)
    if arch == "mask_rcnn":
        options["mask_roi_pool"] = PyramidRoIAlign(names, 14, 2, pooled)
    return options


def build_detector(backbone: DenseBackbone, num_classes: int, arch: str = "fcos", img_size: Optional[int] = None,
                   **options) -> nn.Module:
    """A torchvision FCOS / RetinaNet / FasterRCNN / MaskRCNN on `backbone` + FPN.

    num_classes: C + 1 (labels 1..C, 0 = background). img_size: the size images come at (default the
    backbone's), recorded as the transform's min_size = max_size; the transform never resizes. options: the
    torchvision class's own keyword arguments (override our defaults: score threshold 0.05, 100 detections per
    image, anchors at the strides), `size_divisible` (default backbone.size_divisor), `fpn_channels` (256) and
    `anchor_scale` (anchor side / stride: RetinaNet 4, R-CNNs 8; FCOS's anchors are the strides).
    Called as torchvision's detectors are; see `detection_losses` and `detect` for batch tensors."""
    if arch not in DETECTORS:
        raise ValueError(f"arch must be one of {', '.join(DETECTORS)}, got {arch!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background (C + 1): it must be >= 2, got {num_classes}")
    cls = _CLASSES[arch]
    allowed = set(signature(cls).parameters) - {"backbone", "num_classes", "kwargs", *_FIXED} | set(_OURS)
    unknown = sorted(set(options) - allowed)
    if unknown:
        fixed = [k for k in unknown if k in _FIXED]
        why = "images come normalised at their size" if fixed else f"see torchvision's {cls.__name__}"
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for {arch}: {why}")
    fpn_channels = options.pop("fpn_channels", 256)
    anchor_scale = options.pop("anchor_scale", None)
    if arch == "fcos" and anchor_scale is not None:
        raise ValueError("anchor_scale does not apply to fcos: its anchors must equal the strides")
    if arch == "fcos" and fpn_channels % 32:
        raise ValueError(f"fcos's head has GroupNorm(32): fpn_channels must be a multiple of 32, got {fpn_channels}")
    img_size = img_size or backbone.cfg.img_size
    transform = dict(min_size=img_size, max_size=img_size, image_mean=[0.0] * backbone.cfg.in_chans,
                     image_std=[1.0] * backbone.cfg.in_chans,
                     size_divisible=options.pop("size_divisible", backbone.size_divisor))
    body = DetectionFPN(backbone, fpn_channels, "p6p7" if arch in ("fcos", "retinanet") else "pool")
    detector = cls(body, num_classes, **{**_defaults(arch, body, anchor_scale), **options, **transform})
    detector.transform = PassThroughTransform(**transform)
    detector.num_classes, detector.arch = num_classes, arch
    return detector


def batch_targets(boxes: torch.Tensor, labels: torch.Tensor, masks: Optional[torch.Tensor] = None) -> List[dict]:
    """Padded boxes (B, M, 4) xyxy, labels (B, M) (-1 = padding), masks (B, M, H, W) or None -> B torchvision
    targets {'boxes' (N, 4) float, 'labels' (N,) int64[, 'masks' (N, H, W) uint8]} without the padding rows."""
    if boxes.dim() != 3 or boxes.shape[-1] != 4 or labels.shape != boxes.shape[:2]:
        raise ValueError(f"boxes must be (B, M, 4) and labels (B, M), got {tuple(boxes.shape)} and "
                         f"{tuple(labels.shape)}")
    if masks is not None and (masks.dim() != 4 or masks.shape[:2] != labels.shape):
        raise ValueError(f"masks must be (B, M, H, W) with labels (B, M), got {tuple(masks.shape)}")
    targets = []
    for i in range(len(labels)):
        keep = labels[i] >= 0
        target = {"boxes": boxes[i][keep].float(), "labels": labels[i][keep].long()}
        if masks is not None:
            target["masks"] = masks[i][keep].to(torch.uint8)
        targets.append(target)
    return targets


def detection_losses(detector: nn.Module, images: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
                     masks: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """images (B, C, H, W), boxes (B, M, 4) xyxy pixels, labels (B, M) int64 1..C padded with -1, masks
    (B, M, H, W) uint8 (Mask R-CNN) or None -> torchvision's loss terms (scalars) and 'loss', their sum.
    Every argument splits on dim 0, so the step loop can cut a batch into micro-batches."""
    if not detector.training:
        raise ValueError("detection_losses needs the detector in train mode: torchvision computes losses only there")
    if images.dim() != 4 or len(images) != len(labels):
        raise ValueError(f"images must be (B, C, H, W) with labels (B, M), got {tuple(images.shape)} and "
                         f"{tuple(labels.shape)}")
    if masks is None and getattr(detector, "arch", None) == "mask_rcnn":
        raise ValueError("mask_rcnn needs instance masks (B, M, H, W) to train, got masks=None")
    real = labels[labels >= 0]
    num_classes = getattr(detector, "num_classes", None)
    if len(real) and (real.min() < 1 or (num_classes is not None and real.max() >= num_classes)):
        raise ValueError(f"labels must be 1..{num_classes - 1 if num_classes else 'C'} (0 is the background, "
                         f"-1 padding), got {int(real.min())}..{int(real.max())}")
    losses = dict(detector(list(images), batch_targets(boxes, labels, masks)))
    losses["loss"] = sum(losses.values())
    return losses


@torch.no_grad()
def detect(detector: nn.Module, images: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
    """images (B, C, H, W) -> per image {'boxes' (N, 4) xyxy pixels, 'scores' (N,), 'labels' (N,) 1..C[, 'masks'
    (N, 1, H, W) float in [0, 1]]}, in eval mode (the detector's mode is restored)."""
    was_training = detector.training
    detector.eval()
    try:
        outputs = detector(list(images))
    finally:
        detector.train(was_training)
    # the single-stage heads keep a logit for class 0 (never a target): its detections are not objects
    return [{k: v[out["labels"] > 0] for k, v in out.items()} for out in outputs]


def _class_color(label: int) -> tuple:
    return tuple(int(c) for c in (label * torch.tensor([2 ** 25 - 1, 2 ** 15 - 1, 2 ** 21 - 1])) % 255)


def draw_detections(image: torch.Tensor, detection: Dict[str, torch.Tensor], class_names: Optional[Sequence[str]],
                    score_thresh: float = 0.5) -> torch.Tensor:
    """image uint8 (3, H, W), one `detect` output -> uint8 (3, H, W) with the detections scoring >= score_thresh
    drawn: masks (where given, > 0.5) then boxes labelled '<class name> <score>'; class_names[l - 1] names l."""
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be uint8 (3, H, W), got {image.dtype} {tuple(image.shape)}")
    keep = detection["scores"] >= score_thresh
    boxes, scores = detection["boxes"][keep].cpu(), detection["scores"][keep]
    labels = detection["labels"][keep].tolist()
    if class_names is not None and any(not 1 <= lab <= len(class_names) for lab in labels):
        raise ValueError(f"labels {sorted(set(labels))} outside 1..{len(class_names)} (the {len(class_names)} "
                         f"class names)")
    names = [class_names[lab - 1] if class_names is not None else str(lab) for lab in labels]
    colors = [_class_color(lab) for lab in labels]
    image = image.cpu()
    if not labels:
        return image.clone()
    if "masks" in detection:
        masks = detection["masks"][keep].cpu()
        masks = (masks[:, 0] if masks.dim() == 4 else masks) > 0.5
        image = draw_segmentation_masks(image, masks, alpha=0.5, colors=colors)
    text = [f"{name} {score:.2f}" for name, score in zip(names, scores.tolist())]
    return draw_bounding_boxes(image, boxes, labels=text, colors=colors, width=2)
