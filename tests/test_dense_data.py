"""Dense prediction data: the Fashion-MNIST scenes builder, the ADE20K / COCO readers, joint transforms, batching."""
import csv
import filecmp
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision import tv_tensors

from llamavit.data.datasets import FASHION_MNIST_DIR
from llamavit.data.dense import (ADE20KSegmentation, CocoDetection, DenseTransformConfig, build_dense_transform,
                                 collate_detection, collate_segmentation, detect_layout)
from llamavit.dense.detection import batch_targets
from llamavit.errors import DatasetError

needs_fmnist = pytest.mark.skipif(not os.path.isfile(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")),
                                  reason="Debian package dataset-fashion-mnist not installed (make test installs it)")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")
TINY = dict(size=64, train=6, val=3, max_scale=2.0)


# --- the scenes builder ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from llamavit.data.scenes import SceneConfig, build_scenes
    out = str(tmp_path_factory.mktemp("scenes") / "s")
    return out, SceneConfig(**TINY), build_scenes(out, SceneConfig(**TINY))


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


@needs_fmnist
def test_scenes_write_both_layouts(scenes):
    out, cfg, manifest = scenes
    for split, ade, n in (("train", "training", 6), ("val", "validation", 3)):
        names = sorted(os.listdir(os.path.join(out, "images", ade)))
        assert names == [f"scene_{i:06d}.jpg" for i in range(n)]
        assert sorted(os.listdir(os.path.join(out, "annotations", ade))) == [f"scene_{i:06d}.png" for i in range(n)]
        assert sorted(os.listdir(os.path.join(out, split))) == names
        for name in names:      # one file, two names
            ade_file, coco_file = os.path.join(out, "images", ade, name), os.path.join(out, split, name)
            assert os.stat(ade_file).st_ino == os.stat(coco_file).st_ino
            with Image.open(os.path.join(out, "annotations", ade, name[:-4] + ".png")) as m:
                assert m.mode == "L" and m.size == (64, 64)
                assert set(np.unique(np.asarray(m)).tolist()) <= set(range(12))
    with open(os.path.join(out, "objectInfo.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["Idx"] for r in rows] == [str(i) for i in range(1, 12)] and rows[0]["Name"] == "background"
    assert rows[0]["Train"] == "6" and rows[0]["Val"] == "3" and 0 < float(rows[0]["Ratio"]) < 1
    assert manifest["classes"][1:] == manifest["categories"] and len(manifest["categories"]) == 10
    assert "not a standard benchmark" in manifest["note"] and manifest["config"]["size"] == 64
    assert not os.path.exists(os.path.join(out, ".scenes-partial"))


@needs_fmnist
def test_scenes_instances_match_the_label_maps(scenes):
    from llamavit.data.scenes import fashion_items, render_scene
    out, cfg, _ = scenes
    for split, ade in (("train", "training"), ("val", "validation")):
        coco = COCO(os.path.join(out, "annotations", f"instances_{split}.json"))
        assert sorted(coco.cats) == list(range(1, 11))
        items = fashion_items(split == "train")[:2]
        for image_id in coco.getImgIds():
            info = coco.imgs[image_id]
            labels = np.asarray(Image.open(os.path.join(out, "annotations", ade, info["file_name"][:-4] + ".png")))
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
            for a in anns:
                m = mask_utils.decode(a["segmentation"])
                assert m.sum() == a["area"] >= cfg.min_area and a["iscrowd"] == 0
                assert np.all(labels[m.astype(bool)] == a["category_id"] + 1)     # category c + 1 <-> label c + 2
                ys, xs = np.nonzero(m)
                assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            scene = render_scene(cfg, split, image_id - 1, items)
            assert np.array_equal(scene.labels, labels)
            kept = [(c, m) for c, m, k in zip(scene.classes, scene.masks, scene.kept) if k]
            assert [c + 1 for c, _ in kept] == [a["category_id"] for a in anns]
            assert all(np.array_equal(m, mask_utils.decode(a["segmentation"]).astype(bool))
                       for (_, m), a in zip(kept, anns))
            # every pixel labelled c + 2 lies in exactly one visible mask of class c (kept or dropped for min_area)
            for c in range(10):
                cover = sum((m.astype(int) for k, m in zip(scene.classes, scene.masks) if k == c), np.zeros((64, 64)))
                assert cover.max() <= 1 and np.array_equal(cover == 1, labels == c + 2)
            assert all(m.sum() < cfg.min_area for m, k in zip(scene.masks, scene.kept) if not k)


@needs_fmnist
def test_scenes_are_deterministic_idempotent_and_refuse_another_config(scenes, tmp_path):
    from llamavit.data.scenes import SceneConfig, build_scenes, encode_jpeg, fashion_items, render_scene
    out, cfg, manifest = scenes
    other = str(tmp_path / "again")
    assert build_scenes(other, SceneConfig(**TINY)) == manifest
    assert _files(other) == _files(out)
    assert all(filecmp.cmp(os.path.join(out, f), os.path.join(other, f), shallow=False) for f in _files(out))
    scene = render_scene(cfg, "val", 2, fashion_items(False)[:2])        # scene 2 alone, without the others
    with open(os.path.join(out, "val", "scene_000002.jpg"), "rb") as f:
        assert encode_jpeg(scene.image, cfg.jpeg_quality) == f.read()
    stamp = os.stat(os.path.join(out, "scenes.json")).st_mtime_ns
    assert build_scenes(out, SceneConfig(**TINY)) == manifest
    assert os.stat(os.path.join(out, "scenes.json")).st_mtime_ns == stamp
    with pytest.raises(ValueError, match=r"holds scenes built with another config .*use another --output or delete"):
        build_scenes(out, SceneConfig(**{**TINY, "seed": 1}))
    # an interrupted build (marker, no scenes.json, a stale file from a bigger config) is finished and cleaned up
    os.unlink(os.path.join(other, "scenes.json"))
    open(os.path.join(other, ".scenes-partial"), "w").close()
    open(os.path.join(other, "images", "training", "scene_000099.jpg"), "w").close()
    assert build_scenes(other, SceneConfig(**TINY)) == manifest and _files(other) == _files(out)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("x")
    with pytest.raises(ValueError, match=r"is not empty and holds no scenes.json"):
        build_scenes(str(tmp_path / "busy"), SceneConfig(**TINY))


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_scale=4.0), r"items of scale 4.0 \(112 px\) do not fit a canvas of 96 px"),
    (dict(min_items=3, max_items=2), r"min_items <= max_items, got 3..2"),
    (dict(ignore_band=0.3), r"ignore_band must be in \[0, threshold=0.25\], got 0.3"),
    (dict(train=0, val=0), r"scene counts must be >= 0 and not both 0"),
    (dict(threshold=1.0), r"threshold must be in \(0, 1\), got 1.0"),
])
def test_scene_config_refuses_bad_values(kwargs, message):
    from llamavit.data.scenes import SceneConfig
    with pytest.raises(ValueError, match=message):
        SceneConfig(**kwargs)


