"""Point clouds: FPS and k-NN grouping, the PointBERT tokenizer, point files and folders, Fashion-MNIST as points,
and the point encoder with and without the frozen LLM block (training, frozen weights, checkpoints)."""
import numpy as np
import pytest
import torch
from plyfile import PlyData, PlyElement
from safetensors.torch import save_file

import llamavit
from llamavit.data import (FMNIST_THRESHOLD, FashionMNISTPoints, PointFolder, SyntheticPoints, build_point_dataset,
                           read_point_file)
from llamavit.errors import DatasetError
from llamavit.llm import LLMError, find_smollm2_gguf
from llamavit.models.point_encoder import PointTokenizer, farthest_point_sample, knn_group

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: a second thread costs more than it saves
SMALL = dict(embed_dim=32, depth=1, num_heads=2, num_groups=8, group_size=4, num_classes=4)
TINY_LLM = dict(llm_dim=32, llm_num_heads=4, llm_num_kv_heads=2, llm_ffn_hidden=64, llm_num_layers=2)


def on_x_axis(*xs):
    return torch.tensor([[x, 0.0, 0.0] for x in xs])


# --- grouping ---------------------------------------------------------------------------------------------------------
def test_fps_hand_example_batched():
    # cloud a from x=0: 10 (farthest), then 5, then 8.5 (1.5 from 10, while 1 is 1 from 0)
    # cloud b from x=4: 10, then 0, then 8.5
    xyz = torch.stack([on_x_axis(0, 1, 8.5, 10, 5), on_x_axis(4, 10, 0, 1, 8.5)])
    assert farthest_point_sample(xyz, 4).tolist() == [[0, 3, 4, 2], [0, 1, 2, 4]]
    with pytest.raises(ValueError, match=r"num_groups must be in \[1, 5\]"):
        farthest_point_sample(xyz, 6)


def test_fps_picks_one_point_per_far_cluster():
    corners = torch.tensor([[0.0, 0, 0], [10, 0, 0], [0, 10, 0], [0, 0, 10]])
    xyz = (corners.repeat_interleave(25, dim=0) + 0.1 * torch.randn(100, 3))[torch.randperm(100)][None]
    picked = farthest_point_sample(xyz, 4)[0]
    cluster = (xyz[0, picked, None] - corners).norm(dim=-1).argmin(dim=-1)
    assert sorted(cluster.tolist()) == [0, 1, 2, 3]


def test_knn_groups_are_the_true_nearest_neighbours():
    xyz, centers = torch.randn(2, 40, 3), torch.randn(2, 5, 3)
    got = knn_group(xyz, centers, 7)
    assert got.shape == (2, 5, 7)
    brute = ((centers[:, :, None] - xyz[:, None]) ** 2).sum(-1).argsort(dim=-1)[..., :7]
    assert torch.equal(got, brute)
    with pytest.raises(ValueError, match=r"group_size must be in \[1, 40\]"):
        knn_group(xyz, centers, 41)


def test_tokenizer_shapes_permutation_invariance_and_errors():
    tok = PointTokenizer(in_chans=4, num_groups=8, group_size=16, embed_dim=32).eval()
    points = torch.randn(2, 64, 4)
    with torch.no_grad():
        tokens, positions = tok(points)
        assert tokens.shape == positions.shape == (2, 8, 32)
        perm = torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(63) + 1])   # point 0 starts FPS
        tokens2, positions2 = tok(points[:, perm])
    assert torch.allclose(tokens, tokens2, atol=1e-5) and torch.allclose(positions, positions2, atol=1e-6)
    with pytest.raises(ValueError, match=r"points must be \(B, N, 4\).*got \(2, 64, 3\)"):
        tok(torch.randn(2, 64, 3))
    with pytest.raises(ValueError, match=r"got \(64, 4\)"):
        tok(torch.randn(64, 4))
    with pytest.raises(ValueError, match=r"a cloud of 10 points is too small for 8 groups of 16"):
        tok(torch.randn(2, 10, 4))


# --- reading files ----------------------------------------------------------------------------------------------------
def write_ply(path, columns: dict, text: bool):
    vertex = np.empty(len(next(iter(columns.values()))), dtype=[(k, "f4") for k in columns])
    for k, v in columns.items():
        vertex[k] = v
    PlyData([PlyElement.describe(vertex, "vertex")], text=text).write(str(path))
    return path


@pytest.fixture
def cloud():
    return np.random.default_rng(0).normal(size=(20, 6)).astype(np.float32)


