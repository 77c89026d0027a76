"""Fashion-MNIST scenes: a small, deterministic data set for semantic segmentation and detection.

Each scene is a `size` x `size` RGB canvas on a smooth random background with 2-5 Fashion-MNIST items
pasted in order (later items occlude earlier ones), each resized bilinearly and tinted with a random
colour: `pixel = alpha * tint + (1 - alpha) * below`, alpha = the item's intensity in [0, 1]. It is
derived from Fashion-MNIST, not a standard benchmark.

Labelling (painter's rule, one pass in paste order): an item *touches* the pixels where its alpha is
above `threshold - ignore_band`; each pixel belongs to the LAST item touching it. The label there is
the item's class + 2 where that item's alpha is above `threshold` (its core), else 0 = ignore (the
anti-aliased rim, whatever lies below it). Pixels no item touches are 1 = background. An instance's
visible mask is the pixels it owns with its core: so every pixel labelled c + 2 lies in exactly one
visible mask of an item of class c. Instances whose visible area is below `min_area` are left out of the
COCO annotations (their pixels keep their label).

`build_scenes(output)` writes both layouts (ADEChallengeData2016 and COCO, sharing the images by hard
links) and `output/scenes.json` last; a second call with the same config returns that manifest.
"""
import csv
import io
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from .datasets import FashionMNIST
from .seeding import mix_seed

SPLITS = {"train": ("training", 0), "val": ("validation", 1)}   # split -> (ADE20K folder, seed code)
ITEM_SIDE = 28
NOTE = ("derived from Fashion-MNIST (items pasted on random backgrounds), not a standard benchmark: numbers "
        "measured on it compare models with each other, not with published ADE20K / COCO results")
PARTIAL_MARKER = ".scenes-partial"
_SCENE_FILE = re.compile(r"scene_(\d+)\.(jpg|png)$")


def _side(scale: float) -> int:
    return max(1, int(round(ITEM_SIDE * scale)))


@dataclass
class SceneConfig:
    """How scenes are drawn: canvas side, scene counts, items per scene, item scale (side = 28 * scale px),
    the labelling thresholds on item intensity, the visible area an instance needs, seed and JPEG quality."""
    size: int = 96
    train: int = 4000
    val: int = 500
    min_items: int = 2
    max_items: int = 5
    min_scale: float = 1.0
    max_scale: float = 2.5
    threshold: float = 0.25
    ignore_band: float = 0.1
    min_area: int = 30
    seed: int = 0
    jpeg_quality: int = 95

    def __post_init__(self):
        if self.train < 0 or self.val < 0 or self.train + self.val == 0:
            raise ValueError(f"scene counts must be >= 0 and not both 0, got train={self.train} val={self.val}")
        if not 1 <= self.min_items <= self.max_items:
            raise ValueError(f"items per scene must satisfy 1 <= min_items <= max_items, "
                             f"got {self.min_items}..{self.max_items}")
        if not 0 < self.min_scale <= self.max_scale:
            raise ValueError(f"item scale must satisfy 0 < min_scale <= max_scale, "
                             f"got {self.min_scale}..{self.max_scale}")
        if _side(self.max_scale) > self.size:
            raise ValueError(f"items of scale {self.max_scale} ({_side(self.max_scale)} px) do not fit a canvas of "
                             f"{self.size} px: lower max_scale or raise size")
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if not 0 <= self.ignore_band <= self.threshold:
            raise ValueError(f"ignore_band must be in [0, threshold={self.threshold}], got {self.ignore_band}")
        if self.min_area < 0:
            raise ValueError(f"min_area must be >= 0, got {self.min_area}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")


DEFAULT_SCENES = SceneConfig()


@dataclass
class Scene:
    """One rendered scene: image uint8 (H, W, 3), labels uint8 (H, W) (0 ignore, 1 background, class + 2),
    and per item in paste order: class (0..9), visible mask bool (H, W), kept (visible area >= min_area)."""
    image: np.ndarray
    labels: np.ndarray
    classes: List[int] = field(default_factory=list)
    masks: List[np.ndarray] = field(default_factory=list)
    kept: List[bool] = field(default_factory=list)


