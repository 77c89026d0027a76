"""`llamavit ablate llm-layers`: the ablation file, the claims, and a small run end to end (two jobs side by side,
finished runs read back)."""
import json
import os

import pytest
import yaml

from llamavit.ablation.frozen_llm import LLMClaim, judge_llm_claims, load_llm_ablation
from llamavit.cli import main

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "ablation_frozen_llm.yaml")


def write(tmp_path, data, name="ablation.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_the_shipped_file_expands_the_sweep_into_arms():
    ablation = load_llm_ablation(CONFIG)
    names = [a.name for a in ablation.arms]
    assert names == ["vit", "random", "layer_0", "layer_7", "layer_15", "layer_22", "layer_29", "last_2", "last_4"]
    arms = {a.name: a for a in ablation.arms}
    assert arms["vit"].model == "timm:vit_tiny_patch16_224" and "llm_layers" not in arms["vit"].model_kwargs
    assert arms["random"].model_kwargs["llm_path"] == "random" and arms["random"].layers is None
    assert arms["layer_15"].model_kwargs["llm_layers"] == [15] and arms["layer_15"].layers == [15]
    assert arms["last_4"].model_kwargs["llm_layers"] == [-4, -3, -2, -1]
    assert all(a.model_kwargs["patch_size"] == 7 and a.model_kwargs["embed_dim"] == 96 for a in ablation.arms)
    assert [c.kind for c in ablation.claims] == ["greater", "greater", "best_layer", "greater", "filter", "filter"]


@pytest.mark.parametrize("data, message", [
    ({"arms": [{"name": "a", "model": "m"}], "epochs": 3}, "unknown key(s) ['epochs']"),
    ({"sweep": {"layers": [0]}}, "a sweep needs llm_model"),
    ({}, "no arms"),
    ({"arms": [{"name": "a"}]}, "arm 0 needs name and model"),
    ({"arms": [{"name": "a", "model": "m"}, {"name": "a", "model": "n"}]}, "arm names repeat"),
    ({"arms": [{"name": "a", "model": "m"}], "claims": [{"name": "c", "kind": "bigger", "arms": ["a"]}]},
     "has kind 'bigger'"),
    ({"arms": [{"name": "a", "model": "m"}], "claims": [{"name": "c", "kind": "greater", "arms": ["a", "b"]}]},
     "names unknown arm(s) ['b']"),
])
def test_bad_ablation_files_are_refused_by_name(tmp_path, data, message):
    with pytest.raises(ValueError) as e:
        load_llm_ablation(write(tmp_path, data))
    assert message in str(e.value)


def row(arm, top1, std, layers=None, gain=0.0, gain_std=0.0, seeds=(0, 1)):
    return {"arm": arm, "layers": layers, "seeds": list(seeds), "top1": {"mean": top1, "std": std},
            "ap_gain": {"mean": gain, "std": gain_std}}


def test_claims_are_judged_against_the_seed_spread():
    summary = [row("vit", 80.0, 0.2), row("random", 81.0, 0.3), row("layer_0", 82.5, 0.2, [0], gain=0.05),
               row("layer_29", 81.2, 0.4, [29], gain=0.01, gain_std=0.005)]
    claims = [LLMClaim("helps", "greater", ["layer_29", "vit"]), LLMClaim("beats random", "greater",
                                                                         ["layer_29", "random"]),
              LLMClaim("layers differ", "best_layer"), LLMClaim("filters", "filter", ["layer_29", "vit"]),
              LLMClaim("not run", "greater", ["last_4", "vit"])]
    helps, random, layers, filters, not_run = judge_llm_claims(claims, summary)
    assert helps["outcome"] == "holds" and helps["established"]                    # +1.2 > 0.4
    assert helps["differences"][0]["difference"] == pytest.approx(1.2)
    assert random["outcome"] == "holds" and not random["established"]               # +0.2 < 0.4
    assert layers["best"] == "layer_0" and layers["outcome"] == "holds" and layers["established"]
    assert filters["outcome"] == "holds" and filters["established"]                 # 0.01 > 0.005
    assert not_run["outcome"] == "not measured" and not not_run["established"]
    one_seed = [row("vit", 80.0, 0.0, seeds=(0,)), row("layer_29", 85.0, 0.0, [29], seeds=(0,))]
    (claim,) = judge_llm_claims([LLMClaim("helps", "greater", ["layer_29", "vit"])], one_seed)
    assert claim["outcome"] == "holds" and not claim["established"]                 # one seed establishes nothing
    last_best = [row("layer_0", 80.0, 0.1, [0]), row("layer_29", 81.0, 0.1, [29])]
    (claim,) = judge_llm_claims([LLMClaim("layers differ", "best_layer")], last_best)
    assert claim["best"] == "layer_29" and claim["outcome"] == "does not hold"
    (claim,) = judge_llm_claims([LLMClaim("layers differ", "best_layer")], last_best[1:])
    assert claim["outcome"] == "not measured"                                       # one layer is no choice


def test_ablate_llm_layers_end_to_end(tmp_path, capsys):
    data = {"train": {"img_size": 32, "in_chans": 3, "data": "synthetic", "epochs": 1, "batch_size": 16,
                      "train_subset": 32, "val_subset": 16, "crop_pct": 1.0, "progress": False},
            "model_options": {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
            "base_model": "timm:vit_tiny_patch16_224", "llm_model": "vit_smollm2_tiny_patch16_224",
            "arms": [{"name": "vit", "change": "alone", "model": "base_model"},
                     {"name": "random", "change": "random block", "model": "llm_model",
                      "model_kwargs": {"llm_path": "random"}}],
            "sweep": {"layers": [29]}, "score_images": 8, "foreground_threshold": 0.9,
            "claims": [{"name": "helps", "kind": "greater", "arms": ["layer_29", "vit"]},
                       {"name": "filters", "kind": "filter", "arms": ["layer_29", "random"]}]}
    out = tmp_path / "out"
    args = ["ablate", "llm-layers", "--config", write(tmp_path, data), "--output", str(out), "--seeds", "0", "1",
            "--jobs", "2", "--threads", "1", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| layer_29 | LLM layer 29 as the frozen block |" in printed and "- helps: **" in printed
    result = json.load(open(out / "frozen_llm_ablation.json"))
    assert [(r["arm"], r["seed"]) for r in result["runs"]] == [("vit", 0), ("vit", 1), ("random", 0), ("random", 1),
                                                              ("layer_29", 0), ("layer_29", 1)]
    assert result["jobs"] == 2 and result["threads_per_job"] == 1
    rows = {r["arm"]: r for r in result["summary"]}
    assert rows["vit"]["ap_gain"]["mean"] == 0.0                       # no block: before = after
    assert set(result["runs"][4]["filter"]) == {"block0", "block1", "llm_layer0", "llm_out"}
    assert 0 <= rows["layer_29"]["ap_after"]["mean"] <= 1 and rows["layer_29"]["trainable_params"] < \
        rows["layer_29"]["params"]
    assert all(0 <= r["top1"] <= 100 for r in result["runs"])
    assert {c["claim"] for c in result["claims"]} == {"helps", "filters"}
    for ext in ("md", "png"):
        assert (out / f"frozen_llm_ablation.{ext}").stat().st_size > 100
    stamp = os.path.getmtime(out / "vit" / "seed0" / "summary.json")
    assert main(args[:-5] + ["--seeds", "0", "1", "--arms", "vit"]) == 0     # nothing left to train: read back
    again = json.load(open(out / "frozen_llm_ablation.json"))
    assert os.path.getmtime(out / "vit" / "seed0" / "summary.json") == stamp
    assert [r["top1"] for r in again["runs"]] == [r["top1"] for r in result["runs"]]
