"""Clip datasets for action recognition: items are (FloatTensor (C, T, H, W), label), normalised; every set has
`classes`, and `mean` / `std` (per channel) to undo the normalisation.

- `MovingFashionMNIST`: one Fashion-MNIST item moving across a black canvas; the CLASS IS THE MOTION (4 directions
  x 2 speeds), the item's appearance a distractor. A single frame shows an item at some place: direction and speed
  need two frames (a frame's position only narrows the class: an item at the right edge is not about to move right).
- `ClipFolder`: frame-folder trees, `<root>/<split>/<class>/<clip>/<frames>` (Something-Something / UCF101 dumps).
- `SyntheticClips`: a bright square moving in a class-specific direction, for tests.

`build_clip_dataset(name, ...)` is the entry point; `write_clip_folder` writes any clip set as a frame-folder tree.
"""
import math
import os
import re
import shutil
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset

from ..errors import DatasetError
from .datasets import (FASHION_MNIST_DIR, FASHION_MNIST_MEAN, FASHION_MNIST_STD, FashionMNIST,
                       load_rgb_or_fail, split_folder)
from .seeding import mix_seed

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
GRAY_MEAN, GRAY_STD = (0.5,), (0.5,)
DIRECTIONS = (("right", (0.0, 1.0)), ("left", (0.0, -1.0)), ("down", (1.0, 0.0)), ("up", (-1.0, 0.0)))  # (dy, dx)
SPEEDS = (("slow", 1 / 3), ("fast", 2 / 3))   # the share of the free span (canvas - item) a clip travels
_LAST_NUMBER = re.compile(r"(\d+)\D*$")