@pytest.mark.parametrize("fmt", ["npy", "txt comma", "txt space", "csv", "xyz", "ply ascii", "ply binary"])
def test_each_format_round_trips(tmp_path, cloud, fmt):
    kind = fmt.split()[0]
    path = tmp_path / f"cloud.{kind}"
    if kind == "npy":
        np.save(path, cloud)
    elif kind == "ply":
        write_ply(path, dict(zip(["x", "y", "z", "nx", "ny", "nz"], cloud.T)), text=fmt.endswith("ascii"))
    else:
        np.savetxt(path, cloud, delimiter="," if fmt in ("txt comma", "csv") else " ")
    got = read_point_file(path)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, cloud)


def test_ply_xyz_first_then_other_properties_in_file_order(tmp_path, cloud):
    path = write_ply(tmp_path / "c.ply", {"nx": cloud[:, 3], "x": cloud[:, 0], "y": cloud[:, 1], "red": cloud[:, 4],
                                          "z": cloud[:, 2]}, text=False)
    np.testing.assert_array_equal(read_point_file(path), cloud[:, [0, 1, 2, 3, 4]])


def _bad_files(tmp_path):
    """case -> (writer returning the file's path, the message expected)."""
    def at(name, how):
        def write():
            how(tmp_path / name)
            return tmp_path / name
        return write

    def text(name, content):
        return at(name, lambda p: p.write_text(content))

    def npy(name, array):
        return at(name, lambda p: np.save(p, array))

    def vertex_less(p):
        PlyData([PlyElement.describe(np.zeros(2, [("x", "f4")]), "face")], text=True).write(str(p))

    return {
        "short row": (text("x.txt", "1 2 3\n4 5 6\n7 8\n"),
                      r"x\.txt: row 3 has 2 columns; a point file needs at least 3 \(x y z \[features\.\.\.\]\)$"),
        "ragged rows": (text("r.csv", "1,2,3\n4,5,6,7\n"), r"r\.csv: row 2 has 4 columns but row 1 has 3"),
        "not a number": (text("n.xyz", "1 2 3\n4 abc 6\n"), r"n\.xyz: row 2, column 2 is 'abc', not a number"),
        "empty text": (text("e.txt", "\n\n"), r"e\.txt: the file holds no points"),
        "NaN": (text("nan.txt", "1 2 3\nnan 1 1\n"), r"nan\.txt: point 2 holds NaN or infinite values"),
        "binary as text": (at("b.txt", lambda p: p.write_bytes(b"\xff\xfe\x00\x81")), r"b\.txt: not a text file"),
        "1-D npy": (npy("one.npy", np.arange(12.0)), r"one\.npy: a 1-D array of shape \(12,\); a \.npy point file "
                                                      r"holds a 2-D array"),
        "2 columns npy": (npy("two.npy", np.zeros((5, 2))), r"two\.npy: the array has 2 columns"),
        "empty npy": (npy("empty.npy", np.zeros((0, 3))), r"empty\.npy: the file holds no points"),
        "NaN npy": (npy("nan.npy", np.array([[0, 0, 0], [0, np.inf, 0.0]])), r"nan\.npy: point 2 holds NaN"),
        "object npy": (npy("obj.npy", np.empty(2, dtype=object)), r"obj\.npy: not a readable \.npy array"),
        "ply without xyz": (at("abc.ply", lambda p: write_ply(p, {"a": [1.0], "b": [2.0], "c": [3.0]}, True)),
                            r"abc\.ply: the vertex element has no x, y, z \(its properties: a, b, c\)"),
        "ply without vertex": (at("f.ply", vertex_less), r"f\.ply: no 'vertex' element \(it has: face\)"),
        "garbage ply": (text("g.ply", "this is not a ply file\n"), r"g\.ply: not a readable \.ply file"),
        "missing file": (at("gone.npy", lambda p: None), r"gone\.npy: cannot read the file \(No such file"),
        "unknown extension": (text("mesh.obj", "v 1 2 3\n"), r"mesh\.obj: unknown point file extension '\.obj'; "
                                                             r"expected one of \.npy, \.txt, \.csv, \.xyz, \.ply"),
    }


