"""Image transforms, built with timm.data, plus the grayscale/RGB mapping to the model's channels."""
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torchvision import transforms as T


@dataclass
class TransformConfig:
    """What a model's images go through: size, channels, normalisation and the training augmentation."""
    img_size: int = 224
    in_chans: int = 3
    mean: Optional[Sequence[float]] = None      # None: ImageNet's (or its first channel for 1 channel)
    std: Optional[Sequence[float]] = None
    scale: Tuple[float, float] = (0.08, 1.0)    # RandomResizedCrop area range
    hflip: float = 0.5
    auto_augment: Optional[str] = None          # e.g. 'rand-m9-mstd0.5-inc1'
    re_prob: float = 0.0                        # random erasing
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    shift: int = 0                              # >0: a random shift of up to this many pixels (zero fill)
                                                # replaces the random-resized crop in training


def _channels(values: Optional[Sequence[float]], default: Sequence[float], in_chans: int) -> Tuple[float, ...]:
    values = tuple(values if values is not None else default)
    if len(values) == in_chans:
        return values
    if len(values) == 1:
        return values * in_chans
    if in_chans == 1:
        return (sum(values) / len(values),)
    raise ValueError(f"normalisation has {len(values)} channel values but the model takes {in_chans} channels")


def rgb_normalization(mean: Optional[Sequence[float]], std: Optional[Sequence[float]],
                      in_chans: int) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """(mean, std) with 3 values each for the RGB pipeline of a model taking `in_chans` channels
    (None: ImageNet's; one value is repeated)."""
    return (_channels(_channels(mean, IMAGENET_DEFAULT_MEAN, in_chans), (), 3),
            _channels(_channels(std, IMAGENET_DEFAULT_STD, in_chans), (), 3))


def build_transform(cfg: TransformConfig, is_training: bool) -> Callable:
    """PIL image -> normalised (in_chans, img_size, img_size) float tensor.

    Every image goes through timm's pipeline as RGB (so grayscale data feeds an RGB model, and
    RandAugment's colour fills work); a 1-channel model then keeps the first channel, which for a
    grayscale picture equals the others.
    """
    if cfg.in_chans not in (1, 3):
        raise ValueError(f"image transforms support 1 or 3 channels, got in_chans={cfg.in_chans}")
    mean, std = rgb_normalization(cfg.mean, cfg.std, cfg.in_chans)
    if is_training and cfg.shift > 0:
        return shift_transform(cfg, mean, std)
    tf = create_transform(
        input_size=(3, cfg.img_size, cfg.img_size), is_training=is_training, scale=cfg.scale,
        hflip=cfg.hflip, vflip=0.0, color_jitter=None, auto_augment=cfg.auto_augment if is_training else None,
        re_prob=cfg.re_prob if is_training else 0.0, interpolation=cfg.interpolation, mean=mean, std=std,
        crop_pct=cfg.crop_pct)
    steps = [ToRGB(), tf] + ([FirstChannel()] if cfg.in_chans == 1 else [])
    return T.Compose(steps)


def shift_transform(cfg: TransformConfig, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """PIL image -> (in_chans, img_size, img_size): resized, shifted by up to cfg.shift pixels each way (the
    uncovered border is zero before normalisation), flipped, normalised; the translation augmentation of small-image
    recipes (e.g. ../shared/BASELINES.md's Fashion-MNIST ViT), without RandAugment or erasing."""
    if cfg.auto_augment or cfg.re_prob:
        raise ValueError("shift replaces timm's training pipeline: it does not combine with auto_augment or re_prob")
    steps: List[Callable] = [ToRGB(), T.Resize((cfg.img_size, cfg.img_size)),
                             T.RandomCrop(cfg.img_size, padding=cfg.shift), T.RandomHorizontalFlip(cfg.hflip),
                             T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(steps + ([FirstChannel()] if cfg.in_chans == 1 else []))


def generation_transform(img_size: int, in_chans: int, hflip: float = 0.0, native: int = 28) -> Callable:
    """PIL image -> (in_chans, img_size, img_size) in [-1, 1] (a diffusion model's pixels); images `native` px
    wide are zero-padded to img_size (Fashion-MNIST 28 -> 32)."""
    steps: List[Callable] = [T.Grayscale(1) if in_chans == 1 else ToRGB()]
    if img_size >= native and (img_size - native) % 2 == 0:
        steps.append(T.Pad((img_size - native) // 2))
    steps += [T.Resize((img_size, img_size)), T.RandomHorizontalFlip(hflip), T.ToTensor(),
              T.Normalize((0.5,) * in_chans, (0.5,) * in_chans)]
    return T.Compose(steps)


def aim_pretrain_transform(img_size: int, in_chans: int, mean: Sequence[float], std: Sequence[float],
                           scale: Tuple[float, float] = (0.4, 1.0), hflip: float = 0.5,
                           color_jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1),
                           color_jitter_prob: float = 0.8) -> Callable:
    """PIL image -> augmented, normalised (in_chans, img_size, img_size) tensor: AIM's pre-training recipe
    (RandomResizedCrop bicubic, flip, ColorJitter with probability); mean / std of 3 channels."""
    tf = create_transform(input_size=(3, img_size, img_size), is_training=True, scale=scale, hflip=hflip, vflip=0.0,
                          color_jitter=color_jitter, color_jitter_prob=color_jitter_prob, interpolation="bicubic",
                          mean=mean, std=std)
    return T.Compose([ToRGB(), tf] + ([FirstChannel()] if in_chans == 1 else []))


class ToRGB:
    """PIL image in any mode -> RGB PIL image."""

    def __call__(self, img):
        return img if img.mode == "RGB" else img.convert("RGB")


class FirstChannel:
    """(C, H, W) tensor -> (1, H, W)."""

    def __call__(self, x):
        return x[:1]
