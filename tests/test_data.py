"""Datasets and transforms: Fashion-MNIST from the Debian files, ImageFolder, synthetic, channel mapping."""
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from llamavit.data import (FASHION_MNIST_MEAN, FASHION_MNIST_STD, DatasetError, FashionMNIST, SyntheticImages,
                           TransformConfig, build_dataset, build_transform)
from llamavit.data.datasets import FASHION_MNIST_DIR

needs_fmnist = pytest.mark.skipif(not os.path.isfile(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")),
                                  reason="Debian package dataset-fashion-mnist not installed (make test installs it)")


@needs_fmnist
def test_fashion_mnist_reads_debian_files():
    train, test = build_dataset("fashion_mnist", "train"), build_dataset("fashion_mnist", "val")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"
    img, label = train[0]
    assert img.mode == "L" and img.size == (28, 28)
    assert label == 9  # the first training image of Fashion-MNIST is an ankle boot
    counts = torch.bincount(train.targets, minlength=10)
    assert counts.tolist() == [6000] * 10


def test_fashion_mnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(DatasetError, match=r"apt-get install -y dataset-fashion-mnist"):
        FashionMNIST(root=str(tmp_path))


def test_unknown_dataset_and_missing_folder():
    with pytest.raises(DatasetError, match="neither 'fashion_mnist', 'digits', 'synthetic' nor an existing directory"):
        build_dataset("/no/such/dir")
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        build_dataset("synthetic", "test")


def test_image_folder_uses_split_subfolder(tmp_path):
    for split in ("train", "val"):
        for cls, value in (("cat", 30), ("dog", 200)):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((20, 24, 3), value, dtype=np.uint8)).save(d / f"{i}.png")
    tf = build_transform(TransformConfig(img_size=16, in_chans=3, crop_pct=1.0), is_training=False)
    ds = build_dataset(str(tmp_path), "val", tf)
    assert ds.classes == ["cat", "dog"] and len(ds) == 6
    x, y = ds[5]
    assert x.shape == (3, 16, 16) and y == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="cannot read image folder"):
        build_dataset(str(empty))


@pytest.mark.parametrize("in_chans", [1, 3])
def test_transform_maps_channels_and_normalises(in_chans):
    cfg = TransformConfig(img_size=28, in_chans=in_chans, mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD, crop_pct=1.0)
    gray = Image.fromarray(np.full((28, 28), 51, dtype=np.uint8))
    x = build_transform(cfg, is_training=False)(gray)
    assert x.shape == (in_chans, 28, 28)
    expected = (51 / 255 - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]
    torch.testing.assert_close(x, torch.full_like(x, expected), atol=1e-5, rtol=0)
    rgb = Image.fromarray(np.full((28, 28, 3), 51, dtype=np.uint8))
    assert build_transform(cfg, is_training=False)(rgb).shape == (in_chans, 28, 28)


def test_training_transform_is_random_but_seedable():
    cfg = TransformConfig(img_size=24, in_chans=3, scale=(0.3, 1.0), crop_pct=1.0)
    tf = build_transform(cfg, is_training=True)
    img = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype(np.uint8))
    torch.manual_seed(0)
    random.seed(0)
    a = tf(img)
    torch.manual_seed(0)
    random.seed(0)
    b = tf(img)
    c = tf(img)
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_synthetic_is_deterministic_and_labelled():
    a, b = SyntheticImages(num_samples=8, num_classes=4, seed=3), SyntheticImages(num_samples=8, num_classes=4, seed=3)
    assert torch.equal(a.images, b.images) and a.labels.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    img, label = a[2]
    assert img.size == (32, 32) and label == 2
    with pytest.raises(ValueError, match="1 or 3 channels"):
        build_transform(TransformConfig(in_chans=4), is_training=False)


def test_digits_is_scikit_learns_bundled_set_split_one_in_four():
    from sklearn.datasets import load_digits

    train, val = build_dataset("digits", "train"), build_dataset("digits", "val")
    assert (len(train), len(val)) == (1347, 450) and train.classes == [str(d) for d in range(10)]
    digits = load_digits()
    img, label = val[3]   # item 12 of the bundled set
    assert img.size == (8, 8) and img.mode == "L" and label == int(digits.target[12])
    np.testing.assert_array_equal(np.asarray(img), np.round(digits.images[12] * 255 / 16).astype(np.uint8))
    assert sorted(set(val.labels.tolist())) == list(range(10))


def test_shift_translates_by_at_most_n_pixels_with_zero_fill():
    # one bright pixel in the middle of a black 28x28 image: after a shift of up to 2 px it lies within 2 px of
    # the centre, every other pixel is the normalised black, and all 25 offsets occur
    arr = np.zeros((28, 28), dtype=np.uint8)
    arr[14, 14] = 255
    img = Image.fromarray(arr, mode="L")
    cfg = TransformConfig(img_size=28, in_chans=1, mean=(0.0,), std=(1.0,), shift=2, hflip=0.0)
    tf = build_transform(cfg, is_training=True)
    torch.manual_seed(0)
    offsets = set()
    for _ in range(300):
        x = tf(img)
        assert x.shape == (1, 28, 28)
        bright = (x[0] > 0.5).nonzero().tolist()
        assert len(bright) == 1 and x.sum().item() == pytest.approx(1.0)
        offsets.add((bright[0][0] - 14, bright[0][1] - 14))
    assert offsets == {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}
    assert torch.equal(build_transform(cfg, is_training=False)(img)[0] > 0.5, torch.from_numpy(arr > 0))
    with pytest.raises(ValueError, match="shift replaces timm's training pipeline"):
        build_transform(TransformConfig(shift=2, re_prob=0.25), is_training=True)
