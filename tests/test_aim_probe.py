"""Probing and fine-tuning end to end on a tiny Fashion-MNIST subset, after a tiny AIM pre-training."""
import json

import pytest
import torch
from safetensors.torch import load_file

import llamavit
from llamavit.cli import main as cli_main
from llamavit.data import DatasetError, FashionMNIST
from llamavit.models import load_backbone
from llamavit.train import resolve_checkpoint
from llamavit.models.convert import CheckpointError
from llamavit.train.pretrain import PretrainConfig, pretrain
from llamavit.train.probe import ProbeConfig, Prober

TINY = dict(embed_dim=32, depth=2, num_heads=2, patch_size=7, probe_layers=1)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    try:
        FashionMNIST(train=False)
    except DatasetError as e:
        pytest.skip(str(e))
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("aim") / "pretrain"
    pretrain(PretrainConfig(model_kwargs=TINY, img_size=28, in_chans=1, train_subset=128, decoder_dim=32,
                            decoder_depth=1, epochs=1, batch_size=64, output=str(out), progress=False))
    return out


def _summary(capsys):
    out = capsys.readouterr().out
    return json.loads(out[out.index("{"):])     # the summary follows any progress lines


@pytest.mark.parametrize("head", ["attentive", "linear"])
def test_cli_probe_learns_on_fashion_mnist(pretrained, tmp_path, capsys, head):
    code = cli_main(["probe", "--checkpoint", str(pretrained), "--head", head, "--train-subset", "512",
                     "--val-subset", "256", "--epochs", "3", "--batch-size", "64", "--lr", "3e-3",
                     "--output", str(tmp_path / head), "--no-progress"])
    assert code == 0
    summary = _summary(capsys)
    assert summary["head"] == head and summary["model"] == "aim_600m_patch14_224"
    assert summary["val_top1"] > 15.0        # chance is 10 %
    assert (tmp_path / head / "head.safetensors").is_file()


def test_frozen_features_are_computed_once(pretrained, tmp_path, monkeypatch):
    calls = []
    real = llamavit.models.aim.AIM.forward_features

    def counting(self, x, attn_mask=None):
        calls.append(x.shape[0])
        return real(self, x, attn_mask)

    monkeypatch.setattr(llamavit.models.aim.AIM, "forward_features", counting)
    prober = Prober(ProbeConfig(checkpoint=str(pretrained), train_subset=128, val_subset=64, epochs=2,
                                batch_size=32, output=str(tmp_path), progress=False))
    assert sum(calls) == 128 + 64
    trunk_before = {k: v.clone() for k, v in prober.trunk.state_dict().items()}
    prober.fit()
    assert sum(calls) == 128 + 64            # two epochs of probing ran on the cache
    assert all(torch.equal(v, prober.trunk.state_dict()[k]) for k, v in trunk_before.items())


def test_random_trunk_probe_and_load_backbone_errors(pretrained, tmp_path):
    summary = Prober(ProbeConfig(model="aim_600m_patch14_224", model_kwargs=TINY, img_size=28, in_chans=1,
                                 head="linear", train_subset=64, val_subset=32, epochs=1, batch_size=32,
                                 output=str(tmp_path), progress=False)).fit()
    assert summary["checkpoint"] is None and 0 <= summary["val_top1"] <= 100
    wrong = llamavit.create_model("aim_600m_patch14_224", num_classes=3, img_size=28, in_chans=1,
                                  **{**TINY, "embed_dim": 48, "num_heads": 3})
    with pytest.raises(CheckpointError, match="lacks trunk weights"):
        load_backbone(wrong, resolve_checkpoint(str(pretrained)))
    with pytest.raises(ValueError, match="give a checkpoint"):
        ProbeConfig()


def test_cli_finetune_starts_from_the_pretrained_trunk(pretrained, tmp_path, capsys):
    out = tmp_path / "ft"
    code = cli_main(["finetune", "--checkpoint-path", str(pretrained), "--train-subset", "128", "--val-subset", "64",
                     "--epochs", "1", "--batch-size", "64", "--lr", "0", "--warmup-lr", "0", "--min-lr", "0",
                     "--output", str(out), "--no-progress"])
    assert code == 0
    assert "val_top1" in _summary(capsys)
    pre = load_file(str(pretrained / "checkpoints" / "step-00000002" / "model.safetensors"))
    post = load_file(str(out / "checkpoints" / "step-00000002" / "model.safetensors"))
    assert post["head.linear.weight"].shape == (10, 32)        # a fresh 10-class classifier
    trunk = [k for k in pre if k.startswith(("preprocessor.", "trunk."))]
    assert trunk and all(torch.equal(pre[k], post[k]) for k in trunk)   # lr 0: the loaded trunk, unchanged
