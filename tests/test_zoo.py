"""The weights llamavit ships (llamavit/weights/, models/zoo.py): each reproduces its recorded top-1, loads by name
through llamavit, timm and the CLI; a release from a run round-trips; wrong names are one line."""
import os
import re

import pytest
import timm
import torch

import llamavit
from llamavit.cli import main
from llamavit.eval import evaluate
from llamavit.eval.loaders import eval_loader
from llamavit.models import registry, zoo
from llamavit.release import release_weights

pytestmark = pytest.mark.usefixtures("one_thread")
SHIPPED = zoo.shipped_weights()


def test_weights_are_shipped():
    assert SHIPPED, "llamavit/weights/ holds no shipped model"
    assert set(SHIPPED) <= set(llamavit.list_models(pretrained=True))   # (+ what test_release_round_trip adds)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_weights_reproduce_their_recorded_top1(name):
    own = zoo.read_release(SHIPPED[name])["llamavit"]
    model = llamavit.create_model(name, pretrained=True).eval()
    loader, data, count = eval_loader(SHIPPED[name], subset=zoo.RECORDED_SUBSET)
    assert (data, count) == (own["data"], zoo.RECORDED_SUBSET)
    top1 = evaluate(model, loader)["top1"]
    assert abs(top1 - own["test_top1_first_1000"]) <= 0.5, (name, top1, own["test_top1_first_1000"])
    assert own["test_top1"] > 50 and os.path.isfile(os.path.join(SHIPPED[name], zoo.CARD_NAME))


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_weights_load_by_name_everywhere(name, capsys):
    folder = SHIPPED[name]
    architecture = name.split(".")[0]
    x = torch.randn(2, *zoo.read_release(folder)["pretrained_cfg"]["input_size"],
                    generator=torch.Generator().manual_seed(0))
    ours = llamavit.create_model(architecture, pretrained=True).eval()   # the one tag of the architecture
    with torch.inference_mode():
        reference = ours(x)
        for model in (timm.create_model(name, pretrained=True), timm.create_model(f"local-dir:{folder}",
                                                                                   pretrained=True)):
            assert torch.equal(model.eval()(x), reference)
    untrained = llamavit.create_model(architecture).eval()
    with torch.inference_mode():
        assert not torch.allclose(untrained(x), reference)   # the same architecture, without the weights
    assert main(["models", "--pretrained"]) == 0
    assert name in capsys.readouterr().out.split()
    assert main(["eval", "--model", name, "--subset", "200"]) == 0
    assert main(["eval", "--checkpoint", folder, "--subset", "200"]) == 0
    by_name, by_folder = capsys.readouterr().out.splitlines()
    assert by_name == by_folder and by_name.startswith(f"{zoo.read_release(folder)['llamavit']['data']} (200 images)")


def test_pretrained_without_shipped_weights_is_one_line(capsys):
    with pytest.raises(ValueError, match=r"no shipped weights named 'illama_tiny_patch16_224'; llamavit downloads "
                                         r"no weights; pass checkpoint_path=<official or llamavit checkpoint file>, "
                                         r"or take weights it ships: " + re.escape(", ".join(sorted(SHIPPED)))):
        llamavit.create_model("illama_tiny_patch16_224", pretrained=True)
    assert main(["predict", "x.png", "--model", "illama_nope.fmnist"]) == 2
    assert "no shipped weights named 'illama_nope.fmnist'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["predict", "x.png", "--model", "a.b", "--checkpoint", "c"])
    assert "argument --checkpoint: not allowed with argument --model" in capsys.readouterr().err


def test_release_round_trip(tiny_fm_run, tmp_path, capsys):
    weights = str(tmp_path / "weights")
    own = release_weights(tiny_fm_run, "illama_test_patch7_28.smoke", "A test model.", "Trained by a test.",
                              ["llamavit train ..."], weights_dir=weights)
    folder = os.path.join(weights, "illama_test_patch7_28.smoke")
    assert zoo.shipped_weights(weights) == {"illama_test_patch7_28.smoke": folder}
    config = zoo.read_release(folder)
    assert config["architecture"] == "illama_test_patch7_28" and own["base_model"] == "illama_tiny_patch16_224"
    assert own["test_images"] == 10000 and own["recipe"]["train_subset"] == 256
    assert own["params"] == sum(p.numel() for p in llamavit.create_model("illama_test_patch7_28").parameters())
    model = llamavit.create_model("illama_test_patch7_28.smoke", pretrained=True).eval()
    loader, _, _ = eval_loader(tiny_fm_run, subset=zoo.RECORDED_SUBSET)
    assert evaluate(model, loader)["top1"] == pytest.approx(own["test_top1_first_1000"], abs=0.005)
    card = open(os.path.join(folder, zoo.CARD_NAME)).read()
    assert "# illama_test_patch7_28.smoke" in card and f"top-1 **{own['test_top1']:.2f} %**" in card
    assert "llamavit train ..." in card and "| `train_subset` | `256` |" in card
    with pytest.raises(ValueError, match="exists already; remove it to release illama_test_patch7_28.smoke again"):
        release_weights(tiny_fm_run, "illama_test_patch7_28.smoke", "", "", [], weights_dir=weights)
    with pytest.raises(ValueError, match=r"release name 'Bad-Name' is not <architecture>.<tag>"):
        release_weights(tiny_fm_run, "Bad-Name", "", "", [], weights_dir=weights)
    assert not [d for d in os.listdir(weights) if d.startswith(".tmp")]
    assert registry.shipped_folder("illama_test_patch7_28") == folder
