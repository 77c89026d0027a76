"""Point-cloud datasets: point files, class-folder trees of them, Fashion-MNIST as point clouds, a synthetic set.

Every item is (points (num_points, in_chans) float32 tensor, label): columns x, y, z, then features (normals,
intensity, ...). `build_point_dataset(name, split, num_points, in_chans, train)` is the one entry point; `name` is
'fashion_mnist', 'synthetic' or a folder `<path>/train/<class>/*.npy|.txt|.csv|.xyz|.ply` and
`<path>/val/<class>/*` (or `<path>/<class>/*`: a set to evaluate on), the image folders' convention.

Training items (train=True) draw their sampling and augmentation from torch's global generator, which the step
loop seeds per (seed, epoch, index) (SeededAugmentation): a resumed run sees the same clouds. Evaluation items are
sampled with a generator seeded by the item's index and are not augmented: the same cloud on every call.
"""
import io
import os
from typing import List, Optional, Tuple

import numpy as np
import torch
from plyfile import PlyData, PlyListProperty, PlyParseError
from torch.utils.data import Dataset

from ..errors import DatasetError
from .datasets import FASHION_MNIST_DIR, FashionMNIST, split_folder

POINT_EXTENSIONS = (".npy", ".txt", ".csv", ".xyz", ".ply")
TEXT_EXTENSIONS = (".txt", ".csv", ".xyz")
NEEDS_XYZ = "a point file needs at least 3 (x y z [features...])"
SCALE_RANGE, SHIFT_RANGE = (2 / 3, 3 / 2), (-0.2, 0.2)   # PointBERT's ModelNet augmentation
FMNIST_THRESHOLD = 0.1   # a pixel brighter than this (intensity in [0, 1]) belongs to the item


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


# --- reading one file ------------------------------------------------------------------------------------------------
def read_point_file(path) -> np.ndarray:
    """A point file -> (N, C) float32: x, y, z, then the features, C >= 3.

    .npy: a 2-D array. .txt / .csv / .xyz: one point a row, numbers separated by commas or whitespace (ModelNet40's
    `x,y,z,nx,ny,nz`); blank lines are skipped. .ply (ASCII or binary): the vertex element's x, y, z, then its other
    properties in file order. Anything else raises DatasetError with one line naming the file and the problem.
    """
    path = str(path)
    ext = os.path.splitext(path)[1].lower()
    if ext not in POINT_EXTENSIONS:
        raise DatasetError(f"{path}: unknown point file extension {ext or '(none)'!r}; expected one of "
                           f"{', '.join(POINT_EXTENSIONS)}")
    try:
        if ext == ".npy":
            points = _read_npy(path)
        elif ext == ".ply":
            points = _read_ply(path)
        else:
            points = _read_text(path)
    except OSError as e:
        raise DatasetError(f"{path}: cannot read the file ({e.strerror or _one_line(e)})") from e
    return _check_points(path, points)


def _read_npy(path: str) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, EOFError) as e:   # pickled objects, a truncated or foreign file
        raise DatasetError(f"{path}: not a readable .npy array ({_one_line(e)}); expected a 2-D numeric array "
                           f"(N points, x y z [features...])") from e
    if not isinstance(array, np.ndarray) or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise DatasetError(f"{path}: a .npy array of {getattr(array, 'dtype', type(array).__name__)}; a point file "
                           f"holds numbers")
    if array.ndim != 2:
        raise DatasetError(f"{path}: a {array.ndim}-D array of shape {array.shape}; a .npy point file holds a 2-D "
                           f"array (N points, x y z [features...])")
    if array.shape[0] and array.shape[1] < 3:
        raise DatasetError(f"{path}: the array has {array.shape[1]} columns (shape {array.shape}); {NEEDS_XYZ}")
    return array.astype(np.float32)


