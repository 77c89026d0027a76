"""Datasets: Fashion-MNIST from the Debian package, ImageFolder directories, and a synthetic set.

`build_dataset(name, split, transform)` is the one entry point: `name` is 'fashion_mnist',
'synthetic', a shard directory, or a path to an ImageFolder tree: `<path>/train/<class>/*` and
`<path>/val/<class>/*` (both required once one exists), or `<path>/<class>/*` (class folders only: a set to
evaluate on, not to train). Class lists are compared by name (`check_classes`, `ClassesAs`).
"""
import gzip
import os
import shutil
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import Dataset
from torchvision import datasets as tvd

from ..errors import DatasetError
from .shards import ShardDataset, is_shard_dir

FASHION_MNIST_DIR = os.environ.get("LLAMAVIT_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")
FASHION_MNIST_INSTALL = "sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
CACHE_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "llamavit")


class FashionMNIST(tvd.FashionMNIST):
    """torchvision's Fashion-MNIST reading the gzip idx files of Debian's `dataset-fashion-mnist`.

    The .gz files are decompressed once into ~/.cache/llamavit (torchvision's reader takes raw idx
    files). Items are (PIL 'L' image 28x28, label).
    """

    def __init__(self, root: str = FASHION_MNIST_DIR, train: bool = True, transform: Optional[Callable] = None):
        self.source_dir = root
        missing = [f for f, _ in self.resources if not os.path.isfile(os.path.join(root, f))]
        if missing:
            raise DatasetError(f"Fashion-MNIST not found in {root} (missing {', '.join(missing)}); "
                               f"install it with: {FASHION_MNIST_INSTALL}  (or set LLAMAVIT_FASHION_MNIST)")
        self._extract()
        super().__init__(CACHE_DIR, train=train, transform=transform, download=False)

    @property
    def raw_folder(self) -> str:
        """Where torchvision's reader finds the decompressed idx files."""
        return os.path.join(CACHE_DIR, "FashionMNIST", "raw")

    def _extract(self) -> None:
        os.makedirs(self.raw_folder, exist_ok=True)
        for gz_name, _ in self.resources:
            target = os.path.join(self.raw_folder, gz_name[:-3])
            if os.path.isfile(target):
                continue
            tmp = f"{target}.tmp{os.getpid()}"
            with gzip.open(os.path.join(self.source_dir, gz_name), "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(tmp, target)


class SyntheticImages(Dataset):
    """A small learnable image set for tests: class c is a bright square at a class-specific place
    on seeded noise. Items are (PIL image, label); deterministic for a given seed."""

    def __init__(self, num_samples: int = 64, num_classes: int = 4, img_size: int = 32, in_chans: int = 3,
                 seed: int = 0, transform: Optional[Callable] = None):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(num_samples) % num_classes
        images = torch.rand(num_samples, in_chans, img_size, img_size, generator=g) * 0.3
        side = max(img_size // 4, 1)
        for i, c in enumerate(self.labels.tolist()):
            y = (c * side) % (img_size - side + 1)
            x = ((c * 2 + 1) * side) % (img_size - side + 1)
            images[i, :, y:y + side, x:x + side] = 1.0
        self.images = (images * 255).to(torch.uint8)
        self.classes: List[str] = [f"class_{c}" for c in range(num_classes)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        arr = self.images[index].permute(1, 2, 0).numpy()
        img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
        img = self.transform(img) if self.transform is not None else img
        return img, int(self.labels[index])


class Digits(Dataset):
    """scikit-learn's bundled handwritten digits (1,797 real 8x8 images, 17 grey levels, UCI; installed with
    scikit-learn, no download), a second real dataset for transfer. Split: every 4th item (index % 4 == 0) is 'val'
    (450 images), the rest 'train' (1,347); classes '0'..'9'. Items are (PIL 'L' image 8x8, label): the model's
    transform resizes them."""

    def __init__(self, train: bool = True, transform: Optional[Callable] = None):
        from sklearn.datasets import load_digits
        digits = load_digits()
        keep = [i for i in range(len(digits.target)) if (i % 4 != 0) == train]
        self.images = (torch.from_numpy(digits.images[keep]) * (255 / 16)).round().to(torch.uint8)
        self.labels = torch.from_numpy(digits.target[keep]).long()
        self.classes: List[str] = [str(d) for d in range(10)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index].numpy(), mode="L")
        return (self.transform(img) if self.transform is not None else img), int(self.labels[index])


def build_dataset(name: str, split: str = "train", transform: Optional[Callable] = None, **kwargs) -> Dataset:
    """Dataset by name or ImageFolder path; split 'train' or 'val' (Fashion-MNIST 'val' is its test set).

    Every returned dataset has a `classes` list of names.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if name == "fashion_mnist":
        return FashionMNIST(train=split == "train", transform=transform)
    if name == "digits":
        return Digits(train=split == "train", transform=transform)
    if is_shard_dir(name):
        return ShardDataset(name, split, transform, seed=kwargs.get("seed", 0), cycle=split == "train")
    if name == "synthetic":
        seed = kwargs.get("seed", 0) + (0 if split == "train" else 1)
        return SyntheticImages(num_samples=kwargs.get("num_samples", 64), num_classes=kwargs.get("num_classes", 4),
                               img_size=kwargs.get("img_size", 32), in_chans=kwargs.get("in_chans", 3), seed=seed,
                               transform=transform)
    if not os.path.isdir(name):
        known = "'fashion_mnist', 'digits', 'synthetic'"
        raise DatasetError(f"dataset {name!r} is neither {known} nor an existing directory")
    return image_folder(name, split, transform)


def has_splits(path: str) -> bool:
    """Whether an ImageFolder tree is split (holds train/ or val/), as opposed to class folders only."""
    return any(os.path.isdir(os.path.join(path, s)) for s in ("train", "val"))


def split_folder(path: str, split: str, kind: str, layout: str) -> str:
    """`<path>/<split>` of a split tree, or `path` itself when it has no split folders (a set to evaluate on). A
    split tree must hold the split asked for: no silent fallback (kind and layout name the tree in the error)."""
    if not has_splits(path):
        return path
    folder = os.path.join(path, split)
    if not os.path.isdir(folder):
        other = "val" if split == "train" else "train"
        raise DatasetError(f"{path} has {other}/ but no {split}/: {kind} for training holds {path}/train/{layout} "
                           f"and {path}/val/{layout} with the same classes")
    return folder


def image_folder(path: str, split: str, transform: Optional[Callable] = None) -> Dataset:
    """torchvision's ImageFolder of `<path>/<split>/<class>/*`, or of `<path>/<class>/*` when the tree has no
    split folders (a set to evaluate on). A split tree must hold the split asked for: no silent fallback."""
    root = split_folder(path, split, "an ImageFolder tree", "<class>/*")
    try:
        return tvd.ImageFolder(root, transform=transform, loader=load_rgb_or_fail)
    except (FileNotFoundError, RuntimeError) as e:
        raise DatasetError(f"cannot read image folder {root}: {e}") from e


def load_rgb_or_fail(path: str) -> Image.Image:
    """An ImageFolder file as an RGB PIL image; a file that is not a readable image stops the run naming it
    (silently skipping it would change the data without a word)."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:   # PIL raises all three for damaged files
        raise DatasetError(f"cannot read image {path}: {e}; remove or replace the file") from e


def check_classes(classes: Sequence[str], expected: Sequence[str], what: str) -> None:
    """Raise DatasetError unless `classes` are `expected` (names and order), naming what differs."""
    if list(classes) == list(expected):
        return
    missing, extra = sorted(set(expected) - set(classes)), sorted(set(classes) - set(expected))
    detail = "; ".join(p for p in (f"missing {missing}" if missing else "", f"unexpected {extra}" if extra else "")
                       if p) or f"another order: {list(classes)} vs {list(expected)}"
    raise DatasetError(f"{what} has other classes than expected ({detail})")


class ClassesAs(Dataset):
    """`dataset` with its labels renumbered to the order of `classes` (by name): a set that holds some of a
    model's classes, in its own order, evaluated with the model's indices. Unknown classes are refused."""

    def __init__(self, dataset: Dataset, classes: Sequence[str], what: str = "the dataset"):
        unknown = sorted(set(dataset.classes) - set(classes))
        if unknown:
            raise DatasetError(f"{what} has classes the model does not know: {unknown} (the model's: {list(classes)})")
        self.dataset, self.classes = dataset, list(classes)
        self.index = [self.classes.index(c) for c in dataset.classes]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, label = self.dataset[i]
        return image, self.index[label]


def is_latents_file(data: str) -> bool:
    """Whether `data` names a latents file (.pt / .pth / .safetensors) rather than a dataset."""
    return data.endswith((".pt", ".pth", ".safetensors")) and os.path.isfile(data)


def read_latents(path: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(latents (N, C, H, W) float32, labels (N,) long) from a .pt or .safetensors file holding both
    (e.g. VAE latents * 0.18215 for a latent diffusion model)."""
    obj = load_file(path) if path.endswith(".safetensors") else torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict) or "latents" not in obj or "labels" not in obj:
        raise ValueError(f"{path} must hold a dict with 'latents' (N, C, H, W) and 'labels' (N,)")
    latents, labels = obj["latents"].float(), obj["labels"].long()
    if latents.ndim != 4 or len(labels) != len(latents):
        raise ValueError(f"{path}: latents {tuple(latents.shape)} and labels {tuple(labels.shape)} do not match")
    return latents, labels
