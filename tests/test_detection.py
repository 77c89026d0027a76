"""Detection: torchvision's detectors on dense backbones (build, losses, detect, no resizing, fractional strides,
training, padding), COCO mAP against hand-computed cases, and drawing."""
import math

import pytest
import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from llamavit.dense import BackboneConfig, create_backbone
from llamavit.dense.detection import (DETECTORS, build_detector, detect, detection_losses, draw_detections)
from llamavit.eval.detection import DetectionEvaluator, detection_metrics

SIZE = 64
BACKBONES = {
    "pyramid": BackboneConfig(name="visionllama_pyramid_small_224", img_size=SIZE,
                              kwargs=dict(embed_dims=(16, 32, 32, 32), depths=(2, 2, 2, 2), num_heads=(1, 1, 1, 1),
                                          wss=(4, 4, 4, 4), sr_ratios=(2, 1, 1, 1))),
    "simple": BackboneConfig(name="visionllama_small_patch16_224", pyramid="simple", img_size=SIZE, out_channels=32,
                             kwargs=dict(depth=2, embed_dim=64, num_heads=2)),
    "resnet18": BackboneConfig(name="resnet18", img_size=SIZE),
}
LOSS_NAMES = {
    "fcos": {"classification", "bbox_regression", "bbox_ctrness"},
    "retinanet": {"classification", "bbox_regression"},
    "faster_rcnn": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"},
    "mask_rcnn": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg", "loss_mask"},
}


def tiny_detector(arch: str = "fcos", backbone: str = "pyramid", num_classes: int = 4, **options):
    """A detector with a 32-wide FPN; the R-CNNs sample 32 RoIs per image and keep 10 detections (CPU time)."""
    if arch in ("faster_rcnn", "mask_rcnn"):
        options = {"box_batch_size_per_image": 32, "box_detections_per_img": 10, **options}
    return build_detector(create_backbone(BACKBONES[backbone]), num_classes, arch, fpn_channels=32, **options)


def batch(size: int = SIZE):
    """Two images; image 0 has two objects, image 1 one object and a padding row (zeros, label -1)."""
    images = torch.randn(2, 3, size, size)
    boxes = torch.tensor([[[4.0, 4, 30, 30], [20, 30, 60, 50]], [[10, 10, 40, 40], [0, 0, 0, 0]]]).clamp(max=size)
    labels = torch.tensor([[1, 2], [3, -1]])
    masks = torch.zeros(2, 2, size, size, dtype=torch.uint8)
    for i, j in ((0, 0), (0, 1), (1, 0)):
        x0, y0, x1, y1 = boxes[i, j].int().tolist()
        masks[i, j, y0 + 2:y1 - 2, x0 + 2:x1 - 2] = 1
    return images, boxes, labels, masks


# --- detectors ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("arch", DETECTORS)
def test_every_arch_trains_and_detects(arch, backbone):
    detector = tiny_detector(arch, backbone)
    images, boxes, labels, masks = batch()
    detector.train()
    losses = detection_losses(detector, images, boxes, labels, masks)
    assert set(losses) == LOSS_NAMES[arch] | {"loss"}
    assert all(torch.isfinite(v) for v in losses.values())
    assert torch.allclose(losses["loss"], sum(v for k, v in losses.items() if k != "loss"))
    losses["loss"].backward()

    outputs = detect(detector, images)
    assert detector.training   # mode restored
    keys = {"boxes", "scores", "labels"} | ({"masks"} if arch == "mask_rcnn" else set())
    assert len(outputs) == 2
    for out in outputs:
        n = len(out["scores"])
        assert set(out) == keys and out["boxes"].shape == (n, 4) and out["labels"].shape == (n,)
        assert ((out["boxes"] >= 0) & (out["boxes"] <= SIZE)).all()   # no rescaling on the way back either
        assert ((out["labels"] >= 1) & (out["labels"] <= 3)).all()
        if arch == "mask_rcnn":
            assert out["masks"].shape == (n, 1, SIZE, SIZE)
            assert out["masks"].min() >= 0 and out["masks"].max() <= 1
    detector.eval()
    image_list, _ = detector.transform(list(images))
    assert image_list.tensors.shape[-2:] == (SIZE, SIZE) and image_list.image_sizes == [(SIZE, SIZE)] * 2
    assert torch.equal(image_list.tensors, images)   # neither resized nor renormalised