def _normalise(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(C, T, H, W) in [0, 1] -> (pixels - mean) / std per channel."""
    shape = (-1, 1, 1, 1)
    return (pixels - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)


def _check_chans(in_chans: int) -> None:
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 (grayscale) or 3 (RGB), got {in_chans}")


class MovingFashionMNIST(Dataset):
    """Moving Fashion-MNIST: clip i shows one item (downscaled to item_size, default img_size // 2) moving in a
    straight line across a black img_size canvas, with the velocity of class i % 8: right, left, down, up, each slow
    (a third of the free span img_size - item_size over the clip) or fast (two thirds). The start is uniform over
    the places that keep the whole path on the canvas; positions are sub-pixel (a bilinear split over the four
    pixel-aligned placements, which keeps the centre of mass exact).

    Size: num_clips (default the split's items: 60,000 train, 10,000 val = Fashion-MNIST's test set). Eval clips
    (redraw False) are fixed: clip i shows item i, its start drawn from a generator seeded by (seed, i). With
    redraw (default: the train split) item and start come from the GLOBAL torch generator at each access, so
    every epoch sees new clips (the step loop seeds it per (seed, epoch, index): exact resume).
    Items: (FloatTensor (in_chans, num_frames, img_size, img_size), label), normalised with Fashion-MNIST's mean / std.
    """

    def __init__(self, train: bool = True, num_frames: int = 8, img_size: int = 28, in_chans: int = 1,
                 item_size: Optional[int] = None, num_clips: Optional[int] = None, redraw: Optional[bool] = None,
                 seed: int = 0, root: str = FASHION_MNIST_DIR):
        _check_chans(in_chans)
        item_size = item_size or img_size // 2
        if not 0 < item_size < img_size:
            raise ValueError(f"item_size must be in [1, img_size={img_size}) so the item can move, got {item_size}")
        if num_frames < 2:
            raise ValueError(f"num_frames must be >= 2 (a motion needs two frames), got {num_frames}")
        source = FashionMNIST(root, train=train)
        items = source.data[:, None].float() / 255.0
        if item_size != items.shape[-1]:
            items = F.interpolate(items, size=(item_size, item_size), mode="bilinear", antialias=True,
                                  align_corners=False).clamp(0.0, 1.0)
        self.items = items[:, 0]                                     # (N, item_size, item_size) in [0, 1]
        self.num_frames, self.img_size, self.in_chans, self.item_size = num_frames, img_size, in_chans, item_size
        self.num_clips = len(self.items) if num_clips is None else num_clips
        self.redraw = train if redraw is None else redraw
        self.seed = seed
        self.classes: List[str] = [f"{d}_{s}" for d, _ in DIRECTIONS for s, _ in SPEEDS]
        span = img_size - item_size
        # (num_classes, 2): (dy, dx) in pixels per frame
        self.velocities = torch.tensor([[u * share * span / (num_frames - 1) for u in unit]
                                        for _, unit in DIRECTIONS for _, share in SPEEDS])
        self.mean, self.std = FASHION_MNIST_MEAN * in_chans, FASHION_MNIST_STD * in_chans

    def __len__(self) -> int:
        return self.num_clips

    def start_range(self, label: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(low, high) (2,) of the start (y, x) that keeps all of class `label`'s path on the canvas."""
        span = float(self.img_size - self.item_size)
        travel = self.velocities[label] * (self.num_frames - 1)
        return (-travel).clamp(min=0.0), (span - travel).clamp(max=span)

    def positions(self, label: int, start: torch.Tensor) -> torch.Tensor:
        """(num_frames, 2): the item's top-left corner (y, x) in each frame."""
        return start + torch.arange(self.num_frames, dtype=torch.float32)[:, None] * self.velocities[label]

    def render(self, item: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """item (s, s) in [0, 1] at positions (T, 2) -> frames (T, img_size, img_size) in [0, 1]."""
        s, span = self.item_size, self.img_size - self.item_size
        frames = torch.zeros(len(positions), self.img_size, self.img_size)
        for t, (y, x) in enumerate(positions.clamp(0.0, span).tolist()):
            y0, x0 = math.floor(y), math.floor(x)
            fy, fx = y - y0, x - x0
            for dy, wy in ((0, 1.0 - fy), (1, fy)):
                for dx, wx in ((0, 1.0 - fx), (1, fx)):
                    if wy * wx > 1e-6:   # a zero weight may sit one pixel past the canvas: skip it
                        frames[t, y0 + dy:y0 + dy + s, x0 + dx:x0 + dx + s] += wy * wx * item
        return frames

    def __getitem__(self, index: int):
        label = index % len(self.classes)
        if self.redraw:
            generator, item_index = None, int(torch.randint(len(self.items), ()))
        else:
            generator, item_index = torch.Generator().manual_seed(mix_seed(self.seed, index)), index % len(self.items)
        low, high = self.start_range(label)
        start = low + torch.rand(2, generator=generator) * (high - low)
        frames = self.render(self.items[item_index], self.positions(label, start))
        pixels = frames[None].expand(self.in_chans, -1, -1, -1)
        return _normalise(pixels, self.mean, self.std), label


class SyntheticClips(Dataset):
    """A small learnable clip set for tests: a bright square (side img_size // 4) on seeded noise moving in the
    direction of its class (class c: angle 2 pi c / num_classes) across half the free span. Deterministic for a
    seed. Items: (FloatTensor (in_chans, num_frames, img_size, img_size), label), normalised with 0.5 / 0.5."""

    def __init__(self, num_samples: int = 64, num_classes: int = 4, num_frames: int = 8, img_size: int = 16,
                 in_chans: int = 3, seed: int = 0):
        _check_chans(in_chans)
        g = torch.Generator().manual_seed(seed)
        side = max(img_size // 4, 1)
        span = img_size - side
        self.labels = torch.arange(num_samples) % num_classes
        pixels = torch.rand(num_samples, in_chans, num_frames, img_size, img_size, generator=g) * 0.3
        steps = torch.linspace(-0.5, 0.5, num_frames)[:, None]
        for i, c in enumerate(self.labels.tolist()):
            angle = 2 * math.pi * c / num_classes
            travel = torch.tensor([math.sin(angle), math.cos(angle)]) * span / 2
            slack = (span - travel.abs()) / 2
            centre = span / 2 + (torch.rand(2, generator=g) * 2 - 1) * slack
            for t, (y, x) in enumerate((centre + steps * travel).round().long().tolist()):
                pixels[i, :, t, y:y + side, x:x + side] = 1.0
        self.pixels = pixels
        self.classes: List[str] = [f"class_{c}" for c in range(num_classes)]
        self.mean, self.std = GRAY_MEAN * in_chans, GRAY_STD * in_chans

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return _normalise(self.pixels[index], self.mean, self.std), int(self.labels[index])


def frame_indices(length: int, num_frames: int, offset: float = 0.5) -> List[int]:
    """num_frames indices uniformly spaced over a clip of `length` frames: frame floor((k + offset) * length /
    num_frames) of segment k; offset in [0, 1) (0.5: each segment's centre)."""
    return [min(int((k + offset) * length / num_frames), length - 1) for k in range(num_frames)]


def clip_frames(clip_dir: str, num_frames: int) -> List[str]:
    """The frame files of a clip folder sorted by the number in their names ('frame_9.png' before 'frame_10.png').
    One DatasetError line for an empty folder, a file that is not a frame image, a name without a number, a
    repeated or missing frame number (the numbers must be consecutive), or fewer than num_frames frames.
    Dot-files (.DS_Store) are ignored."""
    names = sorted(n for n in os.listdir(clip_dir) if not n.startswith("."))
    if not names:
        raise DatasetError(f"{clip_dir}: empty clip folder (a clip folder holds its frames, e.g. 000001.jpg ...)")
    by_number = {}
    for name in names:
        path = os.path.join(clip_dir, name)
        stem, ext = os.path.splitext(name)
        if os.path.isdir(path) or ext.lower() not in IMAGE_EXTENSIONS:
            raise DatasetError(f"{path}: not a frame image (a clip folder holds only {'/'.join(IMAGE_EXTENSIONS)} "
                               f"frames); remove it")
        match = _LAST_NUMBER.search(stem)
        if match is None:
            raise DatasetError(f"{path}: the frame's name carries no frame number (e.g. 000001.jpg, frame_0007.png)")
        number = int(match.group(1))
        if number in by_number:
            raise DatasetError(f"{clip_dir}: frame {number} appears twice ({by_number[number]} and {name})")
        by_number[number] = name
    first, last = min(by_number), max(by_number)
    if len(by_number) != last - first + 1:
        missing = next(k for k in range(first, last + 1) if k not in by_number)
        raise DatasetError(f"{clip_dir}: frame {missing} is missing (frames {first}-{last} expected to be "
                           f"consecutive)")
    if len(by_number) < num_frames:
        raise DatasetError(f"{clip_dir}: {len(by_number)} frames, fewer than num_frames={num_frames}; lower "
                           f"num_frames or remove the clip")
    return [os.path.join(clip_dir, by_number[k]) for k in sorted(by_number)]


def _clip_folders(class_dir: str) -> List[str]:
    """Sorted clip folder names of a class folder; a plain (non-dot) file there is refused, naming it."""
    names = sorted(n for n in os.listdir(class_dir) if not n.startswith("."))
    files = [n for n in names if not os.path.isdir(os.path.join(class_dir, n))]
    if files:
        raise DatasetError(f"{os.path.join(class_dir, files[0])}: a file where a clip folder is expected (a clip "
                           f"tree is <root>/<split>/<class>/<clip>/<frames>)")
    return names


class ClipFolder(Dataset):
    """Frame-folder clips: `<root>/<split>/<class>/<clip>/<frames>`, or `<root>/<class>/<clip>/<frames>` (class
    folders only: a set to evaluate on, as with image folders). A split tree must hold the split asked for.
    Every clip is checked when the set is built (`clip_frames`); an unreadable frame stops the run when read.

    Sampling: num_frames frames uniformly spaced over the clip (`frame_indices`): train, a random offset from
    the global torch generator; eval, each segment's centre. Frames are resized to img_size x img_size (bilinear;
    the aspect ratio is not kept), converted to L (in_chans 1) or RGB (3) and normalised: ImageNet's mean / std
    for RGB, 0.5 / 0.5 for grayscale. Items: (FloatTensor (in_chans, num_frames, img_size, img_size), label)."""

    def __init__(self, root: str, split: str = "train", num_frames: int = 8, img_size: int = 28, in_chans: int = 3,
                 train: bool = False):
        _check_chans(in_chans)
        base = split_folder(root, split, "a clip folder tree", "<class>/<clip>/*")
        # other files beside the class folders (a labels.csv) are left alone, as image folders do
        self.classes: List[str] = sorted(n for n in os.listdir(base)
                                         if not n.startswith(".") and os.path.isdir(os.path.join(base, n)))
        if not self.classes:
            raise DatasetError(f"{base} holds no class folders (a clip tree is <root>/<split>/<class>/<clip>/<frames>)")
        self.clips: List[Tuple[List[str], int]] = []
        for label, name in enumerate(self.classes):
            class_dir = os.path.join(base, name)
            clips = _clip_folders(class_dir)
            if not clips:
                raise DatasetError(f"{class_dir}: class folder without clips (<class>/<clip>/<frames>)")
            self.clips += [(clip_frames(os.path.join(class_dir, c), num_frames), label) for c in clips]
        self.root, self.num_frames, self.img_size = base, num_frames, img_size
        self.in_chans, self.train = in_chans, train
        self.mean, self.std = (GRAY_MEAN, GRAY_STD) if in_chans == 1 else (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
        self.targets = [label for _, label in self.clips]

    def __len__(self) -> int:
        return len(self.clips)

    def load_frame(self, path: str) -> torch.Tensor:
        """One frame file -> (in_chans, img_size, img_size) in [0, 1]."""
        image = load_rgb_or_fail(path)
        image = image.convert("L") if self.in_chans == 1 else image
        if image.size != (self.img_size, self.img_size):
            image = image.resize((self.img_size, self.img_size), Image.BILINEAR)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
        return pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1)

    def __getitem__(self, index: int):
        frames, label = self.clips[index]
        offset = float(torch.rand(())) if self.train else 0.5
        pixels = torch.stack([self.load_frame(frames[k]) for k in frame_indices(len(frames), self.num_frames, offset)],
                             dim=1)
        return _normalise(pixels, self.mean, self.std), label


def build_clip_dataset(name: str, split: str = "train", num_frames: int = 8, img_size: int = 28, in_chans: int = 1,
                       train: bool = False, seed: int = 0) -> Dataset:
    """Clip dataset by name: 'fashion_mnist' (MovingFashionMNIST on the split's items; `train` draws new clips at
    each access), 'synthetic' (SyntheticClips, 4 classes: 64 train / 32 val clips) or a ClipFolder directory.
    split 'train' or 'val'. Items: (FloatTensor (in_chans, num_frames, img_size, img_size), label); `.classes`."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if name == "fashion_mnist":
        return MovingFashionMNIST(split == "train", num_frames, img_size, in_chans, redraw=train, seed=seed)
    if name == "synthetic":
        return SyntheticClips(64 if split == "train" else 32, 4, num_frames, img_size, in_chans,
                              seed=seed + (0 if split == "train" else 1))
    if not os.path.isdir(name):
        raise DatasetError(f"clip dataset {name!r} is neither 'fashion_mnist', 'synthetic' nor an existing directory")
    return ClipFolder(name, split, num_frames, img_size, in_chans, train)


def write_clip_folder(dataset: Dataset, root: str, split: str = "train", count: Optional[int] = None) -> str:
    """Write the first `count` (default: all) clips of a clip dataset (with `classes`, `mean`, `std`) as
    `<root>/<split>/<class>/clip_<i>/<000001.png ...>`, 8-bit PNG frames; -> the split folder. A clip folder
    already there is replaced."""
    if not all(hasattr(dataset, a) for a in ("classes", "mean", "std")):
        raise ValueError(f"{type(dataset).__name__} has no classes / mean / std: not a clip dataset of this module")
    split_dir = os.path.join(root, split)
    for i in range(len(dataset) if count is None else min(count, len(dataset))):
        clip, label = dataset[i]
        shape = (-1, 1, 1, 1)
        pixels = clip * torch.tensor(dataset.std).view(shape) + torch.tensor(dataset.mean).view(shape)
        pixels = (pixels.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)    # (C, T, H, W)
        folder = os.path.join(split_dir, dataset.classes[label], f"clip_{i:06d}")
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        for t in range(pixels.shape[1]):
            frame = pixels[:, t].permute(1, 2, 0).numpy()
            Image.fromarray(frame[..., 0] if frame.shape[-1] == 1 else frame).save(
                os.path.join(folder, f"{t + 1:06d}.png"))
    return split_dir
