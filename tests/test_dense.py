"""Dense prediction: backbone adapters (strides and shapes for every family, values of the necks), heads, the
segmenter (padding, sliding-window inference), mIoU against a hand example, the objective, training and the
`llamavit segment` command end to end on tiny Fashion-MNIST scenes."""
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import llamavit
from llamavit.cli import main
from llamavit.data.scenes import SceneConfig, build_scenes
from llamavit.dense import (BackboneConfig, MultiLevelNeck, SegmenterConfig, SimpleFeaturePyramid, create_backbone,
                            create_head, create_segmenter, default_block_indices, predict_logits, slide_logits)
from llamavit.dense.pyramid import level_scales, load_trunk_weights, native_levels
from llamavit.errors import CheckpointError
from llamavit.eval.segmentation import SegmentationEvaluator, metrics_from_confusion
from llamavit.objectives import IGNORE_INDEX, SegmentationObjective
from llamavit.train.detect import DetectConfig
from llamavit.train.segment import SegmentConfig, load_segmenter, segment

TINY_PYRAMID = dict(embed_dims=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4], mlp_multiple_of=8,
                    wss=[4, 4, 4, 4])
TINY_PLAIN = dict(depth=4, embed_dim=64, num_heads=2)

# (name, kwargs, pyramid, input side, strides, widths)
FAMILIES = [
    ("visionllama_pyramid_small_224", TINY_PYRAMID, "auto", 64, [4, 8, 16, 32], [16, 32, 48, 64]),
    ("visionllama_small_patch16_224", TINY_PLAIN, "simple", 64, [4, 8, 16, 32], [32] * 4),
    ("visionllama_small_patch16_224", TINY_PLAIN, "multilevel", 64, [4, 8, 16, 32], [64] * 4),
    ("illama_tiny_patch16_224", TINY_PLAIN, "auto", 64, [4, 8, 16, 32], [32] * 4),
    ("illama_tiny_patch16_224", TINY_PLAIN, "multilevel", 64, [4, 8, 16, 32], [64] * 4),
    ("aim_600m_patch14_224", dict(TINY_PLAIN, probe_layers=2), "simple", 56, [3.5, 7, 14, 28], [32] * 4),
    ("aim_600m_patch14_224", dict(TINY_PLAIN, probe_layers=2), "multilevel", 56, [3.5, 7, 14, 28], [64] * 4),
    ("vit_tiny_patch16_224", dict(depth=2), "simple", 64, [4, 8, 16, 32], [32] * 4),
    # finer patches still give strides 4..32 (identity / pooling instead of deconvolutions)
    ("illama_tiny_patch16_224", dict(TINY_PLAIN, patch_size=4), "simple", 64, [4, 8, 16, 32], [32] * 4),
    ("visionllama_small_patch16_224", dict(TINY_PLAIN, patch_size=8), "multilevel", 64, [4, 8, 16, 32], [64] * 4),
    ("resnet18", {}, "auto", 64, [4, 8, 16, 32], [64, 128, 256, 512]),
]


def tiny_backbone(name, kwargs, pyramid, size, out_channels=32):
    return create_backbone(BackboneConfig(name=name, pyramid=pyramid, img_size=size, kwargs=dict(kwargs),
                                          out_channels=out_channels))


@pytest.mark.parametrize("name,kwargs,pyramid,size,strides,widths", FAMILIES,
                         ids=[f"{f[0]}-{f[2]}" for f in FAMILIES])