@needs_fmnist
def test_scenes_read_back_with_the_readers(scenes):
    out, _, manifest = scenes
    seg = ADE20KSegmentation(out, "val")
    assert len(seg) == 3 and seg.classes == manifest["classes"]
    image, mask = seg[0]
    stored = torch.from_numpy(np.array(Image.open(os.path.join(out, "annotations/validation/scene_000000.png"))))
    assert image.shape == (3, 64, 64) and image.dtype == torch.float32 and mask.dtype == torch.int64
    assert torch.equal(mask, torch.where(stored == 0, 255, stored.long() - 1))
    det = CocoDetection(out, "validation")
    assert len(det) == 3 and det.classes == manifest["categories"]
    _, target = det[0]
    assert target["image_id"] == 1 and target["masks"].shape[1:] == (64, 64) and target["labels"].min() >= 1


# --- hand-written fixtures in each layout ---------------------------------------------------------------------------

def _write_ade(root, masks, csv_names=("wall", "floor", "sky"), split="training"):
    """Images (PNG, known pixels) and label maps `masks` {stem: uint8 (H, W)} in the ADE20K layout."""
    for d in ("images", "annotations"):
        os.makedirs(os.path.join(root, d, split), exist_ok=True)
    for stem, m in masks.items():
        h, w = m.shape
        img = np.zeros((h, w, 3), dtype=np.uint8)
        img[..., 0] = np.arange(w, dtype=np.uint8) * 10
        Image.fromarray(img).save(os.path.join(root, "images", split, f"{stem}.png"))
        Image.fromarray(m).save(os.path.join(root, "annotations", split, f"{stem}.png"))
    if csv_names:
        with open(os.path.join(root, "objectInfo150.csv"), "w") as f:
            f.write("Idx,Ratio,Train,Val,Name\n" + "".join(f"{i},0.1,1,1,{n}\n" for i, n in enumerate(csv_names, 1)))