def _read_text(path: str) -> np.ndarray:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not a text file ({_one_line(e)}); a {os.path.splitext(path)[1]} point file "
                           f"holds rows of numbers: x y z [features...]") from e
    if not text.strip():
        return np.zeros((0, 3), np.float32)
    try:   # the fast path; on any failure the rows are read one by one below to name the row at fault
        points = np.loadtxt(io.StringIO(text.replace(",", " ")), dtype=np.float32, comments=None, ndmin=2)
        if points.shape[1] >= 3:
            return points
    except ValueError:
        pass
    rows = [(number, cells) for number, cells in
            ((n, line.replace(",", " ").split()) for n, line in enumerate(text.splitlines(), 1)) if cells]
    for number, cells in rows:
        if len(cells) < 3:
            raise DatasetError(f"{path}: row {number} has {len(cells)} column{'s' * (len(cells) != 1)}; {NEEDS_XYZ}")
    first, width = rows[0][0], len(rows[0][1])
    for number, cells in rows:
        if len(cells) != width:
            raise DatasetError(f"{path}: row {number} has {len(cells)} columns but row {first} has {width}; every "
                               f"row of a point file has the same columns")
    for number, cells in rows:
        for column, cell in enumerate(cells, 1):
            try:
                float(cell)
            except ValueError:
                raise DatasetError(f"{path}: row {number}, column {column} is {cell!r}, not a number; a point file "
                                   f"holds rows of numbers: x y z [features...]") from None
    return np.array([cells for _, cells in rows], dtype=np.float32)