def fashion_items(train: bool) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """(images uint8 (N, 28, 28), targets int64 (N,), class names) of Fashion-MNIST's train or test set."""
    ds = FashionMNIST(train=train)
    return ds.data.numpy(), ds.targets.numpy().astype(np.int64), list(ds.classes)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth colour gradient in a random direction plus mild noise, float32 (size, size, 3) in [0, 0.6]."""
    c0, c1 = rng.uniform(0.05, 0.5, size=(2, 3))
    angle = rng.uniform(0.0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    t = xx * np.cos(angle) + yy * np.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    bg = c0 + (c1 - c0) * t[..., None] + rng.normal(0.0, 0.02, size=(size, size, 3))
    return np.clip(bg, 0.0, 0.6).astype(np.float32)


def render_scene(cfg: SceneConfig, split: str, index: int, items: Tuple[np.ndarray, np.ndarray]) -> Scene:
    """Scene `index` of `split` ('train' draws from Fashion-MNIST's train items, 'val' from its test items:
    pass `fashion_items(split == 'train')[:2]`), drawn from its own generator: reproducible alone."""
    images, targets = items
    rng = np.random.default_rng(mix_seed(cfg.seed, SPLITS[split][1], index))
    size = cfg.size
    canvas = _background(rng, size)
    owner = np.full((size, size), -1, dtype=np.int16)      # last item touching each pixel
    core = np.zeros((size, size), dtype=bool)              # ... and whether it is that item's core
    touch_level = cfg.threshold - cfg.ignore_band
    classes = []
    for k in range(int(rng.integers(cfg.min_items, cfg.max_items + 1))):
        j = int(rng.integers(len(images)))
        side = _side(rng.uniform(cfg.min_scale, cfg.max_scale))
        y0, x0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        tint = rng.uniform(0.4, 1.0, size=3).astype(np.float32)
        alpha = np.asarray(Image.fromarray(images[j].astype(np.float32) / 255.0)
                           .resize((side, side), Image.BILINEAR), dtype=np.float32).clip(0.0, 1.0)
        region = (slice(y0, y0 + side), slice(x0, x0 + side))
        canvas[region] = alpha[..., None] * tint + (1.0 - alpha[..., None]) * canvas[region]
        touched = alpha > touch_level
        owner[region][touched] = k
        core[region][touched] = alpha[touched] > cfg.threshold
        classes.append(int(targets[j]))
    labels = np.ones((size, size), dtype=np.uint8)
    owned = owner >= 0
    labels[owned] = np.where(core[owned], np.asarray(classes, dtype=np.uint8)[owner[owned]] + 2, 0)
    masks = [(owner == k) & core for k in range(len(classes))]
    image = np.round(np.clip(canvas, 0.0, 1.0) * 255.0).astype(np.uint8)
    return Scene(image, labels, classes, masks, [int(m.sum()) >= max(cfg.min_area, 1) for m in masks])


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of a uint8 (H, W, 3) image (what `build_scenes` writes)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _write_bytes(path: str, data: bytes) -> None:
    if os.path.lexists(path):
        os.unlink(path)         # never write through a hard link left by an earlier, interrupted build
    with open(path, "wb") as f:
        f.write(data)


def _link_or_copy(src: str, dst: str) -> None:
    if os.path.lexists(dst):
        os.unlink(dst)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_json_atomic(path: str, obj) -> None:
    """Write JSON to a temporary file beside `path`, then rename it over `path`."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _remove_stale(folder: str, count: int) -> None:
    """Drop scene files numbered >= count (left by an interrupted build with more scenes)."""
    for name in os.listdir(folder):
        m = _SCENE_FILE.match(name)
        if m and int(m.group(1)) >= count:
            os.unlink(os.path.join(folder, name))


def _annotation(ann_id: int, image_id: int, category_id: int, mask: np.ndarray) -> Dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    bbox = [float(v) for v in mask_utils.toBbox(rle)]
    rle["counts"] = rle["counts"].decode("ascii")
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
            "area": int(mask.sum()), "iscrowd": 0, "segmentation": rle}


