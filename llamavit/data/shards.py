"""WebDataset tar shards: writing them from any labelled dataset, and streaming them for training.

A shard directory holds `<split>-000000.tar ...` (samples `<key>.png` + `<key>.cls`) and one index
`<split>.json` = {"format": "llamavit-shards", "shards": [...], "count": N, "classes": [...]}.
Streaming: each epoch the shard list is shuffled with a (seed, epoch) generator, rank r of W takes
every W-th shard (and DataLoader worker w of K every K-th of those), samples pass through a seeded
shuffle buffer, and each sample's augmentation is seeded by (seed, epoch, key) — so a stream is
reproducible and a resumed run sees the same samples.
"""
import io
import json
import os
import random
import zlib
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from .seeding import mix_seed

INDEX_FORMAT = "llamavit-shards"


def shard_index_path(root: str, split: str) -> str:
    """The index file of a split's shards: <root>/<split>.json."""
    return os.path.join(root, f"{split}.json")


def is_shard_dir(path: str) -> bool:
    """True when `path` is a directory written by `write_shards` (it has a train.json or val.json index)."""
    return os.path.isdir(path) and any(os.path.isfile(shard_index_path(path, s)) for s in ("train", "val"))


def write_shards(dataset: Dataset, root: str, split: str, classes: List[str], max_count: int = 10000) -> dict:
    """Write (PIL image, label) samples of `dataset` as PNG tar shards of at most max_count samples.

    Returns the index that is also written to `<root>/<split>.json`.
    """
    import webdataset as wds
    os.makedirs(root, exist_ok=True)
    written: List[str] = []
    pattern = os.path.join(root, f"{split}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=max_count, verbose=0, post=lambda f: written.append(os.path.basename(f))) \
            as sink:
        for i in range(len(dataset)):
            image, label = dataset[i]
            if not isinstance(image, Image.Image):
                raise TypeError(f"write_shards needs PIL images (no transform); sample {i} is {type(image).__name__}")
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            sink.write({"__key__": f"{split}{i:08d}", "png": buf.getvalue(), "cls": str(int(label)).encode()})
    index = {"format": INDEX_FORMAT, "split": split, "shards": sorted(written), "count": len(dataset),
             "classes": list(classes)}
    with open(shard_index_path(root, split), "w") as f:
        json.dump(index, f, indent=1)
    return index


def _identity(src):
    return src


class ShardDataset(IterableDataset):
    """Streams (transformed image, label) from the shards of one split.

    cycle=True (training): the rank's shards repeat, so every rank can draw the same number of
    batches per epoch whatever the split of shards; cycle=False (evaluation): one pass.
    `len()` is the split's sample count (all ranks together).
    """

    def __init__(self, root: str, split: str, transform: Optional[Callable] = None, seed: int = 0,
                 shuffle_buffer: int = 2000, cycle: bool = True, rank: int = 0, world_size: int = 1):
        path = shard_index_path(root, split)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no shard index {path}: write shards with `llamavit shard`")
        with open(path) as f:
            index = json.load(f)
        if index.get("format") != INDEX_FORMAT:
            raise ValueError(f"{path} is not a llamavit shard index (format {index.get('format')!r})")
        self.root, self.split, self.index = root, split, index
        self.classes: List[str] = index["classes"]
        self.transform, self.seed, self.shuffle_buffer, self.cycle = transform, seed, shuffle_buffer, cycle
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def __len__(self) -> int:
        return self.index["count"]

    def _my_shards(self) -> List[str]:
        shards = list(self.index["shards"])
        random.Random(mix_seed(self.seed, self.epoch, 17)).shuffle(shards)
        shards = shards[self.rank::self.world_size] or shards[self.rank % len(shards)::len(shards)]
        worker = get_worker_info()
        if worker is not None:
            shards = shards[worker.id::worker.num_workers] or shards[:1]
        return [os.path.join(self.root, s) for s in shards]

    def _raw_samples(self, urls: List[str]) -> Iterator[dict]:
        import webdataset as wds
        while True:
            # the rank / worker split is done in _my_shards, so webdataset's own splitters pass through
            for sample in wds.WebDataset(urls, shardshuffle=False, nodesplitter=_identity, workersplitter=_identity,
                                         empty_check=False):
                yield sample
            if not self.cycle:
                return

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, int]]:
        rng = random.Random(mix_seed(self.seed, self.epoch, self.rank, 31))
        buffer: List[dict] = []
        for sample in self._raw_samples(self._my_shards()):
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            i = rng.randrange(len(buffer))
            buffer[i], sample = sample, buffer[i]
            yield self._decode(sample)
        rng.shuffle(buffer)
        for sample in buffer:
            yield self._decode(sample)

    def _decode(self, sample: dict) -> Tuple[torch.Tensor, int]:
        key = sample["__key__"]
        image = Image.open(io.BytesIO(sample["png"]))
        image.load()
        label = int(sample["cls"])
        seed = mix_seed(self.seed, self.epoch, zlib.crc32(key.encode()))
        random.seed(seed)
        np.random.seed(seed)
        torch.random.default_generator.manual_seed(seed)
        return (self.transform(image) if self.transform is not None else image), label