def _read_ply(path: str) -> np.ndarray:
    try:
        ply = PlyData.read(path)
    except (PlyParseError, ValueError, EOFError, IndexError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not a readable .ply file ({_one_line(e)})") from e
    elements = {e.name: e for e in ply.elements}
    if "vertex" not in elements:
        raise DatasetError(f"{path}: no 'vertex' element (it has: {', '.join(elements) or 'none'}); a .ply point "
                           f"file stores its points as vertex x, y, z")
    vertex = elements["vertex"]
    names = [p.name for p in vertex.properties]
    missing = [a for a in ("x", "y", "z") if a not in names]
    if missing:
        raise DatasetError(f"{path}: the vertex element has no {', '.join(missing)} (its properties: "
                           f"{', '.join(names) or 'none'}); a .ply point file needs vertex x, y, z")
    lists = [p.name for p in vertex.properties if isinstance(p, PlyListProperty)]
    if lists:
        raise DatasetError(f"{path}: vertex propert{'ies' if len(lists) > 1 else 'y'} {', '.join(lists)} "
                           f"{'are lists' if len(lists) > 1 else 'is a list'}; point features are one number each")
    order = ["x", "y", "z"] + [n for n in names if n not in ("x", "y", "z")]
    return np.stack([np.asarray(vertex[n], dtype=np.float32) for n in order], axis=1).reshape(-1, len(order))


def _check_points(path: str, points: np.ndarray) -> np.ndarray:
    if points.shape[0] == 0:
        raise DatasetError(f"{path}: the file holds no points; a point file needs at least one row of "
                           f"x y z [features...]")
    bad = ~np.isfinite(points).all(axis=1)
    if bad.any():
        raise DatasetError(f"{path}: point {int(np.argmax(bad)) + 1} holds NaN or infinite values; coordinates and "
                           f"features must be finite numbers")
    return np.ascontiguousarray(points, dtype=np.float32)


# --- sampling, normalisation, augmentation -------------------------------------------------------------------------
def sample_points(points: torch.Tensor, num_points: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(N, C) -> (num_points, C): a random subset without replacement when N >= num_points; otherwise every point
    once (shuffled) and the rest drawn with replacement. generator None: torch's global generator."""
    n = points.shape[0]
    order = torch.randperm(n, generator=generator)
    if n < num_points:
        order = torch.cat([order, torch.randint(n, (num_points - n,), generator=generator)])
    return points[order[:num_points]]


def normalize_unit_sphere(points: torch.Tensor) -> torch.Tensor:
    """(N, C) -> (N, C): xyz centred on their mean and scaled so the farthest point is at distance 1 (PointBERT's
    ModelNet normalisation); the features are left as they are."""
    xyz = points[:, :3] - points[:, :3].mean(dim=0)
    radius = xyz.norm(dim=1).max()
    xyz = xyz / radius if radius > 0 else xyz   # a cloud of one repeated point stays at the origin
    return torch.cat([xyz, points[:, 3:]], dim=1)


def scale_translate(points: torch.Tensor) -> torch.Tensor:
    """(N, C) -> (N, C): xyz scaled per axis by U(2/3, 3/2) and shifted by U(-0.2, 0.2) (PointBERT's ModelNet
    training augmentation), drawn from torch's global generator; the features are left as they are."""
    scale = torch.empty(3).uniform_(*SCALE_RANGE)
    shift = torch.empty(3).uniform_(*SHIFT_RANGE)
    return torch.cat([points[:, :3] * scale + shift, points[:, 3:]], dim=1)


def _check_sizes(num_points: int, in_chans: int) -> None:
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    if in_chans < 3:
        raise ValueError(f"in_chans must be >= 3 (x y z [features...]), got {in_chans}")


def _eval_generator(index: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(index))


# --- datasets --------------------------------------------------------------------------------------------------------
class PointFolder(Dataset):
    """Point files in class folders: `<root>/<split>/<class>/*` (or `<root>/<class>/*` when the tree has no split
    folders), classes sorted by name. Files with other extensions are ignored; a class folder without point files
    is an error. Items: (points (num_points, in_chans), label), sampled to num_points, xyz on the unit sphere
    (`normalize_unit_sphere`), then augmented when train (`scale_translate`). Columns past in_chans are dropped."""

    def __init__(self, root: str, split: str = "train", num_points: int = 1024, in_chans: int = 3,
                 train: bool = False):
        _check_sizes(num_points, in_chans)
        folder = split_folder(root, split, "a point folder", "<class>/*")
        if not os.path.isdir(folder):
            raise DatasetError(f"point folder {folder} does not exist")
        self.root, self.num_points, self.in_chans, self.train = folder, num_points, in_chans, train
        self.classes: List[str] = sorted(d for d in os.listdir(folder)
                                         if os.path.isdir(os.path.join(folder, d)) and not d.startswith("."))
        if not self.classes:
            raise DatasetError(f"{folder} has no class folders; a point folder holds <class>/*"
                               f"{{{','.join(POINT_EXTENSIONS)}}}")
        self.samples: List[Tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            files = sorted(f for f in os.listdir(os.path.join(folder, name))
                           if f.lower().endswith(POINT_EXTENSIONS) and not f.startswith("."))
            if not files:
                raise DatasetError(f"class folder {os.path.join(folder, name)} holds no point files "
                                   f"({', '.join(POINT_EXTENSIONS)})")
            self.samples += [(os.path.join(folder, name, f), label) for f in files]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        points = read_point_file(path)
        if points.shape[1] < self.in_chans:
            raise DatasetError(f"{path}: {points.shape[1]} columns, but in_chans={self.in_chans} asks for x y z and "
                               f"{self.in_chans - 3} feature(s); pass in_chans={points.shape[1]} or add the features")
        points = torch.from_numpy(points[:, :self.in_chans])
        points = normalize_unit_sphere(
            sample_points(points, self.num_points, None if self.train else _eval_generator(index)))
        return (scale_translate(points) if self.train else points), label


def image_to_points(image: torch.Tensor, num_points: int, generator: Optional[torch.Generator] = None,
                    threshold: float = FMNIST_THRESHOLD) -> torch.Tensor:
    """A grey image (H, W) uint8 -> (num_points, 4): x, y, z, intensity.

    Pixels brighter than `threshold` (intensity = value / 255) are drawn with replacement, with probability
    proportional to their intensity (all non-zero pixels when none is that bright, all pixels for a blank
    image); each point lies uniformly inside its pixel. x grows to the right and y upwards, both in [-1, 1] over
    the image; z = 0; the 4th column is the pixel's intensity.
    """
    height, width = image.shape
    intensity = image.float().flatten() / 255
    weights = torch.where(intensity > threshold, intensity, torch.zeros(()))
    if weights.sum() == 0:
        weights = intensity if intensity.sum() > 0 else torch.ones_like(intensity)
    pixel = torch.multinomial(weights, num_points, replacement=True, generator=generator)
    inside = torch.rand(num_points, 2, generator=generator)
    x = (pixel % width + inside[:, 0]) / width * 2 - 1
    y = 1 - (pixel // width + inside[:, 1]) / height * 2
    return torch.stack([x, y, torch.zeros(num_points), intensity[pixel]], dim=1)


class FashionMNISTPoints(Dataset):
    """Fashion-MNIST items as 2-D point clouds, the way "MNIST point cloud" sets are made: `image_to_points`
    (points on the item's pixels brighter than FMNIST_THRESHOLD, drawn in proportion to intensity, jittered inside
    the pixel; x, y in [-1, 1], z = 0, intensity the 4th column). in_chans 3: x y z; 4: x y z intensity.

    train selects the training split (else the test set); augment (default: train) applies `scale_translate` and
    draws from the global generator. Labels and `classes` are Fashion-MNIST's."""

    def __init__(self, train: bool = True, num_points: int = 256, in_chans: int = 3, augment: Optional[bool] = None,
                 root: str = FASHION_MNIST_DIR):
        _check_sizes(num_points, in_chans)
        if in_chans > 4:
            raise DatasetError(f"Fashion-MNIST points have 4 columns (x y z intensity); in_chans must be 3 or 4, "
                               f"got {in_chans}")
        base = FashionMNIST(root, train=train)
        self.images, self.labels = base.data, base.targets   # (N, 28, 28) uint8, (N,)
        self.classes: List[str] = list(base.classes)
        self.num_points, self.in_chans = num_points, in_chans
        self.augment = train if augment is None else augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        generator = None if self.augment else _eval_generator(index)
        points = image_to_points(self.images[index], self.num_points, generator)[:, :self.in_chans]
        return (scale_translate(points) if self.augment else points), int(self.labels[index])


SYNTHETIC_SHAPES = ("ring", "line", "square", "cluster", "sphere", "helix")


def _shape(kind: str, n: int, g: torch.Generator) -> torch.Tensor:
    """n points (n, 3) on one of SYNTHETIC_SHAPES, inside the unit sphere."""
    t = torch.rand(n, generator=g)
    zeros = torch.zeros(n)
    if kind == "ring":
        angle = 2 * torch.pi * t
        return torch.stack([angle.cos(), angle.sin(), zeros], dim=1) * 0.8
    if kind == "line":
        return (2 * t - 1)[:, None] * torch.tensor([0.8, 0.4, 0.2])
    if kind == "square":   # the outline of a square, its perimeter walked by t
        side, along = (t * 4).floor(), (t * 4) % 1 * 2 - 1
        x = torch.where(side % 2 == 0, along, torch.where(side == 1, 1.0, -1.0))
        y = torch.where(side % 2 == 1, along, torch.where(side == 0, -1.0, 1.0))
        return torch.stack([x, y, zeros], dim=1) * 0.6
    if kind == "cluster":
        return (torch.randn(n, 3, generator=g) * 0.15).clamp(-0.5, 0.5)
    if kind == "sphere":
        v = torch.randn(n, 3, generator=g)
        return v / v.norm(dim=1, keepdim=True).clamp_min(1e-6) * 0.7
    angle = 4 * torch.pi * t   # helix
    return torch.stack([0.5 * angle.cos(), 0.5 * angle.sin(), 1.6 * t - 0.8], dim=1)


class SyntheticPoints(Dataset):
    """A small learnable point set for tests: class c is shape c % 6 of SYNTHETIC_SHAPES (ring, line, square
    outline, cluster, sphere, helix) shrunk by 1 / (1 + c // 6), turned by a random angle about z, with 0.02
    jitter; columns past xyz are uniform noise. Items (points (num_points, in_chans), label); deterministic for a
    seed."""

    def __init__(self, num_samples: int = 64, num_classes: int = 4, num_points: int = 128, in_chans: int = 3,
                 seed: int = 0):
        _check_sizes(num_points, in_chans)
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(num_samples) % num_classes
        clouds = []
        for c in self.labels.tolist():
            xyz = _shape(SYNTHETIC_SHAPES[c % len(SYNTHETIC_SHAPES)], num_points, g) / (1 + c // len(SYNTHETIC_SHAPES))
            angle = torch.rand((), generator=g) * 2 * torch.pi
            turn = torch.tensor([[angle.cos(), -angle.sin(), 0], [angle.sin(), angle.cos(), 0], [0, 0, 1]])
            xyz = xyz @ turn.T + 0.02 * torch.randn(num_points, 3, generator=g)
            clouds.append(torch.cat([xyz, torch.rand(num_points, in_chans - 3, generator=g)], dim=1))
        self.points = torch.stack(clouds)   # (num_samples, num_points, in_chans)
        self.classes: List[str] = [f"class_{c}" for c in range(num_classes)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        return self.points[index], int(self.labels[index])


def build_point_dataset(name: str, split: str, num_points: int, in_chans: int, train: bool,
                        seed: int = 0) -> Dataset:
    """Point dataset by name or folder: 'fashion_mnist' (FashionMNISTPoints; 'val' is the test set), 'synthetic'
    (SyntheticPoints, 64 items of 4 classes, the split's own seed) or a PointFolder path. split 'train' | 'val';
    train: training sampling and augmentation. Every returned dataset has a `classes` list of names."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if name == "fashion_mnist":
        return FashionMNISTPoints(train=split == "train", num_points=num_points, in_chans=in_chans, augment=train)
    if name == "synthetic":
        return SyntheticPoints(num_points=num_points, in_chans=in_chans, seed=seed + (0 if split == "train" else 1))
    if not os.path.isdir(name):
        raise DatasetError(f"point dataset {name!r} is neither 'fashion_mnist', 'synthetic' nor an existing "
                           f"directory")
    return PointFolder(name, split, num_points, in_chans, train)

