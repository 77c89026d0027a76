"""Readers for dense prediction data: semantic segmentation in the ADE20K layout, detection / instance
segmentation in the COCO layout, their joint transforms (torchvision.transforms.v2) and batching.

ADE20K (as ADEChallengeData2016): `root/images/{training,validation}/*.jpg|png` paired by file stem with
`root/annotations/{training,validation}/*.png` (one uint8 label per pixel, 0 = other / ignore), class names
in `root/objectInfo*.csv` (or the release's tab-separated objectInfo150.txt). COCO:
`root/annotations/instances_{split}.json` with images in `root/{split}/` (also `instances_train2017.json`
with `train2017/`). Split names 'train' / 'training' and 'val' / 'validation' are the same split.
"""
import contextlib
import csv
import glob
import io
import json
import os
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..errors import DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
IGNORE_INDEX = 255
ADE20K_SPLITS = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}
COCO_SPLITS = {"train": "train", "training": "train", "val": "val", "validation": "val"}
COCO_KEYS = ("images", "annotations", "categories")


def _split(split: str, names: Dict[str, str]) -> str:
    if split not in names:
        raise ValueError(f"split must be 'train' / 'training' or 'val' / 'validation', got {split!r}")
    return names[split]


def _has_ade20k(root: str) -> bool:
    return any(os.path.isdir(os.path.join(root, "images", s)) and os.path.isdir(os.path.join(root, "annotations", s))
               for s in ("training", "validation"))


def _has_coco(root: str) -> bool:
    return bool(glob.glob(os.path.join(glob.escape(root), "annotations", "instances_*.json")))


def detect_layout(root: str, task: str) -> str:
    """'ade20k' or 'coco' for the data under `root`; with both, task 'segment' takes ade20k, 'detect' coco."""
    if task not in ("segment", "detect"):
        raise ValueError(f"task must be 'segment' or 'detect', got {task!r}")
    ade, coco = _has_ade20k(root), _has_coco(root)
    if ade and coco:
        return "ade20k" if task == "segment" else "coco"
    if ade or coco:
        return "ade20k" if ade else "coco"
    raise DatasetError(f"{root} holds neither the ADE20K layout (images/training|validation with "
                       f"annotations/training|validation) nor the COCO layout (annotations/instances_*.json)")


def _read_rgb(path: str) -> Image.Image:
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        raise DatasetError(f"cannot read image {path}: {e}; remove or replace the file") from e


def _wrap_image(img: Image.Image) -> tv_tensors.Image:
    return tv_tensors.Image(torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous())


def _plain(x):
    """A tv_tensor back to a plain tensor (what a model and a collate function expect)."""
    return x.as_subclass(torch.Tensor) if isinstance(x, torch.Tensor) else x


def read_object_info(root: str) -> Optional[List[str]]:
    """Class names (label 1..K in Idx order) from root/objectInfo*.csv (or objectInfo*.txt, tab-separated as
    in ADEChallengeData2016), None when there is none."""
    paths = sorted(glob.glob(os.path.join(glob.escape(root), "objectInfo*.csv")))
    paths = paths or sorted(glob.glob(os.path.join(glob.escape(root), "objectInfo*.txt")))
    if not paths:
        return None
    with open(paths[0], newline="") as f:
        rows = list(csv.DictReader(f, delimiter="," if paths[0].endswith(".csv") else "\t"))
    if not rows or not {"Idx", "Name"} <= set(rows[0]):
        raise DatasetError(f"{paths[0]} has no Idx and Name columns (expected objectInfo150.csv's Idx,Ratio,Train,"
                           f"Val,Name)")
    try:
        by_idx = sorted((int(r["Idx"]), r["Name"].strip()) for r in rows)
    except (TypeError, ValueError) as e:
        raise DatasetError(f"{paths[0]}: an Idx that is not an integer ({e})") from e
    if [i for i, _ in by_idx] != list(range(1, len(by_idx) + 1)):
        raise DatasetError(f"{paths[0]}: Idx must run 1..{len(by_idx)} without gaps")
    return [name for _, name in by_idx]