def _rle_counts(mask):
    """Uncompressed COCO RLE counts of a binary mask (column-major runs, starting with zeros)."""
    flat, counts, current, run = mask.flatten(order="F"), [], 0, 0
    for v in flat:
        if v != current:
            counts.append(run)
            current, run = v, 0
        run += 1
    return counts + [run]


def _write_coco(root, split="train"):
    """Two 6x8 PNG images; categories with ids 3 and 7; a polygon, an uncompressed RLE, a crowd and a box of width 0."""
    os.makedirs(os.path.join(root, split))
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((6, 8, 3), 100, dtype=np.uint8)).save(os.path.join(root, split, name))
    rle_mask = np.zeros((6, 8), dtype=np.uint8)
    rle_mask[3:5, 0:2] = 1
    anns = [
        {"id": 1, "image_id": 10, "category_id": 7, "bbox": [2, 1, 4, 3], "area": 12, "iscrowd": 0,
         "segmentation": [[2, 1, 6, 1, 6, 4, 2, 4]]},
        {"id": 2, "image_id": 10, "category_id": 3, "bbox": [0, 3, 2, 2], "area": 4, "iscrowd": 0,
         "segmentation": {"size": [6, 8], "counts": _rle_counts(rle_mask)}},
        {"id": 3, "image_id": 10, "category_id": 3, "bbox": [0, 0, 8, 6], "area": 48, "iscrowd": 1,
         "segmentation": {"size": [6, 8], "counts": [0, 48]}},
        {"id": 4, "image_id": 10, "category_id": 3, "bbox": [5, 5, 0, 1], "area": 0, "iscrowd": 0,
         "segmentation": [[5, 5, 5, 6, 5, 6]]},
    ]
    data = {"images": [{"id": 10, "file_name": "a.png", "width": 8, "height": 6},
                       {"id": 11, "file_name": "b.png", "width": 8, "height": 6}],
            "annotations": anns, "categories": [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}]}
    with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
        json.dump(data, f)
    return rle_mask


def test_ade20k_reader_maps_labels(tmp_path):
    m = np.array([[0, 1, 2, 3], [255, 3, 2, 1]], dtype=np.uint8)
    _write_ade(str(tmp_path), {"x": m, "y": np.ones((2, 4), dtype=np.uint8)})
    ds = ADE20KSegmentation(str(tmp_path), "train")
    assert len(ds) == 2 and ds.classes == ["wall", "floor", "sky"]
    image, mask = ds[0]
    assert mask.tolist() == [[255, 0, 1, 2], [255, 2, 1, 0]] and mask.dtype == torch.int64
    assert image.shape == (3, 2, 4) and torch.allclose(image[0, 0], torch.tensor([0.0, 10, 20, 30]) / 255)
    raw = ADE20KSegmentation(str(tmp_path), "training", reduce_zero_label=False)
    assert raw[0][1].tolist() == m.tolist() and raw.classes == ["other", "wall", "floor", "sky"]
    nocsv = tmp_path / "nocsv"
    _write_ade(str(nocsv), {"x": m}, csv_names=())
    assert ADE20KSegmentation(str(nocsv), "train", num_classes=3).classes == ["class_1", "class_2", "class_3"]
    with pytest.raises(DatasetError, match=r"has no objectInfo\*.csv naming the classes: pass num_classes"):
        ADE20KSegmentation(str(nocsv), "train")


def test_coco_reader_boxes_labels_masks(tmp_path):
    rle_mask = _write_coco(str(tmp_path))
    ds = CocoDetection(str(tmp_path), "training")
    assert len(ds) == 2 and ds.classes == ["dog", "cat"]          # category ids 3, 7 -> labels 1, 2
    image, t = ds[0]
    assert image.shape == (3, 6, 8) and torch.allclose(image, torch.full_like(image, 100 / 255))
    assert t["image_id"] == 10 and t["labels"].tolist() == [2, 1]  # the crowd and the zero-width box are gone
    assert t["boxes"].tolist() == [[2, 1, 6, 4], [0, 3, 2, 5]] and t["boxes"].dtype == torch.float32
    expected = np.zeros((6, 8), dtype=np.uint8)
    expected[1:4, 2:6] = 1
    assert t["masks"].dtype == torch.uint8 and t["masks"][0].numpy().tolist() == expected.tolist()
    assert t["masks"][1].numpy().tolist() == rle_mask.tolist()
    _, empty = ds[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,) and empty["masks"].shape == (0, 6, 8)