def test_transform_never_resizes():
    square = torch.rand(3, SIZE, SIZE)
    torchvision_own = GeneralizedRCNNTransform(SIZE, SIZE, [0.0] * 3, [1.0] * 3, size_divisible=32).eval()
    assert torch.equal(torchvision_own([square])[0].tensors[0], square)   # identity at img_size, square
    wide = torch.rand(3, SIZE, 96)
    assert torchvision_own([wide])[0].image_sizes != [(SIZE, 96)]   # ... but it would shrink a wide image
    detector = tiny_detector().eval()
    image_list, _ = detector.transform([wide])
    assert image_list.image_sizes == [(SIZE, 96)] and torch.equal(image_list.tensors[0], wide)
    image_list, _ = detector.transform([torch.rand(3, 48, 48)])   # padded to size_divisor, not upscaled
    assert image_list.image_sizes == [(48, 48)] and image_list.tensors.shape[-2:] == (SIZE, SIZE)


def test_fractional_strides_of_patch14():
    cfg = BackboneConfig(name="aim_600m_patch14_224", pyramid="simple", img_size=56, out_channels=32,
                         kwargs=dict(depth=2, embed_dim=64, num_heads=2, probe_layers=1))
    backbone = create_backbone(cfg)
    assert backbone.strides == [3.5, 7.0, 14.0, 28.0] and backbone.size_divisor == 28
    fcos = build_detector(backbone, 4, "fcos", fpn_channels=32)
    images, boxes, labels, _ = batch(56)
    features = list(fcos.backbone(images).values())
    image_list, _ = fcos.transform(list(images))
    anchors = fcos.anchor_generator(image_list, features)[0]
    first = anchors[:16]                                      # the first row of the stride-3.5 level
    assert torch.allclose((first[:, 0] + first[:, 2]) / 2, torch.arange(16) * 3.5)
    assert torch.allclose(first[:, 2] - first[:, 0], torch.full((16,), 3.5))   # FCOS: anchor side = stride
    assert len(anchors) == sum(f.shape[-2] * f.shape[-1] for f in features)
    rcnn = build_detector(create_backbone(cfg), 4, "faster_rcnn", fpn_channels=32, box_batch_size_per_image=32)
    pool = rcnn.roi_heads.box_roi_pool
    assert pool.scales == [1 / 3.5, 1 / 7, 1 / 14, 1 / 28]
    # a stride-3.5 map holding its column index: a 14-px box centred at x = 42 px pools 42 / 3.5 = 12
    # (torchvision's inferred scale 1/4 would read 10.5)
    ramp = {str(i): torch.arange(n).float().expand(1, 1, n, n).contiguous() for i, n in enumerate((16, 8, 4, 2))}
    pooled = pool(ramp, [torch.tensor([[35.0, 0, 49, 14]])], [(56, 56)])
    assert pooled.mean().item() == pytest.approx(12, abs=0.1)
    rcnn.train()
    losses = detection_losses(rcnn, images, boxes, labels)
    assert torch.isfinite(losses["loss"])
    assert all(((out["boxes"] >= 0) & (out["boxes"] <= 56)).all() for out in detect(rcnn, images))


def test_defaults_and_overrides():
    fcos = tiny_detector("fcos")
    assert (fcos.score_thresh, fcos.detections_per_img, fcos.transform.size_divisible) == (0.05, 100, 32)
    assert fcos.transform.min_size == (SIZE,) and fcos.transform.max_size == SIZE
    assert fcos.transform.image_mean == [0.0] * 3 and fcos.transform.image_std == [1.0] * 3
    assert fcos.backbone.names == ["0", "1", "2", "3", "p6", "p7"] and fcos.backbone.out_channels == 32
    assert fcos.anchor_generator.sizes == tuple((s,) for s in (4.0, 8.0, 16.0, 32.0, 64.0, 128.0))
    retina = tiny_detector("retinanet", score_thresh=0.3)
    assert retina.score_thresh == 0.3 and retina.anchor_generator.num_anchors_per_location()[0] == 9
    assert retina.anchor_generator.sizes[0] == pytest.approx((16.0, 16 * 2 ** (1 / 3), 16 * 2 ** (2 / 3)))
    rcnn = build_detector(create_backbone(BACKBONES["pyramid"]), 4, "mask_rcnn")
    assert rcnn.rpn.anchor_generator.sizes == tuple((8 * s,) for s in (4.0, 8.0, 16.0, 32.0, 64.0))
    assert rcnn.roi_heads.fg_bg_sampler.batch_size_per_image == 128
    assert (rcnn.roi_heads.score_thresh, rcnn.roi_heads.detections_per_img) == (0.05, 100)
    assert rcnn.roi_heads.mask_roi_pool.featmap_names == ["0", "1", "2", "3"] and rcnn.backbone.out_channels == 256
    small = build_detector(create_backbone(BACKBONES["pyramid"]), 4, "faster_rcnn", anchor_scale=4)
    assert small.rpn.anchor_generator.sizes[0] == (16.0,)