def _build_split(out: str, cfg: SceneConfig, split: str, category_names: List[str], progress: bool) -> Dict:
    """Write one split's images, PNG labels and COCO JSON; return its label statistics."""
    ade_split, _ = SPLITS[split]
    count = getattr(cfg, split)
    dirs = {key: os.path.join(out, *parts) for key, parts in
            (("img", ("images", ade_split)), ("ann", ("annotations", ade_split)), ("coco", (split,)))}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
        _remove_stale(d, count)
    num_labels = len(category_names) + 2
    pixels, images_with = np.zeros(num_labels, dtype=np.int64), np.zeros(num_labels, dtype=np.int64)
    images, annotations, dropped = [], [], 0
    steps = range(count)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, desc=f"scenes {split}", unit="scene", dynamic_ncols=True)
    items = fashion_items(split == "train")[:2] if count else None
    for i in steps:
        scene = render_scene(cfg, split, i, items)
        name = f"scene_{i:06d}"
        jpg = os.path.join(dirs["img"], f"{name}.jpg")
        _write_bytes(jpg, encode_jpeg(scene.image, cfg.jpeg_quality))
        _link_or_copy(jpg, os.path.join(dirs["coco"], f"{name}.jpg"))
        buf = io.BytesIO()
        Image.fromarray(scene.labels).save(buf, format="PNG")
        _write_bytes(os.path.join(dirs["ann"], f"{name}.png"), buf.getvalue())
        counts = np.bincount(scene.labels.ravel(), minlength=num_labels)
        pixels += counts
        images_with += counts > 0
        image_id = i + 1
        images.append({"id": image_id, "file_name": f"{name}.jpg", "width": cfg.size, "height": cfg.size})
        for c, m, kept in zip(scene.classes, scene.masks, scene.kept):
            if kept:
                annotations.append(_annotation(len(annotations) + 1, image_id, c + 1, m))
            dropped += not kept
    coco = {"info": {"description": f"Fashion-MNIST scenes, {split} split; {NOTE}", "version": "1"},
            "licenses": [], "images": images, "annotations": annotations,
            "categories": [{"id": c + 1, "name": n, "supercategory": "fashion"} for c, n in enumerate(category_names)]}
    write_json_atomic(os.path.join(out, "annotations", f"instances_{split}.json"), coco)
    return {"pixels": pixels, "images_with": images_with, "instances": len(annotations), "dropped": dropped}


def _write_object_info(path: str, classes: List[str], stats: Dict[str, Dict]) -> None:
    """objectInfo150.csv style: Idx (label 1..K), Ratio (pixel fraction over both splits), Train, Val (images
    holding the label), Name."""
    pixels = stats["train"]["pixels"] + stats["val"]["pixels"]
    total = max(int(pixels.sum()), 1)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Idx", "Ratio", "Train", "Val", "Name"])
        for label, name in enumerate(classes, start=1):
            writer.writerow([label, f"{pixels[label] / total:.6f}", int(stats["train"]["images_with"][label]),
                             int(stats["val"]["images_with"][label]), name])
    os.replace(tmp, path)


def build_scenes(output: str, cfg: SceneConfig = DEFAULT_SCENES, progress: bool = False) -> Dict:
    """Write the scenes into `output` in the ADE20K layout (images/{training,validation}/*.jpg,
    annotations/{training,validation}/*.png, objectInfo.csv) and the COCO layout (annotations/instances_{train,
    val}.json, {train,val}/*.jpg hard-linked to the former), then scenes.json; returns that manifest.

    Idempotent: an `output` whose scenes.json has the same config is returned as it is."""
    manifest_path = os.path.join(output, "scenes.json")
    config = asdict(cfg)
    if os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get("config") != config:
            raise ValueError(f"{output} holds scenes built with another config ({manifest.get('config')}); "
                             f"use another --output or delete it")
        return manifest
    if os.path.isdir(output) and os.listdir(output) and not os.path.exists(os.path.join(output, PARTIAL_MARKER)):
        raise ValueError(f"{output} is not empty and holds no scenes.json: build scenes into a new or empty directory")
    os.makedirs(os.path.join(output, "annotations"), exist_ok=True)
    open(os.path.join(output, PARTIAL_MARKER), "w").close()
    category_names = fashion_items(train=False)[2]
    classes = ["background"] + category_names
    stats = {split: _build_split(output, cfg, split, category_names, progress) for split in SPLITS}
    _write_object_info(os.path.join(output, "objectInfo.csv"), classes, stats)
    manifest = {
        "note": NOTE, "config": config,
        "counts": {split: {"images": getattr(cfg, split), "instances": stats[split]["instances"],
                           "dropped_small_instances": stats[split]["dropped"]} for split in SPLITS},
        "labels": "PNG value 0 = ignore (other / anti-aliased rims), 1 = background, c + 2 = Fashion-MNIST class c",
        "classes": classes, "categories": category_names,
        "layouts": {"ade20k": {"images": "images/{training,validation}", "annotations": "annotations/{training,"
                               "validation}", "object_info": "objectInfo.csv"},
                    "coco": {"images": "{train,val}", "annotations": "annotations/instances_{train,val}.json",
                             "category_ids": "Fashion-MNIST class + 1"}},
    }
    write_json_atomic(manifest_path, manifest)
    os.unlink(os.path.join(output, PARTIAL_MARKER))
    return manifest
