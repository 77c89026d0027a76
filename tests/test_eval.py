"""Evaluation helpers: the resolution sweep, and timm baselines built through create_model."""
import pytest
import torch
import torch.nn as nn

import llamavit
from llamavit.data import TransformConfig
from llamavit.eval import accuracy_by_resolution


class MeanBrightness(nn.Module):
    """4-class logits: class 1 when the mean pixel is positive, else 0; refuses sizes not multiples of 8."""

    def forward(self, x):
        if x.shape[-1] % 8:
            raise ValueError(f"input size {x.shape[-1]} is not a multiple of 8")
        positive = (x.mean(dim=(1, 2, 3)) > 0).float()
        zeros = torch.zeros_like(positive)
        return torch.stack((1 - positive, positive, zeros - 1, zeros - 1), dim=1) * 10


def test_accuracy_by_resolution_reports_each_size_and_refusals():
    tf = TransformConfig(img_size=16, in_chans=3, crop_pct=1.0)
    results = accuracy_by_resolution(MeanBrightness(), "synthetic", [16, 20, 32], tf, batch_size=16)
    assert [r["img_size"] for r in results] == [16, 20, 32]
    assert "is not a multiple of 8" in results[1]["error"] and "top1" not in results[1]
    for r in (results[0], results[2]):
        assert set(r) == {"img_size", "top1", "top5", "loss"}
        assert 0.0 <= r["top1"] <= 100.0 and r["top5"] == 100.0   # four classes: top-5 is everything


def test_accuracy_by_resolution_on_a_real_model_matches_direct_evaluation():
    model = llamavit.create_model("visionllama_small_patch16_224", embed_dim=32, depth=1, num_heads=2,
                                  patch_size=8, img_size=16, num_classes=4, mlp_multiple_of=8,
                                  rope_auto_scale=True).eval()
    tf = TransformConfig(img_size=16, in_chans=3, crop_pct=1.0)
    sweep = accuracy_by_resolution(model, "synthetic", [16, 32], tf)
    assert all("top1" in r for r in sweep)
    from torch.utils.data import DataLoader

    from llamavit.data import build_dataset, build_transform
    from llamavit.eval import evaluate
    ds = build_dataset("synthetic", "val", build_transform(TransformConfig(img_size=32, in_chans=3, crop_pct=1.0),
                                                           False), img_size=32, in_chans=3)
    direct = evaluate(model, DataLoader(ds, batch_size=7))
    assert sweep[1]["top1"] == pytest.approx(direct["top1"]) and sweep[1]["loss"] == pytest.approx(direct["loss"])


def test_timm_prefix_builds_a_timm_model_and_loads_its_checkpoint(tmp_path):
    model = llamavit.create_model("timm:vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=24, depth=1,
                                  num_heads=2, num_classes=3, dynamic_img_size=True)
    assert type(model).__name__ == "VisionTransformer"
    assert model(torch.randn(2, 3, 48, 48)).shape == (2, 3)   # learned positions interpolated
    path = tmp_path / "vit.pth"
    torch.save({"model": model.state_dict()}, path)
    again = llamavit.create_model("timm:vit_tiny_patch16_224", checkpoint_path=str(path), img_size=32, patch_size=8,
                                  embed_dim=24, depth=1, num_heads=2, num_classes=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    with pytest.raises(RuntimeError, match="Unknown model"):
        llamavit.create_model("timm:no_such_model")