def test_detect_layout(tmp_path):
    _write_ade(str(tmp_path), {"x": np.ones((2, 2), dtype=np.uint8)})
    assert detect_layout(str(tmp_path), "detect") == "ade20k"
    _write_coco(str(tmp_path))
    assert detect_layout(str(tmp_path), "segment") == "ade20k" and detect_layout(str(tmp_path), "detect") == "coco"
    with pytest.raises(DatasetError, match=r"holds neither the ADE20K layout .* nor the COCO layout"):
        detect_layout(str(tmp_path / "nothing"), "segment")


# --- transforms and batching ----------------------------------------------------------------------------------------

def _plain_cfg(img_size, scale_range=(1.0, 1.0), hflip=0.0):
    return DenseTransformConfig(img_size=img_size, scale_range=scale_range, hflip=hflip, photometric=False,
                                mean=(0, 0, 0), std=(1, 1, 1))


def _dot_image(h=8, w=8, y=2, x=1):
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    img[:, y, x] = 255
    return tv_tensors.Image(img)


def test_flip_moves_mask_and_boxes_with_the_image():
    mask = torch.zeros(8, 8, dtype=torch.uint8)
    mask[2, 1] = 5
    image, out = build_dense_transform(_plain_cfg(8, hflip=1.0), True, "segment")(_dot_image(), tv_tensors.Mask(mask))
    assert image[0, 2, 6] == 1 and image.sum() == 3 and out[2, 6] == 5 and (out == 5).sum() == 1
    target = {"boxes": tv_tensors.BoundingBoxes([[1, 2, 3, 4]], format="XYXY", canvas_size=(8, 8)),
              "labels": torch.tensor([1]), "masks": tv_tensors.Mask(mask[None].clamp(max=1))}
    image, t = build_dense_transform(_plain_cfg(8, hflip=1.0), True, "detect")(_dot_image(), target)
    assert t["boxes"].tolist() == [[5, 2, 7, 4]] and t["masks"][0, 2, 6] == 1 and image[0, 2, 6] == 1


def test_crop_pads_masks_and_drops_boxes_outside():
    image, mask = build_dense_transform(_plain_cfg(8, (0.5, 0.5)), True, "segment")(
        _dot_image(), tv_tensors.Mask(torch.ones(8, 8, dtype=torch.uint8)))
    assert image.shape == (3, 8, 8) and mask.shape == (8, 8)            # resized to 4, padded back to 8
    assert (mask == 255).sum() == 48 and (mask == 1).sum() == 16 and image[:, mask == 255].abs().sum() == 0
    masks = torch.zeros(2, 16, 16, dtype=torch.uint8)
    masks[0, :2, :2], masks[1, 14:, 14:] = 1, 1
    t = build_dense_transform(_plain_cfg(8, (2.0, 2.0)), True, "detect")
    for seed in range(5):
        torch.manual_seed(seed)
        target = {"boxes": tv_tensors.BoundingBoxes([[0, 0, 2, 2], [14, 14, 16, 16]], format="XYXY",
                                                    canvas_size=(16, 16)),
                  "labels": torch.tensor([1, 2]), "masks": tv_tensors.Mask(masks)}
        image, out = t(_dot_image(16, 16), target)
        assert image.shape == (3, 8, 8) and len(out["labels"]) <= 1      # no 8x8 crop holds both corners
        assert len(out["boxes"]) == len(out["labels"]) == len(out["masks"])
        assert all(int(m.sum()) > 0 for m in out["masks"])


def test_transforms_are_reproducible_from_torch_seed():
    t = build_dense_transform(DenseTransformConfig(img_size=16), True, "segment")
    image = tv_tensors.Image(torch.randint(0, 256, (3, 20, 24), dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.randint(0, 5, (20, 24), dtype=torch.uint8))
    runs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        runs.append(t(image, mask))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][0], runs[2][0])
    image, mask = build_dense_transform(DenseTransformConfig(img_size=10), False, "segment")(image, mask)
    assert image.shape == (3, 10, 12) and mask.shape == (10, 12)     # eval: short side to img_size, no crop