def test_fcos_training_lowers_the_loss():
    detector = tiny_detector("fcos").train()
    images, boxes, labels, _ = batch()
    optimizer = torch.optim.AdamW(detector.parameters(), lr=1e-3)
    history = []
    for _ in range(6):
        loss = detection_losses(detector, images, boxes, labels)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < 0.9 * history[0], history


def test_padding_rows_are_dropped():
    detector = tiny_detector("fcos").train()
    images, boxes, labels, _ = batch()
    labels[1] = -1          # image 1: padding only (its zero boxes would be rejected as degenerate if kept)
    boxes[1] = 0
    padded = detection_losses(detector, images, boxes, labels)
    explicit = detector(list(images), [{"boxes": boxes[0], "labels": labels[0]},
                                       {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}])
    assert all(torch.allclose(padded[k], explicit[k]) for k in explicit)
    rcnn = tiny_detector("mask_rcnn").train()   # an image without objects trains the R-CNNs too
    _, _, _, masks = batch()
    assert torch.isfinite(detection_losses(rcnn, images, boxes, labels, masks)["loss"])


@pytest.mark.parametrize("call, message", [
    (lambda: tiny_detector("yolo"), r"^arch must be one of fcos, retinanet, faster_rcnn, mask_rcnn, got 'yolo'$"),
    (lambda: tiny_detector("fcos", num_classes=1), r"^num_classes counts the background .* >= 2, got 1$"),
    (lambda: tiny_detector("retinanet", score_treshold=0.1), r"^unknown option\(s\) score_treshold for retinanet"),
    (lambda: tiny_detector("fcos", min_size=128), r"^unknown option\(s\) min_size for fcos: images come normalised"),
    (lambda: tiny_detector("fcos", anchor_scale=4), r"^anchor_scale does not apply to fcos"),
])
def test_bad_options(call, message):
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert "\n" not in str(info.value)


def test_bad_batches():
    images, boxes, labels, masks = batch()
    detector = tiny_detector("fcos")
    with pytest.raises(ValueError, match=r"^detection_losses needs the detector in train mode"):
        detection_losses(detector.eval(), images, boxes, labels)
    detector.train()
    with pytest.raises(ValueError, match=r"^labels must be 1\.\.3 \(0 is the background, -1 padding\), got 0\.\.3$"):
        detection_losses(detector, images, boxes, torch.tensor([[0, 2], [3, -1]]))
    with pytest.raises(ValueError, match=r"^boxes must be \(B, M, 4\)"):
        detection_losses(detector, images, boxes[..., :2], labels)
    with pytest.raises(ValueError, match=r"^mask_rcnn needs instance masks"):
        detection_losses(tiny_detector("mask_rcnn").train(), images, boxes, labels)


# --- mAP ---------------------------------------------------------------------------------------------------------

def pred(boxes, labels, scores=None, masks=None):
    out = {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)}
    out["scores"] = torch.tensor(scores if scores is not None else [0.9] * len(labels))
    if masks is not None:
        out["masks"] = masks
    return out


def target(boxes, labels, masks=None):
    out = {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)}
    if masks is not None:
        out["masks"] = masks
    return out


def test_map_perfect_predictions():
    result = detection_metrics([pred([[0, 0, 10, 10], [20, 20, 50, 40]], [1, 2])],
                               [target([[0, 0, 10, 10], [20, 20, 50, 40]], [1, 2])], class_names=["cat", "dog"])
    assert result["map"] == result["map_50"] == result["map_75"] == 1.0
    assert result["map_per_class"] == {"cat": 1.0, "dog": 1.0}
    assert all(isinstance(v, float) for k, v in result.items() if not k.endswith("_per_class"))


