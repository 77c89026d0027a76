"""`llamavit ablate aim`: the ablation file, the arms' configs, the judging of the paper's claims, the smoke run."""
import json

import pytest

from llamavit.ablation.aim import (Claim, arm_pretrain_config, arm_probe_config, judge_claims, load_aim_ablation,
                                   summarize_arms)
from llamavit.cli import main as cli_main

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = "configs/ablation_aim.yaml"


def write(tmp_path, text):
    path = tmp_path / "ablation.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text,message", [
    ("pretrain: {}\narms: []\n", "no arms"),
    ("pretraining: {}\narms: [{name: a}]\n", r"unknown key\(s\) \['pretraining'\]"),
    ("arms: [{name: a, colour: red}]\n", r"arm 'a' has unknown key\(s\) \['colour'\]"),
    ("arms: [{name: a}, {name: a}]\n", "arm names repeat"),
    ("arms: [{name: b, reuse: a}, {name: a}]\n", "arm 'b' reuses 'a': name an arm above it"),
    ("arms: [{name: a}, {name: b, reuse: a, pretrain: {order: spiral}}]\n", "change only the probe"),
    ("arms: [{name: a, train_fraction: 1.5}]\n", r"train_fraction must be in \(0, 1\]"),
    ("arms: [{name: a}, {name: b}]\nclaims: [{name: c, kind: bigger, arms: [a, b]}]\n", "has kind 'bigger'"),
    ("arms: [{name: a}]\nclaims: [{name: c, kind: geq, arms: [a, z]}]\n", r"unknown: \['z'\]"),
])
def test_bad_ablation_files_are_refused_by_name(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_aim_ablation(write(tmp_path, text))


def test_the_shipped_file_holds_every_claim_of_the_issue():
    ablation = load_aim_ablation(CONFIG)
    kinds = [c.kind for c in ablation.claims]
    assert kinds == ["order", "geq", "greater", "geq", "scaling", "overfit", "longer"]
    names = {a.name for a in ablation.arms}
    assert {"baseline", "pixels", "tokens", "causal", "linear_head", "masked", "narrow", "wide", "data_10pct",
            "schedule_2x", "spiral", "checkerboard", "random_order"} <= names


def test_arm_configs_scale_epochs_and_images(tmp_path):
    ablation = load_aim_ablation(CONFIG)
    arms = {a.name: a for a in ablation.arms}
    base = arm_pretrain_config(ablation, arms["baseline"], 1, str(tmp_path), 60000)
    assert (base.epochs, base.train_subset, base.seed, base.resume) == (1, 0, 1, True)
    assert base.output == str(tmp_path / "baseline" / "seed1" / "pretrain")
    small = arm_pretrain_config(ablation, arms["data_10pct"], 0, str(tmp_path), 60000)
    assert (small.epochs, small.train_subset) == (10, 6000)          # 10 % of the images, the same steps
    cut = arm_pretrain_config(ablation, arms["data_10pct"], 0, str(tmp_path), 60000, train_subset=1000, epochs=2)
    assert (cut.epochs, cut.train_subset) == (20, 100)               # the fraction of the budget's images
    assert arm_pretrain_config(ablation, arms["schedule_2x"], 0, str(tmp_path), 60000).epochs == 2
    wide = arm_pretrain_config(ablation, arms["wide"], 0, str(tmp_path), 60000, batch_size=64)
    assert wide.model_kwargs["embed_dim"] == 128 and wide.batch_size == 64
    tokens = arm_pretrain_config(ablation, arms["tokens"], 0, str(tmp_path), 60000)
    assert (tokens.target, tokens.codebook_size) == ("tokens", 512)
    probe = arm_probe_config(ablation, arms["baseline_probe_causal"], 0, str(tmp_path), "trunk", epochs=2)
    assert (probe.attention, probe.epochs, probe.checkpoint) == ("causal", 2, "trunk")


def _summary(values):
    """Rows as summarize_arms gives them, from {arm: [(probe_top1, val_loss, val_curve), ...] per seed}."""
    runs, arms = [], []
    for arm, seeds in values.items():
        arms.append({"name": arm, "change": ""})
        for seed, (top1, val, curve) in enumerate(seeds):
            runs.append({"arm": arm, "seed": seed, "steps": 10, "train_images": 100, "final_loss": 1.0,
                         "final_val_loss": val, "probe_top1": top1, "pretrain_seconds": 1.0,
                         "val_curve": [{"step": i, "val_loss": v} for i, v in enumerate(curve)]})
    return summarize_arms({"arms": arms, "runs": runs})


def test_claims_are_judged_against_the_seed_spread():
    rows = _summary({"a": [(80.0, 1.0, [1.0]), (80.4, 1.0, [1.0])], "b": [(79.0, 1.1, [1.1]), (79.2, 1.1, [1.1])],
                     "c": [(79.1, 1.2, [1.2]), (78.0, 1.2, [1.2])], "one": [(70.0, 1.3, [1.3])]})
    claims = judge_claims([Claim("a > b > c", "order", ["a", "b", "c"]), Claim("a >= b", "geq", ["a", "b"]),
                           Claim("c > a", "greater", ["c", "a"]), Claim("a > one", "greater", ["a", "one"]),
                           Claim("a > gone", "greater", ["a", "gone"])], rows)
    order, geq, wrong, single, missing = claims
    assert order["outcome"] == "holds" and not order["established"]         # b - c = 0.55 < c's std 0.78
    assert order["differences"][0]["difference"] == pytest.approx(1.1)
    assert order["differences"][0]["beyond_spread"] and not order["differences"][1]["beyond_spread"]
    assert geq["outcome"] == "holds" and geq["established"]
    assert wrong["outcome"] == "does not hold" and wrong["established"]    # established the other way round
    assert single["outcome"] == "holds" and not single["established"]      # one seed is never established
    assert missing["outcome"] == "not measured"


def test_scaling_longer_and_overfit_claims():
    rows = _summary({
        "small": [(70.0, 0.50, [0.6, 0.5, 0.55]), (70.2, 0.51, [0.6, 0.5, 0.56])],   # turns up by ~0.055
        "mid": [(75.0, 0.40, [0.5, 0.45, 0.40]), (75.2, 0.41, [0.5, 0.45, 0.41])],
        "big": [(74.0, 0.30, [0.4, 0.35, 0.30]), (74.3, 0.31, [0.4, 0.35, 0.31])]})
    scaling, longer, overfit, not_overfit = judge_claims(
        [Claim("s", "scaling", ["small", "mid", "big"]), Claim("l", "longer", ["small", "mid"]),
         Claim("o", "overfit", ["small", "mid"]), Claim("o2", "overfit", ["mid", "big"])], rows)
    assert scaling["outcome"] == "does not hold"       # loss falls all the way, but big probes below mid
    assert [g["difference"] > 0 for g in scaling["differences"]] == [True, True, True, False]
    assert longer["outcome"] == "holds" and longer["established"]
    assert overfit["outcome"] == "holds" and overfit["established"]
    assert overfit["differences"][0]["difference"] == pytest.approx(0.055)
    assert not_overfit["outcome"] == "does not hold"   # the first arm's loss keeps falling


def test_smoke_run_writes_the_report_and_resumes(tmp_path, capsys):
    out = tmp_path / "aim"
    cli_main(["ablate", "aim", "--smoke", "--output", str(out)])
    printed = capsys.readouterr().out
    result = json.loads((out / "aim_ablation.json").read_text())
    ablation = load_aim_ablation(CONFIG)
    assert [r["arm"] for r in result["summary"]] == [a.name for a in ablation.arms]
    assert len(result["claims"]) == 7 and all(c["outcome"] in ("holds", "does not hold") for c in result["claims"])
    assert all(r["val_curve"] for r in result["runs"])            # the held-out loss is measured in every arm
    small = next(r for r in result["runs"] if r["arm"] == "data_10pct")
    base = next(r for r in result["runs"] if r["arm"] == "baseline")
    assert small["train_images"] == 32 and small["steps"] == base["steps"]
    table = (out / "aim_ablation.md").read_text()
    assert all(f"| {a.name} |" in table for a in ablation.arms) and "## Claims" in table
    assert (out / "aim_ablation.png").stat().st_size > 10000
    assert "normalised pixels > raw pixels > tokens" in printed
    # a rerun keeps the finished arms (the same numbers, nothing trained again); the report still has them all
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/seed0/*/summary.json")}
    assert len(stamps) == 2 * len(ablation.arms) - 2                  # reusing arms pre-train nothing
    cli_main(["ablate", "aim", "--smoke", "--output", str(out), "--arms", "baseline_probe_causal"])
    again = json.loads((out / "aim_ablation.json").read_text())
    assert again["summary"] == result["summary"] and again["claims"] == result["claims"]
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/seed0/*/summary.json")} == stamps