def test_collate_and_unpad_round_trip():
    targets = [{"boxes": torch.tensor([[0.0, 0, 2, 2], [1, 1, 3, 4]]), "labels": torch.tensor([3, 1]),
                "masks": torch.ones(2, 4, 5, dtype=torch.uint8)},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "masks": torch.zeros(0, 4, 5, dtype=torch.uint8)}]
    images, boxes, labels, masks = collate_detection([(torch.rand(3, 4, 5), t) for t in targets])
    assert images.shape == (2, 3, 4, 5) and boxes.shape == (2, 2, 4) and masks.shape == (2, 2, 4, 5)
    assert labels.tolist() == [[3, 1], [-1, -1]] and masks[1].sum() == 0
    for back, t in zip(batch_targets(boxes, labels, masks), targets):
        assert all(torch.equal(back[k], t[k]) for k in ("boxes", "labels", "masks"))
    _, _, labels, _ = collate_detection([(torch.rand(3, 4, 5), targets[1])])
    assert labels.tolist() == [[-1]]                                  # M >= 1
    images, seg = collate_segmentation([(torch.rand(3, 4, 5), torch.zeros(4, 5, dtype=torch.int64))] * 3)
    assert images.shape == (3, 3, 4, 5) and seg.shape == (3, 4, 5)
    with pytest.raises(ValueError, match=r"images of one batch have different sizes \[\(4, 5\), \(5, 4\)\]"):
        collate_segmentation([(torch.rand(3, 4, 5), torch.zeros(4, 5)), (torch.rand(3, 5, 4), torch.zeros(5, 4))])


# --- bad inputs -----------------------------------------------------------------------------------------------------

def test_ade20k_bad_inputs(tmp_path):
    root = str(tmp_path)
    _write_ade(root, {"ok": np.ones((6, 6), dtype=np.uint8), "big": np.full((6, 6), 9, dtype=np.uint8)})
    Image.fromarray(np.ones((4, 4), dtype=np.uint8)).save(os.path.join(root, "annotations/training/small.png"))
    Image.fromarray(np.zeros((6, 6, 3), dtype=np.uint8)).save(os.path.join(root, "images/training/small.png"))
    ds = ADE20KSegmentation(root, "train")
    with pytest.raises(DatasetError, match=r"annotation .*big.png has label 9 above K=3"):
        ds[[os.path.basename(p) for p, _ in ds.samples].index("big.png")]
    with pytest.raises(DatasetError, match=r"annotation .*small.png is 4x4 but its image is 6x6"):
        ds[[os.path.basename(p) for p, _ in ds.samples].index("small.png")]
    with pytest.raises(DatasetError, match=r"validation not found: the ADE20K layout holds root/images/validation"):
        ADE20KSegmentation(root, "val")
    Image.fromarray(np.zeros((6, 6, 3), dtype=np.uint8)).save(os.path.join(root, "images/training/lonely.jpg"))
    with pytest.raises(DatasetError, match=r"image .*lonely.jpg has no annotation .*lonely.png"):
        ADE20KSegmentation(root, "train")
    with pytest.raises(ValueError, match=r"split must be 'train' / 'training' or 'val' / 'validation', got 'test'"):
        ADE20KSegmentation(root, "test")


def test_coco_bad_inputs(tmp_path):
    root = str(tmp_path)
    _write_coco(root)
    path = os.path.join(root, "annotations", "instances_train.json")
    with pytest.raises(DatasetError, match=r"instances_val.json not found: the COCO layout holds"):
        CocoDetection(root, "val")
    with open(path) as f:
        good = json.load(f)
    open(path, "w").close()
    with pytest.raises(DatasetError, match=r"instances_train.json is empty; expected COCO instances JSON"):
        CocoDetection(root, "train")
    with open(path, "w") as f:
        json.dump({k: v for k, v in good.items() if k != "categories"}, f)
    with pytest.raises(DatasetError, match=r"is not COCO instances JSON: missing key 'categories'"):
        CocoDetection(root, "train")
    with open(path, "w") as f:
        json.dump(good, f)
    os.unlink(os.path.join(root, "train", "b.png"))
    with pytest.raises(DatasetError, match=r"image .*b.png listed in .*instances_train.json is missing \(1 of 2"):
        CocoDetection(root, "train")