@pytest.mark.parametrize("case", list(_bad_files(None)))   # the writers only use tmp_path when called
def test_bad_point_files_give_one_clear_line(tmp_path, case):
    write, message = _bad_files(tmp_path)[case]
    path = write()
    with pytest.raises(DatasetError, match=message) as info:
        read_point_file(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


# --- folders ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def folder(tmp_path):
    """root/{train,val}/{chair,table}: a 300-point and a 30-point cloud, 6 columns, in two formats."""
    rng = np.random.default_rng(1)
    clouds = {}
    for split in ("train", "val"):
        for name in ("chair", "table"):
            d = tmp_path / split / name
            d.mkdir(parents=True)
            big = (rng.normal(size=(300, 6)) * 3 + 5).astype(np.float32)
            small = rng.normal(size=(30, 6)).astype(np.float32)
            np.save(d / "a.npy", big)
            np.savetxt(d / "b.txt", small, delimiter=",")
            (d / "notes.md").write_text("ignored")
            clouds[split, name] = big, small
    return tmp_path, clouds


def test_point_folder_classes_sampling_and_unit_sphere(folder):
    root, clouds = folder
    ds = PointFolder(str(root), "val", num_points=64, in_chans=3, train=False)
    assert ds.classes == ["chair", "table"] and len(ds) == 4 and [label for _, label in ds.samples] == [0, 0, 1, 1]
    points, label = ds[0]
    assert points.dtype == torch.float32 and points.shape == (64, 3) and label == 0
    assert torch.allclose(points.mean(0), torch.zeros(3), atol=1e-5)
    assert torch.isclose(points.norm(dim=1).max(), torch.tensor(1.0), atol=1e-6)
    assert torch.equal(ds[0][0], points)   # evaluation: the same sample every time
    assert len(torch.unique(points, dim=0)) == 64   # more points than asked: a subset, no repeats
    # as many points as the file: all of them, centred on their mean and scaled to radius 1
    whole = PointFolder(str(root), "val", num_points=300, in_chans=3, train=False)[0][0]
    xyz = torch.from_numpy(clouds["val", "chair"][0][:, :3]).double()
    expected = (xyz - xyz.mean(0)) / (xyz - xyz.mean(0)).norm(dim=1).max()
    assert torch.allclose(whole[whole[:, 0].argsort()].double(), expected[expected[:, 0].argsort()], atol=1e-5)
    small_points, _ = ds[1]   # 30 points for 64: every point at least once
    assert len(torch.unique(small_points, dim=0)) == 30

    wide = PointFolder(str(root), "val", num_points=64, in_chans=4, train=False)[1][0]
    assert wide.shape == (64, 4)
    assert set(wide[:, 3].tolist()) == set(torch.from_numpy(clouds["val", "chair"][1][:, 3]).tolist())
    with pytest.raises(DatasetError, match=r"b\.txt: 6 columns, but in_chans=7 asks for x y z and 4 feature"):
        PointFolder(str(root), "val", num_points=64, in_chans=7)[1]


def test_point_folder_training_augmentation_is_seeded_by_the_global_generator(folder):
    ds = build_point_dataset(str(folder[0]), "train", 64, 3, train=True)
    torch.manual_seed(3)
    a = ds[0][0]
    torch.manual_seed(3)
    assert torch.equal(ds[0][0], a)
    torch.manual_seed(4)
    assert not torch.equal(ds[0][0], a)
    # scaled by [2/3, 3/2] per axis and shifted by [-0.2, 0.2]: no longer on the unit sphere, still near it
    radius = a.norm(dim=1).max()
    assert 0.5 < radius < 1.9 and not torch.isclose(radius, torch.tensor(1.0), atol=1e-4)


def test_point_folder_tree_errors(tmp_path, folder):
    root, _ = folder
    (root / "val" / "table" / "a.npy").unlink()
    (root / "val" / "table" / "b.txt").unlink()
    with pytest.raises(DatasetError, match=r"class folder .*val/table holds no point files"):
        PointFolder(str(root), "val")
    only_train = tmp_path / "only_train"
    (only_train / "train" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"has train/ but no val/"):
        build_point_dataset(str(only_train), "val", 64, 3, train=False)
    with pytest.raises(DatasetError, match=r"point dataset '.*missing' is neither"):
        build_point_dataset(str(tmp_path / "missing"), "train", 64, 3, train=True)
    with pytest.raises(ValueError, match=r"split must be 'train' or 'val'"):
        build_point_dataset("synthetic", "test", 64, 3, train=False)


# --- Fashion-MNIST and synthetic points -------------------------------------------------------------------------------
def test_fashion_mnist_points_lie_on_bright_pixels():
    try:
        ds = FashionMNISTPoints(train=False, num_points=200, in_chans=4)
    except DatasetError as e:
        pytest.skip(str(e))
    assert len(ds) == 10_000 and len(ds.classes) == 10
    points, label = ds[7]
    assert points.shape == (200, 4) and label == int(ds.labels[7])
    assert torch.equal(ds[7][0], points)
    x, y, z, intensity = points.unbind(dim=1)
    assert x.abs().max() <= 1 and y.abs().max() <= 1 and (z == 0).all()
    image = ds.images[7].float() / 255
    col = ((x + 1) / 2 * 28).long().clamp(0, 27)
    row = ((1 - y) / 2 * 28).long().clamp(0, 27)
    assert (image[row, col] > FMNIST_THRESHOLD).all()
    assert torch.allclose(image[row, col], intensity)
    assert FashionMNISTPoints(train=False, num_points=50, in_chans=3)[7][0].shape == (50, 3)
    with pytest.raises(DatasetError, match=r"in_chans must be 3 or 4, got 5"):
        FashionMNISTPoints(train=False, in_chans=5)


def test_synthetic_points_deterministic_and_split_seeds():
    a, b = SyntheticPoints(8, 4, 32, 5, seed=1), SyntheticPoints(8, 4, 32, 5, seed=1)
    assert torch.equal(a.points, b.points) and a.points.shape == (8, 32, 5)
    assert [a[i][1] for i in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3] and a.classes == [f"class_{i}" for i in range(4)]
    train, val = (build_point_dataset("synthetic", s, 32, 3, train=s == "train") for s in ("train", "val"))
    assert train.classes == val.classes and not torch.equal(train.points, val.points)


# --- the encoder ------------------------------------------------------------------------------------------------------
def train_a_few_steps(model, steps=10):
    data = SyntheticPoints(16, 4, 32, 3, seed=0)
    x, y = data.points, data.labels
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3)
    losses = []
    model.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, opt