class ADE20KSegmentation(Dataset):
    """Image / label-map pairs of `root/images/<split>` and `root/annotations/<split>`.

    `classes` come from objectInfo*.csv; without it pass `num_classes` (K: labels 1..K are classes, named
    class_1..class_K). With `reduce_zero_label` (the ADE20K convention, as mmseg) label 0 becomes 255
    (ignore) and l becomes l - 1: classes index the K names. Without it the mask is returned as stored and
    label 0 is a class too: classes = ['other'] + the K names. 255 is ignore either way. Items:
    (image float (3, H, W) after `transform(image, mask)`, mask int64 (H, W)).
    """

    def __init__(self, root: str, split: str, transform=None, reduce_zero_label: bool = True,
                 num_classes: Optional[int] = None):
        folder = _split(split, ADE20K_SPLITS)
        image_dir, ann_dir = (os.path.join(root, d, folder) for d in ("images", "annotations"))
        for d in (image_dir, ann_dir):
            if not os.path.isdir(d):
                raise DatasetError(f"{d} not found: the ADE20K layout holds root/images/{folder}/*.jpg and "
                                   f"root/annotations/{folder}/*.png")
        names = read_object_info(root)
        if names is None and num_classes is None:
            raise DatasetError(f"{root} has no objectInfo*.csv naming the classes: pass num_classes")
        if names is not None and num_classes is not None and num_classes != len(names):
            raise DatasetError(f"num_classes={num_classes} but {root}'s objectInfo names {len(names)} classes")
        names = names if names is not None else [f"class_{i}" for i in range(1, num_classes + 1)]
        self.num_labels = len(names)                      # K: stored labels 1..K
        self.classes = names if reduce_zero_label else ["other"] + names
        self.reduce_zero_label, self.transform = reduce_zero_label, transform
        images = sorted(f for f in os.listdir(image_dir) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not images:
            raise DatasetError(f"{image_dir} holds no images (.jpg, .jpeg, .png)")
        self.samples = []
        for name in images:
            ann = os.path.join(ann_dir, os.path.splitext(name)[0] + ".png")
            if not os.path.isfile(ann):
                raise DatasetError(f"image {os.path.join(image_dir, name)} has no annotation {ann}")
            self.samples.append((os.path.join(image_dir, name), ann))

    def __len__(self) -> int:
        return len(self.samples)

    def read_mask(self, index: int, size: Tuple[int, int]) -> torch.Tensor:
        """The stored label map of item `index`, checked against the image size (W, H) and K -> uint8 (H, W)."""
        path = self.samples[index][1]
        try:
            with Image.open(path) as m:
                if m.mode not in ("L", "P"):
                    raise DatasetError(f"annotation {path} is a {m.mode} image; expected one uint8 label per pixel "
                                       f"(PNG mode L or P)")
                mask = np.array(m, dtype=np.uint8)
        except OSError as e:
            raise DatasetError(f"cannot read annotation {path}: {e}") from e
        if mask.shape[::-1] != size:
            raise DatasetError(f"annotation {path} is {mask.shape[1]}x{mask.shape[0]} but its image is "
                               f"{size[0]}x{size[1]}")
        bad = mask[(mask > self.num_labels) & (mask != IGNORE_INDEX)]
        if bad.size:
            raise DatasetError(f"annotation {path} has label {int(bad.max())} above K={self.num_labels} "
                               f"(labels are 0..K, 255 = ignore)")
        return torch.from_numpy(mask)

    def __getitem__(self, index: int):
        img = _read_rgb(self.samples[index][0])
        mask = self.read_mask(index, img.size)
        if self.reduce_zero_label:
            mask = torch.where((mask == 0) | (mask == IGNORE_INDEX), IGNORE_INDEX, mask - 1)
        image, mask = _wrap_image(img), tv_tensors.Mask(mask.to(torch.uint8))
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        else:
            image = image.float() / 255.0
        return _plain(image), _plain(mask).long()


def _coco_files(root: str, split: str) -> Tuple[str, str]:
    """(annotation file, image folder): instances_{split}.json with {split}/, else instances_{split}YYYY.json
    with {split}YYYY/ (the official COCO names)."""
    name = _split(split, COCO_SPLITS)
    ann_dir = os.path.join(root, "annotations")
    path = os.path.join(ann_dir, f"instances_{name}.json")
    if os.path.isfile(path):
        return path, os.path.join(root, name)
    dated = sorted(glob.glob(os.path.join(glob.escape(ann_dir), f"instances_{name}[0-9][0-9][0-9][0-9].json")))
    if dated:
        stem = os.path.basename(dated[-1])[len("instances_"):-len(".json")]
        return dated[-1], os.path.join(root, stem)
    raise DatasetError(f"{path} not found: the COCO layout holds root/annotations/instances_{name}.json with the "
                       f"images in root/{name}/")


def read_coco_json(path: str) -> Dict:
    """The COCO dict of `path`, refused in one line when empty, not JSON, or missing a COCO key."""
    with open(path) as f:
        text = f.read()
    if not text.strip():
        raise DatasetError(f"{path} is empty; expected COCO instances JSON with {', '.join(COCO_KEYS)}")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not JSON ({e}); expected COCO instances JSON") from e
    if not isinstance(data, dict):
        raise DatasetError(f"{path} holds a JSON {type(data).__name__}, not COCO instances JSON (an object with "
                           f"{', '.join(COCO_KEYS)})")
    missing = [k for k in COCO_KEYS if k not in data]
    if missing:
        raise DatasetError(f"{path} is not COCO instances JSON: missing key {missing[0]!r}")
    return data


def _segmentation_mask(segm, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) -> uint8 (H, W)."""
    if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    elif isinstance(segm.get("counts"), list):
        rle = mask_utils.frPyObjects(segm, height, width)
    else:
        rle = segm
    with warnings.catch_warnings():    # pycocotools' decoder trips numpy 2's copy=False deprecation on every call
        warnings.filterwarnings("ignore", message="__array__ implementation doesn't accept a copy keyword")
        mask = mask_utils.decode(rle)
    if mask.shape != (height, width):
        raise DatasetError(f"an RLE segmentation of size {list(mask.shape)} on an image of {height}x{width} (h x w)")
    return mask


class CocoDetection(Dataset):
    """Images with their instances from a COCO instances file (pycocotools). Categories become labels 1..C in
    the order of their ids (0 = background, as torchvision detectors expect); `classes[l - 1]` names label l.
    iscrowd instances are skipped, boxes without area dropped; images without instances stay.

    Items: (image float (3, H, W) after `transform(image, target)`, target {"boxes": float32 (N, 4) xyxy
    pixels, "labels": int64 (N,), "masks": uint8 (N, H, W), "image_id": int}).
    """

    def __init__(self, root: str, split: str, transform=None):
        path, self.image_dir = _coco_files(root, split)
        data = read_coco_json(path)
        if not os.path.isdir(self.image_dir):
            raise DatasetError(f"{self.image_dir} not found: the images of {path} belong there")
        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):
            self.coco.createIndex()
        cat_ids = sorted(self.coco.cats)
        self.label_of = {c: i + 1 for i, c in enumerate(cat_ids)}
        self.classes = [self.coco.cats[c]["name"] for c in cat_ids]
        self.ids = sorted(self.coco.imgs)
        missing = [self.coco.imgs[i]["file_name"] for i in self.ids
                   if not os.path.isfile(os.path.join(self.image_dir, self.coco.imgs[i]["file_name"]))]
        if missing:
            raise DatasetError(f"image {os.path.join(self.image_dir, missing[0])} listed in {path} is missing "
                               f"({len(missing)} of {len(self.ids)} missing)")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.ids)

    def read_target(self, image_id: int, height: int, width: int) -> Dict:
        """The instances of `image_id` as tv_tensors: boxes xyxy clamped to the image, labels, masks."""
        anns = [a for a in self.coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        anns = [a for a, k in zip(anns, keep.tolist()) if k]
        boxes, masks = boxes[keep], np.zeros((len(anns), height, width), dtype=np.uint8)
        for i, a in enumerate(anns):
            if a.get("segmentation"):
                masks[i] = _segmentation_mask(a["segmentation"], height, width)
            else:                               # a box-only annotation: its mask is the box
                x0, y0, x1, y1 = boxes[i].tolist()
                masks[i, int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = 1
        unknown = [a["category_id"] for a in anns if a["category_id"] not in self.label_of]
        if unknown:
            raise DatasetError(f"image {image_id} has an annotation of category {unknown[0]}, which is not among the "
                               f"categories {sorted(self.label_of)}")
        return {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
                "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64),
                "masks": tv_tensors.Mask(torch.from_numpy(masks)), "image_id": image_id}

    def read_item(self, index: int) -> Tuple[Image.Image, Dict]:
        """(the image of item `index`, checked against the annotation file's size, its target)."""
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        path = os.path.join(self.image_dir, info["file_name"])
        img = _read_rgb(path)
        if (img.width, img.height) != (info.get("width", img.width), info.get("height", img.height)):
            raise DatasetError(f"image {path} is {img.width}x{img.height} but its annotation file says "
                               f"{info['width']}x{info['height']}")
        return img, self.read_target(image_id, img.height, img.width)

    def __getitem__(self, index: int):
        img, target = self.read_item(index)
        image = _wrap_image(img)
        if self.transform is not None:
            image, target = self.transform(image, target)
        else:
            image = image.float() / 255.0
        return _plain(image), {k: _plain(v) for k, v in target.items()}


class CocoSemantic(CocoDetection):
    """COCO instances as semantic label maps, for segmentation on COCO-layout data: 0 = background, label l where
    an instance of category l lies (larger instances painted first, so smaller ones stay visible: COCO records no
    occlusion order). `classes` = ['background'] + the categories. Items: (image float (3, H, W) after
    `transform(image, mask)`, mask int64 (H, W))."""

    def __init__(self, root: str, split: str, transform=None):
        super().__init__(root, split, transform)
        self.classes = ["background"] + self.classes

    def __getitem__(self, index: int):
        img, target = self.read_item(index)
        masks, labels = target["masks"].as_subclass(torch.Tensor), target["labels"]
        semantic = torch.zeros(masks.shape[-2:], dtype=torch.uint8)
        for i in masks.flatten(1).sum(1).argsort(descending=True).tolist():
            semantic[masks[i] > 0] = int(labels[i])
        image, mask = _wrap_image(img), tv_tensors.Mask(semantic)
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        else:
            image = image.float() / 255.0
        return _plain(image), _plain(mask).long()


@dataclass
class DenseTransformConfig:
    """Joint image / mask / box transforms: crop (and eval) size, random resize range of the short side as
    ratios of img_size, flip probability, photometric distortion, normalisation (None: ImageNet's)."""
    img_size: int = 96
    scale_range: Tuple[float, float] = (0.5, 2.0)
    hflip: float = 0.5
    photometric: bool = True
    mean: Optional[Sequence[float]] = None
    std: Optional[Sequence[float]] = None

    def __post_init__(self):
        if self.img_size < 1:
            raise ValueError(f"img_size must be >= 1, got {self.img_size}")
        if not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {tuple(self.scale_range)}")
        if not 0 <= self.hflip <= 1:
            raise ValueError(f"hflip is a probability in [0, 1], got {self.hflip}")


def build_dense_transform(cfg: DenseTransformConfig, train: bool, task: str) -> v2.Compose:
    """Called as t(image, mask) for task 'segment', t(image, target) for 'detect' (tv_tensors in, out).

    Train: the short side resized to a random size in img_size * scale_range, a random img_size crop (padded
    where smaller: image 0, segmentation mask 255, instance masks 0), flip, photometric distortion (as mmseg's
    PhotoMetricDistortion), float, Normalize; for 'detect' boxes that left the crop are dropped with their
    labels and masks. Eval: the short side resized to img_size, float, Normalize (no crop). Randomness comes
    from torch's global generator only."""
    if task not in ("segment", "detect"):
        raise ValueError(f"task must be 'segment' or 'detect', got {task!r}")
    mean = tuple(cfg.mean) if cfg.mean is not None else IMAGENET_DEFAULT_MEAN
    std = tuple(cfg.std) if cfg.std is not None else IMAGENET_DEFAULT_STD
    finish = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if not train:
        return v2.Compose([v2.Resize(cfg.img_size)] + finish)
    low, high = (max(1, int(round(cfg.img_size * r))) for r in cfg.scale_range)
    fill = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX if task == "segment" else 0}
    steps = [v2.RandomResize(low, high + 1), v2.RandomCrop(cfg.img_size, pad_if_needed=True, fill=fill),
             v2.RandomHorizontalFlip(cfg.hflip)]
    if cfg.photometric:
        steps.append(v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05))
    steps += finish
    if task == "detect":
        steps.append(v2.SanitizeBoundingBoxes())
    return v2.Compose(steps)


