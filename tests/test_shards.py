"""WebDataset shards: writing, streaming (order, rank split, seeded augmentation), training from them."""
import json

import pytest
import torch

from llamavit.data import ShardDataset, SyntheticImages, build_dataset, write_shards
from llamavit.train import TrainConfig, Trainer


@pytest.fixture
def shard_dir(tmp_path):
    for split, seed in (("train", 0), ("val", 1)):
        data = SyntheticImages(num_samples=48 if split == "train" else 20, num_classes=4, img_size=16, in_chans=3,
                               seed=seed)
        write_shards(data, str(tmp_path), split, [f"c{i}" for i in range(4)], max_count=10)
    return tmp_path


def _labels_and_pixels(ds):
    return [(label, img.sum().item()) for img, label in ds]


def test_write_shards_index_and_contents(shard_dir):
    index = json.loads((shard_dir / "train.json").read_text())
    assert index["count"] == 48 and index["classes"] == ["c0", "c1", "c2", "c3"]
    assert index["shards"] == [f"train-{i:06d}.tar" for i in range(5)]   # 10 + 10 + 10 + 10 + 8
    ds = build_dataset(str(shard_dir), "val")
    assert isinstance(ds, ShardDataset) and len(ds) == 20 and not ds.cycle
    original = SyntheticImages(num_samples=20, num_classes=4, img_size=16, in_chans=3, seed=1)
    got = sorted((label, img.tobytes()) for img, label in ds)
    want = sorted((label, img.tobytes()) for img, label in (original[i] for i in range(20)))
    assert got == want   # lossless PNG round trip, every sample exactly once


def test_stream_order_is_seeded_by_epoch_and_split_across_ranks(shard_dir):
    import torchvision.transforms.functional as TF
    ds = ShardDataset(str(shard_dir), "val", transform=TF.pil_to_tensor, seed=5, shuffle_buffer=8, cycle=False)
    first, again = _labels_and_pixels(ds), _labels_and_pixels(ds)
    assert first == again and len(first) == 20
    ds.epoch = 1
    assert sorted(_labels_and_pixels(ds)) == sorted(first) and _labels_and_pixels(ds) != first
    ranks = []
    for r in range(2):
        part = ShardDataset(str(shard_dir), "train", transform=TF.pil_to_tensor, seed=5, cycle=False, rank=r,
                            world_size=2)
        ranks.append(_labels_and_pixels(part))
    assert len(ranks[0]) + len(ranks[1]) == 48 and sorted(ranks[0] + ranks[1]) == sorted(
        _labels_and_pixels(ShardDataset(str(shard_dir), "train", transform=TF.pil_to_tensor, cycle=False)))


def test_augmentation_is_seeded_per_sample(shard_dir):
    rand = lambda img: torch.rand(1).item()   # noqa: E731 - stands for a random augmentation
    a = [x for x, _ in ShardDataset(str(shard_dir), "val", transform=rand, seed=2, cycle=False)]
    b = [x for x, _ in ShardDataset(str(shard_dir), "val", transform=rand, seed=2, cycle=False, shuffle_buffer=3)]
    assert sorted(a) == sorted(b) and len(set(a)) == 20   # same draws per sample whatever the order


def test_missing_index_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="llamavit shard"):
        ShardDataset(str(tmp_path), "train")


def test_training_from_shards_resumes_exactly(shard_dir, tmp_path):
    base = dict(model="visionllama_small_patch16_224", img_size=16, data=str(shard_dir), batch_size=8, epochs=2,
                lr=1e-3, warmup_epochs=0, log_every=1, progress=False,
                model_kwargs=dict(embed_dim=16, depth=1, num_heads=2, patch_size=8, mlp_multiple_of=8))
    full = Trainer(TrainConfig.from_dict({**base, "output": str(tmp_path / "full")}))
    summary = full.fit()
    assert full.steps_per_epoch == 6 and summary["steps"] == 12 and 0 <= summary["val_top1"] <= 100
    losses = {r["step"]: r["loss"] for r in full.history if "loss" in r}
    Trainer(TrainConfig.from_dict({**base, "output": str(tmp_path / "cut"), "max_steps": 8})).fit()
    resumed = Trainer(TrainConfig.from_dict({**base, "output": str(tmp_path / "cut"), "resume": True}))
    resumed.fit()
    again = {r["step"]: r["loss"] for r in resumed.history if "loss" in r}
    assert [again[s] for s in range(9, 13)] == pytest.approx([losses[s] for s in range(9, 13)], rel=1e-6)
    with pytest.raises(ValueError, match="streamed whole"):
        Trainer(TrainConfig.from_dict({**base, "output": str(tmp_path / "x"), "train_subset": 8}))


def test_shard_command_writes_and_explains_bad_input(tmp_path, capsys):
    from llamavit.cli import main
    assert main(["shard", "--data", "synthetic", "--output", str(tmp_path / "s"), "--max-count", "40"]) == 0
    assert "train: 64 samples in 2 shard(s)" in capsys.readouterr().out
    assert len(build_dataset(str(tmp_path / "s"), "train")) == 64
    assert main(["shard", "--data", str(tmp_path / "nowhere"), "--output", str(tmp_path / "t")]) == 2
    assert "is neither 'fashion_mnist', 'digits', 'synthetic' nor an existing directory" in capsys.readouterr().err
