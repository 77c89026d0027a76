"""The images a trained checkpoint is evaluated on: its own evaluation transform over a dataset's split."""
from typing import Optional, Tuple

from torch.utils.data import DataLoader, Subset

from ..data import ClassesAs, TransformConfig, build_dataset, build_transform
from ..models.timm_folder import is_timm_folder
from ..train.checkpoint import load_training_state, read_meta, resolve_checkpoint


def checkpoint_transform(checkpoint: str) -> TransformConfig:
    """The evaluation transform a llamavit training checkpoint (or a timm folder's config.json) recorded (input size,
    channels, normalisation)."""
    meta = read_meta(checkpoint)
    if meta.get("objective") in ("ddpm", "flow"):
        raise ValueError(f"{checkpoint} is a generation run, not a classifier: use `llamavit generate sample`")
    if meta.get("objective") in ("aim", "mae") or "probe_head" in meta:
        raise ValueError(f"{checkpoint} is a pre-training or probe run, not a classifier: `llamavit finetune` "
                         f"its trunk (or `llamavit probe` it) first")
    if meta.get("task") in ("segment", "detect"):
        raise ValueError(f"{checkpoint} is a {meta['task']} run, not a classifier: use `llamavit {meta['task']} "
                         f"eval` / `llamavit {meta['task']} predict`")
    if "transform" not in meta:
        raise ValueError(f"{checkpoint} is not a llamavit training checkpoint (no transform metadata)")
    return TransformConfig(**meta["transform"])


def training_data(checkpoint: str) -> str:
    """The dataset a llamavit checkpoint was trained on (its run config's `data`; a timm folder's config.json)."""
    meta = read_meta(checkpoint)
    if "data" in meta:
        return meta["data"]
    if is_timm_folder(resolve_checkpoint(checkpoint)):
        raise ValueError(f"{checkpoint} is a timm folder that does not record the dataset it was trained on: pass "
                         f"--data")
    return load_training_state(resolve_checkpoint(checkpoint))["config"]["data"]


def eval_loader(checkpoint: str, data: Optional[str] = None, subset: int = 0, batch_size: int = 256,
                split: str = "val") -> Tuple[DataLoader, str, int]:
    """(loader of (images, labels), dataset name, image count): `split` of `data` (default: the dataset the
    checkpoint was trained on) through the checkpoint's evaluation transform, in order, labels numbered as
    the model's classes (matched by name; a class the model does not know is refused); `subset` > 0 keeps
    the first N images."""
    tcfg = checkpoint_transform(checkpoint)
    data = data or training_data(checkpoint)
    ds = build_dataset(data, split, build_transform(tcfg, is_training=False), img_size=tcfg.img_size,
                       in_chans=tcfg.in_chans)
    classes = read_meta(checkpoint).get("classes")
    if classes and list(ds.classes) != list(classes):   # labels as the model numbers them, matched by name
        ds = ClassesAs(ds, classes, f"{data} ({split})")
    if subset:
        ds = Subset(ds, range(min(subset, len(ds))))
    return DataLoader(ds, batch_size=batch_size, shuffle=False), data, len(ds)