def test_every_family_gives_four_levels_at_the_right_strides(name, kwargs, pyramid, size, strides, widths):
    backbone = tiny_backbone(name, kwargs, pyramid, size)
    assert backbone.strides == [float(s) for s in strides] and backbone.out_channels == widths
    maps = backbone(torch.randn(2, 3, size, size))
    assert [tuple(m.shape) for m in maps] == [(2, c, int(size // s), int(size // s)) for c, s in zip(widths, strides)]
    assert all(torch.isfinite(m).all() for m in maps)
    assert not hasattr(backbone.trunk, "head") or not isinstance(backbone.trunk.head, nn.Linear)   # classifier gone


def test_timm_names_work_with_and_without_the_timm_prefix():
    bare, prefixed = tiny_backbone("resnet18", {}, "auto", 64), tiny_backbone("timm:resnet18", {}, "auto", 64)
    assert bare.strides == prefixed.strides == [4.0, 8.0, 16.0, 32.0]
    assert type(bare.trunk) is type(prefixed.trunk)


def test_the_frozen_llm_vit_is_a_backbone_too():
    backbone = tiny_backbone("vit_smollm2_tiny_patch16_224", dict(depth=2), "simple", 64)
    maps = backbone(torch.randn(1, 3, 64, 64))
    assert [m.shape[-1] for m in maps] == [16, 8, 4, 2]
    assert not any(p.requires_grad for p in backbone.trunk.llama.parameters())   # the LLM block stays frozen


def test_plain_trunks_take_any_multiple_of_the_patch():
    backbone = tiny_backbone("visionllama_small_patch16_224", TINY_PLAIN, "simple", 64)
    maps = backbone(torch.randn(1, 3, 80, 112))   # a 5 x 7 patch grid
    assert [tuple(m.shape[-2:]) for m in maps] == [(20, 28), (10, 14), (5, 7), (2, 3)]


def test_iLLaMA_backbones_attend_bidirectionally_unless_told():
    assert tiny_backbone("illama_tiny_patch16_224", TINY_PLAIN, "simple", 64).trunk.soft_mask_rate == 1.0
    causal = tiny_backbone("illama_tiny_patch16_224", dict(TINY_PLAIN, soft_mask_rate=0.0), "simple", 64)
    assert causal.trunk.soft_mask_rate == 0.0


def test_multilevel_taps_a_third_half_two_thirds_and_the_last_block():
    assert default_block_indices(12) == (3, 5, 7, 11)
    assert default_block_indices(24) == (7, 11, 15, 23)
    backbone = tiny_backbone("visionllama_small_patch16_224", dict(TINY_PLAIN, depth=6), "multilevel", 64)
    assert backbone.indices == [1, 2, 3, 5]
    assert len(backbone.trunk.blocks) == 6


def test_the_simple_pyramid_keeps_only_the_blocks_it_needs():
    backbone = create_backbone(BackboneConfig(name="visionllama_small_patch16_224", pyramid="multilevel",
                                              img_size=64, kwargs=TINY_PLAIN, block_indices=(0, 1, 1, 2)))
    assert len(backbone.trunk.blocks) == 3   # block 3 is never tapped: pruned


def test_multilevel_neck_values():
    neck = MultiLevelNeck(4, scales=(2, 1))
    for conv in [*neck.lateral, *neck.output]:   # identity convolutions: the neck is then the rescaling alone
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
        k = conv.kernel_size[0] // 2
        for c in range(4):
            conv.weight.data[c, c, k, k] = 1.0
    x = [torch.randn(1, 4, 3, 3), torch.randn(1, 4, 3, 3)]
    up, same = neck(x)
    torch.testing.assert_close(up, F.interpolate(x[0], scale_factor=2, mode="bilinear", align_corners=False))
    torch.testing.assert_close(same, x[1])


@pytest.mark.parametrize("stride,scales", [(16, (4, 2, 1, 0.5)), (8, (2, 1, 0.5, 0.25)), (4, (1, 0.5, 0.25, 0.125)),
                                           (32, (8, 4, 2, 1)), (14, (4, 2, 1, 0.5))])
def test_level_scales_aim_at_strides_4_to_32(stride, scales):
    assert level_scales(stride) == scales


def test_simple_pyramid_of_a_patch_4_map_pools_instead_of_upsampling():
    spp = SimpleFeaturePyramid(8, out_channels=4, scales=level_scales(4))
    assert isinstance(spp.rescale[0], torch.nn.Identity)
    assert [m.kernel_size for m in spp.rescale[1:]] == [2, 4, 8]
    x = torch.randn(1, 8, 16, 16)
    levels = spp([x])
    torch.testing.assert_close(levels[0], spp.output[0](x))
    torch.testing.assert_close(levels[2], spp.output[2](F.max_pool2d(x, 4)))
    assert [lv.shape[-1] for lv in levels] == [16, 8, 4, 2]
    up = SimpleFeaturePyramid(16, out_channels=4, scales=level_scales(32))   # 8x: three deconvolutions 16->8->4->2
    assert [m.out_channels for m in up.rescale[0] if isinstance(m, torch.nn.ConvTranspose2d)] == [8, 4, 2]
    assert up([torch.randn(1, 16, 2, 2)])[0].shape == (1, 4, 16, 16)


def test_simple_pyramid_levels_come_from_the_last_map():
    spp = SimpleFeaturePyramid(8, out_channels=4)
    x = torch.randn(1, 8, 4, 4)
    levels = spp([torch.randn(1, 8, 4, 4), x])   # only the last map is used
    torch.testing.assert_close(levels[3], spp.output[3](F.max_pool2d(x, 2)))
    assert [lv.shape[-1] for lv in levels] == [16, 8, 4, 2]


@pytest.mark.parametrize("pyramid,name,kwargs,message", [
    ("native", "visionllama_small_patch16_224", TINY_PLAIN, "plain trunk .* use pyramid 'simple' or 'multilevel'"),
    ("simple", "visionllama_pyramid_small_224", TINY_PYRAMID, "hierarchical: .* use 'native'"),
    ("fancy", "resnet18", {}, "pyramid must be one of auto, native, simple, multilevel"),
])
def test_pyramid_choices_that_do_not_fit_are_refused(pyramid, name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_backbone(name, kwargs, pyramid, 64)


def test_bad_backbone_names_and_block_indices():
    with pytest.raises(ValueError, match="unknown backbone 'no_such_net'"):
        tiny_backbone("no_such_net", {}, "auto", 64)
    with pytest.raises(ValueError, match=r"block_indices \[9\] are outside the 4 blocks"):
        create_backbone(BackboneConfig(name="visionllama_small_patch16_224", pyramid="multilevel", img_size=64,
                                       kwargs=TINY_PLAIN, block_indices=(0, 1, 2, 9)))
    with pytest.raises(ValueError, match="block_indices must name 4 blocks"):
        BackboneConfig(block_indices=(1, 2))


def test_native_levels_pick_the_last_feature_of_each_reduction():
    info = [{"reduction": r} for r in (2, 4, 4, 8, 16, 32)]
    assert native_levels(info) == [2, 3, 4, 5]
    assert native_levels([{"reduction": 16}] * 12) is None


@pytest.mark.parametrize("head", ["upernet", "fpn", "linear"])
def test_heads_give_logits_at_the_finest_level(head):
    maps = [torch.randn(2, c, 16 // 2 ** i, 16 // 2 ** i) for i, c in enumerate([8, 16, 24, 32])]
    logits = create_head(head, [8, 16, 24, 32], num_classes=5, channels=32).eval()(maps)
    assert logits.shape == (2, 5, 16, 16) and torch.isfinite(logits).all()


def test_head_errors():
    with pytest.raises(ValueError, match="head must be one of upernet, fpn, linear, got 'segformer'"):
        create_head("segformer", [8] * 4, 3)
    with pytest.raises(ValueError, match="at least 2 classes"):
        create_head("upernet", [8] * 4, 1)
    with pytest.raises(ValueError, match="multiple of 32"):
        create_head("fpn", [8] * 4, 3, channels=40)


def tiny_segmenter(head="fpn", aux=True, num_classes=4):
    return create_segmenter(BackboneConfig(name="visionllama_pyramid_small_224", img_size=64, kwargs=TINY_PYRAMID),
                            SegmenterConfig(num_classes=num_classes, head=head, head_channels=32, aux_head=aux))


def test_segmenter_pads_any_input_and_returns_logits_at_its_size():
    model = tiny_segmenter().eval()
    logits, aux = model.forward_with_aux(torch.randn(1, 3, 50, 70))
    assert logits.shape == aux.shape == (1, 4, 50, 70)
    torch.testing.assert_close(model(torch.randn(1, 3, 50, 70).zero_()), model(torch.zeros(1, 3, 50, 70)))


def test_slide_inference_equals_whole_for_a_per_pixel_model():
    model = nn.Conv2d(3, 5, 1)
    image = torch.randn(2, 3, 37, 53)
    torch.testing.assert_close(slide_logits(model, image, crop=16, stride=10, num_classes=5), model(image))
    torch.testing.assert_close(predict_logits(model, image, 5, "slide", crop=16), model(image).detach())
    with pytest.raises(ValueError, match="stride must be in"):
        slide_logits(model, image, crop=16, stride=20, num_classes=5)
    with pytest.raises(ValueError, match="'whole' or 'slide'"):
        predict_logits(model, image, 5, "tiles")


def test_slide_inference_averages_overlapping_crops():
    calls = []

    def model(x):   # each crop votes its own index: the overlap gets the mean of the crops covering it
        calls.append(x.shape[-1])
        return torch.full((x.shape[0], 1, *x.shape[-2:]), float(len(calls)))
    out = slide_logits(model, torch.zeros(1, 3, 4, 6), crop=4, stride=2, num_classes=1)
    assert calls == [4, 4]                                    # columns 0-3 and 2-5
    assert out[0, 0, 0].tolist() == [1, 1, 1.5, 1.5, 2, 2]


def test_miou_of_a_hand_example():
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 2, 0]])
    ev = SegmentationEvaluator(4, class_names=["a", "b", "c", "d"])
    ev.update(pred[None], target[None])
    m = ev.compute()
    assert ev.confusion.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert m["iou"]["a"] == pytest.approx(1 / 2) and m["iou"]["b"] == pytest.approx(2 / 3)
    assert m["iou"]["c"] == 1.0 and math.isnan(m["iou"]["d"])   # d: never present, left out of the mean
    assert m["miou"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert m["aacc"] == pytest.approx(4 / 5) and m["macc"] == pytest.approx((1 / 2 + 1 + 1) / 3)


def test_miou_from_logits_and_errors():
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 2] = 1.0
    ev = SegmentationEvaluator(3)
    ev.update(logits, torch.tensor([[[2, 2], [0, 2]]]))
    assert ev.compute()["iou"] == {"0": 0.0, "1": pytest.approx(float("nan"), nan_ok=True), "2": 0.75}
    with pytest.raises(ValueError, match="differ in size"):
        ev.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="2 class names for a 3-class"):
        metrics_from_confusion(torch.eye(3), ["x", "y"])


def test_objective_adds_the_auxiliary_term_and_survives_unlabelled_crops():
    model = tiny_segmenter(aux=True)
    objective = SegmentationObjective(model, aux_weight=0.4)
    images, masks = torch.randn(2, 3, 64, 64), torch.randint(0, 4, (2, 64, 64))
    torch.manual_seed(0)
    loss, main, aux = objective(images, masks)
    assert loss.item() == pytest.approx(main.item() + 0.4 * aux.item(), rel=1e-5)
    loss, main, _ = objective(images, torch.full_like(masks, IGNORE_INDEX))
    assert loss.item() == 0.0 and main.requires_grad


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    model = tiny_segmenter(head="upernet", aux=False)
    objective = SegmentationObjective(model)
    cells = torch.randn(4, 3, 8, 8)   # 8 x 8 px cells of one colour; the class is a rule of the colour
    images = F.interpolate(cells, scale_factor=8, mode="nearest")
    masks = (images[:, 0] > 0).long() + 2 * (images[:, 1] > 0.5).long()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(8):
        loss = objective(images, masks)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_trunk_weights_load_from_a_classifier_checkpoint(tmp_path):
    classifier = llamavit.create_model("visionllama_small_patch16_224", num_classes=7, img_size=64, **TINY_PLAIN)
    save_file(classifier.state_dict(), str(tmp_path / "cls.safetensors"))
    trunk = llamavit.create_model("visionllama_small_patch16_224", num_classes=0, img_size=64, **TINY_PLAIN)
    load_trunk_weights(trunk, str(tmp_path / "cls.safetensors"))
    torch.testing.assert_close(trunk.blocks[2].attn.qkv.weight, classifier.blocks[2].attn.qkv.weight)



def test_a_grayscale_stem_is_adapted_to_rgb_scenes(tmp_path):
    gray = llamavit.create_model("visionllama_small_patch16_224", num_classes=10, img_size=32, in_chans=1,
                                 **TINY_PLAIN)
    save_file(gray.state_dict(), str(tmp_path / "gray.safetensors"))
    rgb = llamavit.create_model("visionllama_small_patch16_224", num_classes=0, img_size=64, in_chans=3, **TINY_PLAIN)
    load_trunk_weights(rgb, str(tmp_path / "gray.safetensors"))
    # timm's rule: the one channel repeated over three and scaled by 1/3, so a gray image embeds as before
    stem, source = rgb.patch_embed.proj.weight, gray.patch_embed.proj.weight
    torch.testing.assert_close(stem, source.repeat(1, 3, 1, 1) / 3)
    image = torch.rand(1, 1, 16, 16)
    torch.testing.assert_close(F.conv2d(image.expand(1, 3, 16, 16), stem), F.conv2d(image, source))
    torch.testing.assert_close(rgb.blocks[1].mlp.fc2.weight, gray.blocks[1].mlp.fc2.weight)


def test_trunk_weights_load_from_a_shipped_name():
    trunk = llamavit.create_model("illama_tiny_patch16_224", num_classes=0, img_size=96, in_chans=3, patch_size=4,
                                  embed_dim=96, depth=6, num_heads=3, mlp_ratio=4.0)
    load_trunk_weights(trunk, "illama_fmnist_patch4_28.fmnist")
    shipped = llamavit.create_model("illama_fmnist_patch4_28.fmnist", pretrained=True)
    torch.testing.assert_close(trunk.blocks[5].attn.qkv.weight, shipped.blocks[5].attn.qkv.weight)
    with pytest.raises(CheckpointError, match="checkpoint not found: illama_fmnist_patch4_28.nothing"):
        load_trunk_weights(trunk, "illama_fmnist_patch4_28.nothing")

# --- the trainer and the command line on tiny scenes --------------------------------------------------------------
@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("scenes"))
    build_scenes(root, SceneConfig(size=64, train=16, val=4, max_scale=2.0))
    return root


SEG_FLAGS = ["--backbone", "visionllama_pyramid_small_224", "--backbone-kwargs",
             *[f"{k}={json.dumps(v)}" for k, v in TINY_PYRAMID.items()], "--head", "fpn", "--head-channels", "32",
             "--img-size", "64", "--batch-size", "4", "--epochs", "1", "--no-progress", "--log-every", "1"]


def test_segment_train_eval_predict_end_to_end(scenes, tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["segment", "train", "--data", scenes, "--output", run, *SEG_FLAGS, "--lr", "1e-3"]) == 0
    summary = json.loads(open(os.path.join(run, "summary.json")).read())
    assert summary["steps"] == 4 and 0 <= summary["miou"] <= 1 and set(summary["iou"]) >= {"background", "Bag"}
    capsys.readouterr()
    assert main(["segment", "eval", "--checkpoint", run, "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["miou"] == pytest.approx(summary["miou"])   # the same weights, images and metric
    image = os.path.join(scenes, "val", sorted(os.listdir(os.path.join(scenes, "val")))[0])
    assert main(["segment", "predict", image, "--checkpoint", run, "--output", str(tmp_path / "pred"),
                 "--mode", "slide"]) == 0
    stem = os.path.splitext(os.path.basename(image))[0]
    overlay = Image.open(tmp_path / "pred" / f"{stem}.png")
    labels = Image.open(tmp_path / "pred" / f"{stem}_labels.png")
    assert overlay.size == labels.size == Image.open(image).size and overlay.mode == "RGB"
    assert max(labels.get_flattened_data()) < 11
    model, meta = load_segmenter(run)
    assert meta["classes"][0] == "background" and not model.training


def test_segment_resume_is_exact(scenes, tmp_path):
    common = dict(data=scenes, backbone="visionllama_pyramid_small_224", backbone_kwargs=TINY_PYRAMID, head="linear",
                  img_size=64, batch_size=4, epochs=1, progress=False, log_every=1, lr=1e-3, aux_head=False,
                  val_subset=1)
    straight = segment(SegmentConfig(output=str(tmp_path / "a"), **common))
    segment(SegmentConfig(output=str(tmp_path / "b"), max_steps=2, **common))
    resumed = segment(SegmentConfig(output=str(tmp_path / "b"), resume=True, **common))
    assert resumed["resumed"] and resumed["final_train_loss"] == straight["final_train_loss"]


@pytest.mark.parametrize("args,message", [
    (["--data", "{missing}"], "not found|neither"),
    (["--data", "{scenes}", "--backbone", "no_such_net"], "unknown backbone 'no_such_net'"),
    (["--data", "{scenes}", "--backbone", "visionllama_small_patch16_224", "--pyramid", "native"], "plain trunk"),
    (["--data", "{scenes}", "--head", "segformer"], "head must be one of"),
    (["--data", "{scenes}", "--eval-mode", "tiles"], "eval_mode must be one of whole, slide"),
    ([], "segmentation needs --data"),
])
def test_segment_bad_input_gives_one_line(scenes, tmp_path, capsys, args, message):
    args = [a.format(missing=str(tmp_path / "nothing"), scenes=scenes) for a in args]
    assert main(["segment", "train", "--output", str(tmp_path / "r"), "--img-size", "64", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("llamavit: segment: error:")
    assert __import__("re").search(message, err), err


def test_segment_trains_on_a_coco_only_directory_and_refuses_a_bad_checkpoint(scenes, tmp_path, capsys):
    coco = tmp_path / "coco"
    os.makedirs(coco / "annotations")
    for split in ("train", "val"):
        os.symlink(os.path.join(scenes, split), coco / split)
        os.symlink(os.path.join(scenes, "annotations", f"instances_{split}.json"),
                   coco / "annotations" / f"instances_{split}.json")
    run = str(tmp_path / "run")
    assert main(["segment", "train", "--data", str(coco), "--output", run, *SEG_FLAGS, "--max-steps", "1",
                 "--val-subset", "2"]) == 0
    summary = json.loads(open(os.path.join(run, "summary.json")).read())
    assert list(summary["iou"])[:2] == ["background", "T-shirt/top"] and len(summary["iou"]) == 11
    assert main(["segment", "eval", "--checkpoint", str(tmp_path / "nowhere")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_coco_instances_become_label_maps_smaller_on_top(tmp_path):
    from llamavit.data.dense import CocoSemantic
    root = tmp_path / "c"
    os.makedirs(root / "annotations")
    os.makedirs(root / "train")
    Image.new("RGB", (6, 4)).save(root / "train" / "a.png")
    big = [[0, 0, 6, 0, 6, 4, 0, 4]]          # the whole image, category 7
    small = [[1, 1, 3, 1, 3, 3, 1, 3]]        # a 2 x 2 square, category 3
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 6, "height": 4}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 1, 2, 2], "area": 4,
                             "iscrowd": 0, "segmentation": small},
                            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [0, 0, 6, 4], "area": 24,
                             "iscrowd": 0, "segmentation": big}],
            "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "sofa"}]}
    (root / "annotations" / "instances_train.json").write_text(json.dumps(coco))
    data = CocoSemantic(str(root), "train")
    image, mask = data[0]
    assert data.classes == ["background", "cat", "sofa"] and image.shape == (3, 4, 6)
    assert mask[2, 2] == 1 and mask[0, 0] == 2 and mask[3, 5] == 2   # the small one stays on top of the big one


DET_FLAGS = ["--backbone", "visionllama_pyramid_small_224", "--backbone-kwargs",
             *[f"{k}={json.dumps(v)}" for k, v in TINY_PYRAMID.items()], "--fpn-channels", "64", "--img-size", "64",
             "--batch-size", "4", "--epochs", "1", "--no-progress", "--log-every", "1", "--val-subset", "2"]


@pytest.mark.parametrize("detector", ["fcos", "mask_rcnn"])
def test_detect_train_eval_predict_end_to_end(scenes, tmp_path, capsys, detector):
    run = str(tmp_path / "run")
    cap = "detections_per_img=20" if detector == "fcos" else "box_detections_per_img=20"   # the detector's own option
    assert main(["detect", "train", "--data", scenes, "--output", run, "--detector", detector, *DET_FLAGS,
                 "--detector-kwargs", cap]) == 0
    summary = json.loads(open(os.path.join(run, "summary.json")).read())
    assert summary["steps"] == 4 and 0 <= summary["map_50"] <= 1 and math.isfinite(summary["final_train_loss"])
    assert ("mask_map" in summary) == (detector == "mask_rcnn")
    log = [json.loads(line) for line in open(os.path.join(run, "log.jsonl"))]
    assert {"loss", "classification"} <= set(log[0]) if detector == "fcos" else {"loss", "loss_mask"} <= set(log[0])
    capsys.readouterr()
    assert main(["detect", "eval", "--checkpoint", run, "--data", scenes, "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert set(metrics["map_per_class"]) <= {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                             "Sneaker", "Bag", "Ankle boot"}
    image = os.path.join(scenes, "val", sorted(os.listdir(os.path.join(scenes, "val")))[0])
    assert main(["detect", "predict", image, "--checkpoint", run, "--output", str(tmp_path / "pred"),
                 "--score-thresh", "0"]) == 0
    drawn = Image.open(tmp_path / "pred" / (os.path.splitext(os.path.basename(image))[0] + ".png"))
    assert drawn.size == Image.open(image).size
    assert capsys.readouterr().out.startswith(image)


def test_detect_refuses_an_ade20k_only_directory_and_a_segmenter_checkpoint(scenes, tmp_path, capsys):
    ade = tmp_path / "ade"
    for d in ("images/training", "annotations/training"):
        os.makedirs(ade / d)
    assert main(["detect", "train", "--data", str(ade), "--output", str(tmp_path / "r")]) == 2
    assert "ADE20K layout only" in capsys.readouterr().err
    run = str(tmp_path / "seg")
    assert main(["segment", "train", "--data", scenes, "--output", run, *SEG_FLAGS, "--max-steps", "1",
                 "--val-subset", "1"]) == 0
    capsys.readouterr()
    assert main(["detect", "eval", "--checkpoint", run]) == 2
    assert "is a segment checkpoint; expected one made by `llamavit detect train`" in capsys.readouterr().err
    assert main(["detect", "train", "--data", scenes, "--detector", "yolo"]) == 2
    assert "detector must be one of fcos, retinanet, faster_rcnn, mask_rcnn" in capsys.readouterr().err


RECIPES = sorted(str(p) for p in Path(__file__).resolve().parent.parent.glob("configs/*.yaml")
                 if p.name.startswith(("ade20k_", "coco_", "scenes_")))


@pytest.mark.parametrize("path", RECIPES, ids=[os.path.basename(p) for p in RECIPES])
def test_the_dense_recipes_are_valid_configs(path):
    cls = DetectConfig if "detect" in path or "coco" in path else SegmentConfig
    cfg = cls.from_yaml(path)
    assert cfg.backbone_config().name == cfg.backbone and cfg.data
    if "ade20k_upernet_visionllama_base" in path:   # the official recipe's facts
        assert cfg.block_indices == (3, 5, 7, 11) and cfg.head_channels == 768 and cfg.max_steps == 160000


def test_layer_decay_reaches_the_trunk_inside_a_segmenter_and_a_detector(tmp_path):
    from timm.optim import create_optimizer_v2

    from llamavit.dense import build_detector, trunk_group_matcher
    plain = create_segmenter(BackboneConfig(name="illama_tiny_patch16_224", pyramid="simple", img_size=64,
                                            kwargs=TINY_PLAIN), SegmenterConfig(num_classes=3, head="fpn",
                                                                                head_channels=32))
    objective = SegmentationObjective(plain, 0.0)
    objective.group_matcher = trunk_group_matcher(objective)
    opt = create_optimizer_v2(objective, "adamw", lr=1.0, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    params = dict(objective.named_parameters())
    trunk = "segmenter.backbone.trunk."
    assert trunk + "blocks.0.attn.qkv.weight" in params
    for i in range(4):   # 4 blocks: block i gets 0.5 ** (4 - i), the stem 0.5 ** 5
        assert scale[id(params[f"{trunk}blocks.{i}.attn.qkv.weight"])] == pytest.approx(0.5 ** (4 - i))
    assert scale[id(params[trunk + "patch_embed.proj.weight"])] == pytest.approx(0.5 ** 5)
    heads = [n for n in params if not n.startswith(trunk)]
    assert heads and all(scale[id(params[n])] == 1.0 for n in heads)   # neck and heads: the full rate

    detector = build_detector(tiny_backbone("visionllama_pyramid_small_224", TINY_PYRAMID, "auto", 64), 3, "fcos",
                              fpn_channels=32)
    detector.group_matcher = trunk_group_matcher(detector)
    opt = create_optimizer_v2(detector, "adamw", lr=1.0, layer_decay=0.5)
    scales = {n: g["lr_scale"] for g in opt.param_groups for n, p in detector.named_parameters()
              if any(p is q for q in g["params"])}
    deep = [n for n in scales if ".trunk.blocks.3.0." in n]
    assert deep and all(scales[n] == 0.5 for n in deep)
    assert all(scales[n] == 1.0 for n in scales if ".trunk." not in n)
    with pytest.raises(ValueError, match="holds no DenseBackbone"):
        trunk_group_matcher(nn.Linear(2, 2))
    cfg = SegmentConfig(data=str(tmp_path), layer_decay=0.65)
    assert cfg.layer_decay == 0.65
    with pytest.raises(ValueError, match=r"layer_decay must be in \(0, 1\]"):
        SegmentConfig(data=str(tmp_path), layer_decay=1.5)
