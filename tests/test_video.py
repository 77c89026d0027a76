"""The video modality: tubelet tokens, the clip datasets (moving Fashion-MNIST, frame folders, synthetic) and the
video encoder with and without the frozen LLM block."""
import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import llamavit
from llamavit.data import ClipFolder, MovingFashionMNIST, SyntheticClips, build_clip_dataset, write_clip_folder
from llamavit.data.clips import clip_frames, frame_indices
from llamavit.data.datasets import FASHION_MNIST_DIR
from llamavit.errors import DatasetError
from llamavit.llm import LLMError, find_smollm2_gguf
from llamavit.models.video_encoder import TubeletEmbed, VideoTokenizer
from llamavit.train.checkpoint import model_from_checkpoint, save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: a second thread costs more than it saves
needs_fmnist = pytest.mark.skipif(not os.path.isfile(os.path.join(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz")),
                                  reason="Debian package dataset-fashion-mnist not installed (make test installs it)")
# a video encoder small enough for a few CPU steps: 4 frames of 16x16 -> 2x4x4 = 32 tokens
SMALL = dict(num_classes=4, img_size=16, in_chans=3, num_frames=4, tubelet_size=2, patch_size=4, embed_dim=32,
             depth=1, num_heads=2)
TINY_LLM = dict(llm_dim=32, llm_num_heads=4, llm_num_kv_heads=2, llm_ffn_hidden=64, llm_num_layers=2)


def pixels(clip: torch.Tensor, dataset) -> torch.Tensor:
    """A normalised clip (C, T, H, W) back in [0, 1]."""
    shape = (-1, 1, 1, 1)
    return clip * torch.tensor(dataset.std).view(shape) + torch.tensor(dataset.mean).view(shape)


def centre_of_mass(frames: torch.Tensor) -> torch.Tensor:
    """(T, H, W) non-negative -> (T, 2) centre of mass (y, x)."""
    ys = torch.arange(frames.shape[1], dtype=torch.float32).view(1, -1, 1)
    xs = torch.arange(frames.shape[2], dtype=torch.float32).view(1, 1, -1)
    mass = frames.sum((1, 2))
    return torch.stack([(frames * ys).sum((1, 2)) / mass, (frames * xs).sum((1, 2)) / mass], dim=1)


# --- tokens -----------------------------------------------------------------------------------------------------------
def test_tubelet_shapes_and_non_multiples():
    embed = TubeletEmbed(in_chans=1, embed_dim=24, tubelet_size=2, patch_size=7)
    assert embed(torch.randn(2, 1, 8, 28, 28)).shape == (2, 4 * 4 * 4, 24)
    assert embed.proj.kernel_size == embed.proj.stride == (2, 7, 7)
    with pytest.raises(ValueError, match=r"clip of 7 frames of 28x28 is not tiled by tubelets of 2 frames x 7x7"):
        embed(torch.randn(1, 1, 7, 28, 28))
    with pytest.raises(ValueError, match=r"clip of 8 frames of 27x28 is not tiled"):
        embed(torch.randn(1, 1, 8, 27, 28))
    with pytest.raises(ValueError, match=r"expected 1 input channel\(s\), got 3"):
        embed(torch.randn(1, 3, 8, 28, 28))
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
        embed(torch.randn(1, 8, 28, 28))


def test_tokenizer_positions_are_temporal_plus_spatial():
    tokenizer = VideoTokenizer(in_chans=1, embed_dim=24, num_frames=8, img_size=28, tubelet_size=2, patch_size=7)
    tokens, positions = tokenizer(torch.randn(3, 1, 8, 28, 28))
    assert tokens.shape == positions.shape == (3, 64, 24)
    t, s = 2, 5   # token of tubelet 2 in time, patch 5 in raster order: time-major
    assert torch.allclose(positions[1, t * 16 + s], tokenizer.temporal_pos[0, t] + tokenizer.spatial_pos[0, s])
    # another clip length keeps the spatial table: the temporal one is resampled
    tokens, positions = tokenizer(torch.randn(1, 1, 4, 28, 28))
    assert tokens.shape == positions.shape == (1, 32, 24)
    assert torch.allclose(positions[0, 16:] - positions[0, 16], tokenizer.spatial_pos[0] - tokenizer.spatial_pos[0, 0],
                          atol=1e-6)
    with pytest.raises(ValueError, match="num_frames 7 must be a positive multiple of tubelet_size 2"):
        VideoTokenizer(1, 24, num_frames=7, img_size=28, tubelet_size=2, patch_size=7)


# --- moving Fashion-MNIST ---------------------------------------------------------------------------------------------
@needs_fmnist
def test_moving_fashion_mnist_class_is_the_motion():
    ds = MovingFashionMNIST(train=False, num_frames=8, img_size=28, in_chans=1, num_clips=16)
    assert len(ds.classes) == 8 and ds.classes[:2] == ["right_slow", "right_fast"] and "up_fast" in ds.classes
    assert len(MovingFashionMNIST(train=False)) == 10_000
    for label in (ds.classes.index("right_slow"), ds.classes.index("left_fast"), ds.classes.index("down_fast")):
        clip, y = ds[label]
        assert y == label and clip.shape == (1, 8, 28, 28)
        frames = pixels(clip, ds)[0]
        assert frames.min() > -1e-5 and frames.max() < 1 + 1e-5
        steps = centre_of_mass(frames).diff(dim=0)
        assert torch.allclose(steps, ds.velocities[label].expand_as(steps), atol=1e-3), (ds.classes[label], steps)
        assert ds.velocities[label].abs().max() > 0.5
    slow, fast = ds.velocities[ds.classes.index("up_slow")], ds.velocities[ds.classes.index("up_fast")]
    assert torch.allclose(fast, 2 * slow) and slow[0] < 0 and slow[1] == 0
    rgb = MovingFashionMNIST(train=False, in_chans=3, num_clips=4)
    clip, _ = rgb[1]
    assert clip.shape == (3, 8, 28, 28) and torch.equal(clip[0], clip[2])


@needs_fmnist
def test_moving_fashion_mnist_eval_fixed_train_redrawn():
    ds = MovingFashionMNIST(train=False, num_clips=8)
    assert torch.equal(ds[5][0], ds[5][0]) and torch.equal(ds[5][0], MovingFashionMNIST(train=False, num_clips=8)[5][0])
    assert not torch.equal(ds[5][0], MovingFashionMNIST(train=False, num_clips=8, seed=1)[5][0])
    train = MovingFashionMNIST(train=True)
    assert len(train) == 60_000 and train.redraw
    torch.manual_seed(3)
    first = train[9]
    torch.manual_seed(3)
    again = train[9]
    later = train[9]
    assert first[1] == again[1] == later[1] == 9 % 8
    assert torch.equal(first[0], again[0]) and not torch.equal(first[0], later[0])


# --- frame folders ----------------------------------------------------------------------------------------------------
def write_frames(folder, numbers, name="{:06d}.png", size=8, values=None):
    os.makedirs(folder, exist_ok=True)
    for i, k in enumerate(numbers):
        value = values[i] if values is not None else 128
        Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(os.path.join(folder, name.format(k)))


@pytest.mark.parametrize("in_chans", [1, 3])
def test_clip_folder_round_trip(tmp_path, in_chans):
    source = SyntheticClips(num_samples=8, num_classes=4, num_frames=4, img_size=16, in_chans=in_chans, seed=2)
    for split in ("train", "val"):
        write_clip_folder(source, str(tmp_path), split)
    assert sorted(os.listdir(tmp_path / "train" / "class_1" / "clip_000001")) == [f"{t:06d}.png" for t in (1, 2, 3, 4)]
    ds = build_clip_dataset(str(tmp_path), "val", num_frames=4, img_size=16, in_chans=in_chans)
    assert isinstance(ds, ClipFolder) and ds.classes == source.classes and len(ds) == len(source)
    for k in range(len(ds)):
        index = int(os.path.basename(os.path.dirname(ds.clips[k][0][0])).split("_")[1])
        clip, label = ds[k]
        expected, expected_label = source[index]
        assert label == expected_label and clip.shape == (in_chans, 4, 16, 16)
        assert (pixels(clip, ds) - pixels(expected, source)).abs().max() <= 0.5 / 255 + 1e-5
    os.rename(tmp_path / "val", tmp_path / "test")
    with pytest.raises(DatasetError, match=r"has train/ but no val/"):
        build_clip_dataset(str(tmp_path), "val", num_frames=4, img_size=16, in_chans=in_chans)


def test_frames_sorted_by_number_and_sampled_uniformly(tmp_path):
    clip = tmp_path / "wave" / "c1"
    write_frames(str(clip), range(1, 13), name="frame_{}.png", values=[20 * k for k in range(1, 13)])
    names = [os.path.basename(p) for p in clip_frames(str(clip), 4)]
    assert names == [f"frame_{k}.png" for k in range(1, 13)]       # frame_10 after frame_9
    assert frame_indices(12, 4) == [1, 4, 7, 10] and frame_indices(12, 4, 0.0) == [0, 3, 6, 9]
    assert frame_indices(4, 4, 0.99) == [0, 1, 2, 3]
    ds = ClipFolder(str(tmp_path), num_frames=4, img_size=8, in_chans=1)       # class folders only: no split
    got = (pixels(ds[0][0], ds)[0, :, 0, 0] * 255).round().tolist()
    assert got == [40.0, 100.0, 160.0, 220.0]                                  # frames 2, 5, 8, 11
    train = ClipFolder(str(tmp_path), num_frames=4, img_size=8, in_chans=1, train=True)
    for _ in range(5):
        values = (pixels(train[0][0], train)[0, :, 0, 0] * 255).round() / 20
        assert (values.diff() == 3).all() and 1 <= values[0] <= 3   # uniform spacing, a random offset


def _missing(clip):
    write_frames(clip, [k for k in range(16) if k != 7])


def _too_few(clip):
    write_frames(clip, range(1, 4))


def _empty(clip):
    os.makedirs(clip)


def _not_an_image(clip):
    write_frames(clip, range(1, 9))
    with open(os.path.join(clip, "labels.txt"), "w") as f:
        f.write("wave\n")


def _repeated(clip):
    write_frames(clip, range(1, 9))
    write_frames(clip, [3], name="frame_{:02d}.jpg")


@pytest.mark.parametrize("make, message", [
    (_missing, "{clip}: frame 7 is missing (frames 0-15 expected to be consecutive)"),
    (_too_few, "{clip}: 3 frames, fewer than num_frames=8; lower num_frames or remove the clip"),
    (_empty, "{clip}: empty clip folder"),
    (_not_an_image, "{clip}/labels.txt: not a frame image"),
    (_repeated, "{clip}: frame 3 appears twice (000003.png and frame_03.jpg)"),
], ids=["missing-frame", "too-few-frames", "empty-clip", "non-image-file", "repeated-number"])
def test_bad_clip_folders_one_line_each(tmp_path, make, message):
    root = tmp_path / "clips"
    write_frames(str(root / "train" / "clap" / "c1"), range(1, 9))
    clip = os.path.join(str(root), "train", "wave", "c3")
    make(clip)
    with pytest.raises(DatasetError) as info:
        build_clip_dataset(str(root), "train", num_frames=8, img_size=8, in_chans=1)
    text = str(info.value)
    assert text.startswith(message.format(clip=clip)) and "\n" not in text, text


def test_unreadable_frame_names_the_file(tmp_path):
    clip = tmp_path / "train" / "wave" / "c1"
    write_frames(str(clip), range(1, 5))
    (clip / "000002.png").write_bytes(b"not a png")
    ds = ClipFolder(str(tmp_path), "train", num_frames=4, img_size=8, in_chans=1)
    with pytest.raises(DatasetError, match=r"cannot read image .*000002\.png") as info:
        ds[0]
    assert "\n" not in str(info.value)


# --- the encoder ------------------------------------------------------------------------------------------------------
def test_registered_tiny_encoders_make_64_tokens():
    assert {"video_encoder_tiny", "video_smollm2_tiny"} <= set(llamavit.list_models("video_*"))
    model = llamavit.create_model("video_encoder_tiny", num_classes=8).eval()
    assert not model.has_llm and model.pretrained_cfg["first_conv"] == "tokenizer.embed.proj"
    clips = torch.randn(2, 1, 8, 28, 28)
    assert model.forward_features(clips).shape == (2, 1 + 64, 96) and model(clips).shape == (2, 8)
    try:
        find_smollm2_gguf()
    except LLMError as e:
        pytest.skip(str(e))
    frozen = timm.create_model("video_smollm2_tiny", num_classes=8).eval()
    assert frozen.llm_source["source"] == "file" and frozen.llm_source["dim"] == 576
    assert frozen.llm_source["layers"] == [29] and not any(p.requires_grad for p in frozen.llama.parameters())
    with torch.no_grad():
        assert torch.isfinite(frozen(clips)).all()


@pytest.mark.parametrize("llm_path", [None, "random"])
def test_video_encoder_trains_and_round_trips(tmp_path, llm_path):
    kwargs = {**SMALL, **TINY_LLM, "llm_path": llm_path}
    model = llamavit.create_model("video_encoder_tiny", **kwargs)
    frozen = list(model.llama.parameters()) if llm_path else []
    assert model.has_llm == bool(llm_path) and all(not p.requires_grad for p in frozen)
    before = [p.clone() for p in frozen]
    data = SyntheticClips(num_samples=8, num_classes=4, num_frames=4, img_size=16, in_chans=3)
    clips = torch.stack([data[i][0] for i in range(len(data))])
    labels = torch.tensor([data[i][1] for i in range(len(data))])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(30):   # a tiny ViT sits near ln(4) for ~10 steps before it learns
        loss = torch.nn.functional.cross_entropy(model(clips), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert min(losses[-5:]) < 0.9 * losses[0], losses
    assert all(torch.equal(a, b) for a, b in zip(before, frozen))

    model.eval()
    with torch.no_grad():
        expected = model(clips[:2])
    save_file(model.state_dict(), str(tmp_path / "video.safetensors"))
    back = llamavit.create_model("video_encoder_tiny", checkpoint_path=str(tmp_path / "video.safetensors"), **kwargs)
    meta = {"model": "video_encoder_tiny", "model_kwargs": kwargs}
    again = model_from_checkpoint(save_checkpoint(str(tmp_path / "run"), 8, model, meta, {"step": 8}))
    with torch.no_grad():
        assert torch.equal(back.eval()(clips[:2]), expected) and torch.equal(again.eval()(clips[:2]), expected)