@pytest.mark.parametrize("llm_path", [None, "random"])
def test_point_encoder_trains_and_round_trips(tmp_path, llm_path):
    kwargs = dict(SMALL, llm_path=llm_path, **(TINY_LLM if llm_path else {}))
    model = llamavit.create_model("point_encoder_tiny", **kwargs)
    assert model.global_pool == "token_max" and model.has_llm == (llm_path is not None)
    frozen = {n: p.clone() for n, p in model.named_parameters() if n.startswith("llama.")}
    assert bool(frozen) == (llm_path is not None)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.startswith("llama."))
    losses, opt = train_a_few_steps(model)
    assert losses[-1] < 0.7 * losses[0], losses
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if name.startswith("llama."):
            assert id(p) not in in_opt and torch.equal(p, frozen[name])

    path = str(tmp_path / "model.safetensors")
    save_file(model.state_dict(), path)
    back = llamavit.create_model("point_encoder_tiny", checkpoint_path=path, **kwargs).eval()
    x = torch.randn(3, 32, 3)
    with torch.no_grad():
        assert torch.equal(back(x), model.eval()(x))


def test_registered_point_models_and_smollm2_block(tmp_path):
    assert llamavit.list_models("point_*") == ["point_encoder_tiny", "point_smollm2_tiny"]
    tiny = llamavit.create_model("point_encoder_tiny")
    assert (tiny.cfg.embed_dim, tiny.cfg.depth, tiny.cfg.num_groups, tiny.cfg.group_size) == (96, 4, 32, 16)
    assert not tiny.has_llm and tiny.num_classes == 40 and tiny.tokenizer.in_chans == 3
    try:
        find_smollm2_gguf()
    except LLMError as e:
        pytest.skip(str(e))
    kwargs = dict(embed_dim=32, depth=1, num_heads=2, num_groups=8, group_size=8, num_classes=3, in_chans=4)
    model = llamavit.create_model("point_smollm2_tiny", **kwargs).eval()
    assert model.llm_source["source"] == "file" and model.llm_source["layers"] == [29]
    assert all(not p.requires_grad for p in model.llama.parameters())
    sd = model.state_dict()
    assert not any(k.startswith("llama.layers.") for k in sd) and "llama.llm_sha256" in sd
    path = str(tmp_path / "model.safetensors")
    save_file(sd, path)
    back = llamavit.create_model("point_smollm2_tiny", checkpoint_path=path, **kwargs).eval()
    x = torch.randn(2, 32, 4)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 3) and torch.equal(back(x), out)
