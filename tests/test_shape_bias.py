"""Shape-texture bias: the cue-conflict builder (shape from A, texture from B, deterministic), Geirhos et al.'s score
against hand-counted cases, `llamavit analyze shape-bias` end to end, and its one-line refusals."""
import json
import os

import pytest
import torch

from llamavit.cli import main
from llamavit.eval.shape_bias import (TEXTURE_FLOOR, build_cue_conflict_set, cue_conflict, shape_bias_score,
                                      silhouette, texture_patch, tile)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cue_conflict_by_hand():
    shape = torch.zeros(6, 6)
    shape[1:5, 2:4] = 0.8                       # a 4 x 2 bar: the silhouette
    texture = torch.zeros(6, 6)
    texture[0:2, 0:2] = torch.tensor([[0.2, 0.6], [1.0, 0.6]])   # the only foreground window of side 2
    patch = texture_patch(texture, patch=2)
    # min-max scaled to [0.25, 1]: 0.2 -> 0.25, 0.6 -> 0.625, 1.0 -> 1
    torch.testing.assert_close(patch, torch.tensor([[0.25, 0.625], [1.0, 0.625]]))
    tiled = tile(patch, 6, 6)
    torch.testing.assert_close(tiled[:2, :4], torch.cat((patch, patch.flip(1)), dim=1))   # mirrored neighbour
    torch.testing.assert_close(tiled[2:4, :2], patch.flip(0))
    out = cue_conflict(shape, texture, patch=2)
    inside = silhouette(shape)
    torch.testing.assert_close(out[inside], tiled[inside])
    assert (out[~inside] == 0).all() and (out[inside] >= TEXTURE_FLOOR).all()
    assert torch.equal(silhouette(out), inside)   # the shape survives, whatever the texture


def test_cue_conflict_set_is_deterministic_with_shape_from_a_and_texture_from_b():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(20, 12, 12, generator=g) * (torch.rand(20, 12, 12, generator=g) > 0.5)
    labels = torch.arange(20) % 4
    cue = build_cue_conflict_set(images, labels, 10, seed=3, patch=4)
    again = build_cue_conflict_set(images, labels, 10, seed=3, patch=4)
    other = build_cue_conflict_set(images, labels, 10, seed=4, patch=4)
    assert all(torch.equal(cue[k], again[k]) for k in cue)
    assert not torch.equal(cue["texture_index"], other["texture_index"])
    assert cue["images"].shape == (10, 1, 12, 12)
    assert torch.equal(cue["shape_labels"], labels[:10])
    assert torch.equal(cue["texture_labels"], labels[cue["texture_index"]])
    assert (cue["shape_labels"] != cue["texture_labels"]).all()
    for i, j in zip(cue["shape_index"].tolist(), cue["texture_index"].tolist()):
        assert torch.equal(silhouette(cue["images"][i, 0]), silhouette(images[i]))
        texture = tile(texture_patch(images[j], 4), 12, 12)
        inside = silhouette(images[i])
        torch.testing.assert_close(cue["images"][i, 0][inside], texture[inside])


def test_shape_bias_score_by_hand():
    shape = torch.tensor([0, 0, 1, 1, 2, 2])
    texture = torch.tensor([1, 2, 0, 2, 0, 1])
    predicted = torch.tensor([0, 2, 1, 1, 0, 3])   # shape, texture, shape, shape, texture, neither
    r = shape_bias_score(predicted, shape, texture, classes=["a", "b", "c", "d"])
    assert (r["shape_decisions"], r["texture_decisions"], r["other_decisions"]) == (3, 2, 1)
    assert r["shape_bias"] == pytest.approx(3 / 5) and r["cue_fraction"] == pytest.approx(5 / 6)
    assert r["shape_bias_per_class"] == {"a": 0.5, "b": 1.0, "c": 0.0}
    assert shape_bias_score(torch.tensor([3]), torch.tensor([0]), torch.tensor([1]))["shape_bias"] is None


def test_bad_cue_conflict_inputs_are_one_line():
    images, labels = torch.rand(4, 8, 8), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="count must be in 1..4, got 5"):
        build_cue_conflict_set(images, labels, 5)
    with pytest.raises(ValueError, match="needs items of at least two classes"):
        build_cue_conflict_set(images, torch.zeros(4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"expected images \(N, H, W\) and labels \(N,\)"):
        build_cue_conflict_set(images[:, None], labels, 2)
    with pytest.raises(ValueError, match="texture patch 9 must be in 1..8"):
        texture_patch(images[0], 9)
    with pytest.raises(ValueError, match="needs a shape class other than its texture class"):
        shape_bias_score(torch.tensor([0]), torch.tensor([1]), torch.tensor([1]))


def test_cli_shape_bias_of_two_models(tiny_fm_run, tmp_path, capsys):
    other = str(tmp_path / "vit")
    assert main(["train", "--model", "timm:vit_tiny_patch16_224", "--model-kwargs", "patch_size=7", "embed_dim=32",
                 "depth=2", "num_heads=2", "--img-size", "28", "--in-chans", "1", "--data", "fashion_mnist",
                 "--train-subset", "256", "--val-subset", "32", "--batch-size", "32", "--epochs", "1",
                 "--no-progress", "--output", other]) == 0
    capsys.readouterr()
    out = str(tmp_path / "bias")
    assert main(["analyze", "shape-bias", "--checkpoint", tiny_fm_run, other, "--count", "64", "--output", out]) == 0
    printed = capsys.readouterr().out
    assert "fashion_mnist: 64 cue-conflict images (seed 0, texture window 8 px)" in printed
    result = json.load(open(os.path.join(out, "shape_bias.json")))
    assert set(result["models"]) == {"illama", "vit"} and len(result["set"]["shape_labels"]) == 64
    for r in result["models"].values():
        assert r["shape_decisions"] + r["texture_decisions"] + r["other_decisions"] == 64
        assert r["shape_bias"] is None or 0 <= r["shape_bias"] <= 1
    assert os.path.getsize(os.path.join(out, "shape_bias_examples.png")) > 10_000


def test_cli_shape_bias_refuses_another_dataset_in_one_line(tiny_fm_run, tmp_path, capsys):
    assert main(["analyze", "shape-bias", "--checkpoint", tiny_fm_run, "--data", "synthetic", "--count", "8",
                 "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "predicts 10 classes other than synthetic's: shape bias needs a model of the dataset's classes" in err
    assert "Traceback" not in err


def test_models_are_named_by_the_shortest_path_tails_that_differ():
    from llamavit.cli_analyses import short_names
    assert short_names(["runs/race/illama/seed0", "runs/race/vit/seed0", "runs/race/illama/seed1"]) == {
        "runs/race/illama/seed0": "illama/seed0", "runs/race/vit/seed0": "vit/seed0",
        "runs/race/illama/seed1": "illama/seed1"}
    assert short_names(["a/run", "b/other/"]) == {"a/run": "run", "b/other/": "other"}
    with pytest.raises(ValueError, match="a checkpoint is given twice: x/run x/run/"):
        short_names(["x/run", "x/run/"])