def test_map_at_iou_06():
    # IoU([0, 0, 10, 6], [0, 0, 10, 10]) = 60 / 100
    result = detection_metrics([pred([[0, 0, 10, 6]], [1])], [target([[0, 0, 10, 10]], [1])])
    assert result["map_50"] == 1.0 and result["map_75"] == 0.0
    assert 0 < result["map"] < 0.5   # matched at 0.50, 0.55 (and 0.60): 2 or 3 of the 10 thresholds


def test_map_wrong_class_is_zero():
    result = detection_metrics([pred([[0, 0, 10, 10]], [2])], [target([[0, 0, 10, 10]], [1])], class_names=["a", "b"])
    assert result["map"] == 0.0 and result["map_50"] == 0.0
    assert result["map_per_class"]["a"] == 0.0 and math.isnan(result["map_per_class"]["b"])   # b: no ground truth


def test_map_one_class_perfect_one_missed():
    result = detection_metrics([pred([[0, 0, 10, 10]], [1])], [target([[0, 0, 10, 10], [30, 30, 50, 50]], [1, 2])],
                               class_names=["cat", "dog"])
    assert result["map"] == pytest.approx(0.5) and result["map_50"] == pytest.approx(0.5)
    assert result["map_per_class"] == {"cat": 1.0, "dog": 0.0}


def test_mask_map_perfect_masks():
    masks = torch.zeros(1, 32, 32, dtype=torch.uint8)
    masks[0, 4:20, 6:18] = 1
    probabilities = masks[:, None].float() * 0.8   # detect's (N, 1, H, W) form, > 0.5 inside
    result = detection_metrics([pred([[6, 4, 18, 20]], [1], masks=probabilities)],
                               [target([[6, 4, 18, 20]], [1], masks=masks)], iou_type=("bbox", "segm"))
    assert result["mask_map"] == result["mask_map_50"] == result["map"] == 1.0
    assert result["mask_map_per_class"] == {"1": 1.0}
    with pytest.raises(ValueError, match=r"^every prediction needs masks for iou_type 'segm'$"):
        detection_metrics([pred([[6, 4, 18, 20]], [1])], [target([[6, 4, 18, 20]], [1], masks=masks)], "segm")


def test_evaluator_accumulates_batches():
    preds = [pred([[0, 0, 10, 10]], [1]), pred([[0, 0, 10, 6]], [2], [0.8]), pred([], [], [])]
    preds[2]["boxes"] = preds[2]["boxes"].reshape(0, 4)
    targets = [target([[0, 0, 10, 10]], [1]), target([[0, 0, 10, 10]], [2]), target([[5, 5, 9, 9]], [1])]
    evaluator = DetectionEvaluator(("bbox",), ["a", "b"])
    evaluator.update(preds[:2], targets[:2])
    evaluator.update(preds[2:], targets[2:])
    assert repr(evaluator.compute()) == repr(detection_metrics(preds, targets, class_names=["a", "b"]))   # NaN-safe
    assert evaluator.compute()["map_per_class"]["a"] == pytest.approx(51 / 101)   # recall 1/2: 51 of 101 points
    with pytest.raises(ValueError, match=r"^2 predictions for 1 targets"):
        evaluator.update(preds[:2], targets[:1])
    with pytest.raises(ValueError, match=r"^iou_type must be 'bbox', 'segm' or both, got 'keypoints'$"):
        DetectionEvaluator("keypoints")


# --- drawing -----------------------------------------------------------------------------------------------------

def test_draw_detections():
    image = torch.zeros(3, SIZE, SIZE, dtype=torch.uint8)
    detection = pred([[10, 10, 40, 40], [45, 45, 60, 60]], [1, 2], [0.9, 0.1])
    drawn = draw_detections(image, detection, ["cat", "dog"])
    assert drawn.dtype == torch.uint8 and drawn.shape == image.shape
    assert (drawn[:, 10:41, 10:41] != 0).any()       # the confident box is drawn
    assert (drawn[:, 46:60, 46:60] == 0).all()       # the one below score_thresh is not
    masks = torch.zeros(2, 1, SIZE, SIZE)
    masks[0, 0, 15:35, 15:35] = 0.9
    drawn = draw_detections(image, {**detection, "masks": masks}, ["cat", "dog"])
    assert (drawn[:, 20:30, 20:30] != 0).all(dim=0).any()   # the mask's inside is painted, not just the outline
    with pytest.raises(ValueError, match=r"^image must be uint8 \(3, H, W\)"):
        draw_detections(image.float(), detection, ["cat", "dog"])