def _same_size(images: Sequence[torch.Tensor]) -> None:
    sizes = sorted({tuple(im.shape[-2:]) for im in images})
    if len(sizes) > 1:
        raise ValueError(f"images of one batch have different sizes {sizes}: train crops to one size; evaluate "
                         f"with batch size 1 or equal-size images")


def collate_segmentation(batch) -> Tuple[torch.Tensor, torch.Tensor]:
    """[(image (3, H, W), mask (H, W))] -> (images (B, 3, H, W), masks (B, H, W) int64); sizes must match."""
    _same_size([im for im, _ in batch])
    return torch.stack([im for im, _ in batch]), torch.stack([m.long() for _, m in batch])


def collate_detection(batch) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """[(image (3, H, W), target)] -> (images (B, 3, H, W), boxes (B, M, 4) float32, labels (B, M) int64 padded
    with -1, masks (B, M, H, W) uint8 padded with 0), M = the most instances in the batch (>= 1): every
    tensor splits along dim 0. Image sizes must match (one-line ValueError otherwise)."""
    images = [im for im, _ in batch]
    _same_size(images)
    (h, w), b = images[0].shape[-2:], len(batch)
    m = max([1] + [len(t["labels"]) for _, t in batch])
    boxes, labels = torch.zeros(b, m, 4), torch.full((b, m), -1, dtype=torch.int64)
    masks = torch.zeros(b, m, h, w, dtype=torch.uint8)
    for i, (_, t) in enumerate(batch):
        n = len(t["labels"])
        boxes[i, :n], labels[i, :n] = t["boxes"].float(), t["labels"].long()
        if "masks" in t:
            masks[i, :n] = t["masks"].to(torch.uint8)
    return torch.stack(images), boxes, labels, masks

