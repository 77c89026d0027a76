"""AIM's ablations as data (configs/ablation_aim.yaml): every arm pre-trains a trunk under the same budget, an
attentive probe is trained on its cached features, and each of the paper's claims is judged from the arms.

An ablation file holds
    pretrain: {PretrainConfig options shared by every arm}     probe: {ProbeConfig options of every probe}
    arms: [{name, change, pretrain: {options}, probe: {options}, epochs_factor, train_fraction, reuse}, ...]
    claims: [{name, kind, arms: [...]}, ...]
Arms are NOT cumulative: each changes the shared options by its own. `epochs_factor` multiplies the shared
epochs (2 = a 2x schedule); `train_fraction` keeps that share of the training images (with epochs_factor
1 / fraction the arm trains as many steps on fewer images); `reuse: ARM` probes ARM's pre-trained trunk (an
arm that changes only the probe). Claim kinds, judged on the means over seeds:
    order   arms best first: probe top-1 falls along the list         (normalised > pixels > tokens)
    geq     probe top-1 of arms[0] >= arms[1]                           (prefix >= causal, AR >= masked)
    greater probe top-1 of arms[0] > arms[1]                            (MLP head > linear)
    scaling arms small to large: held-out loss falls and probe top-1 rises
    longer  arms[1] (the longer schedule) has the lower held-out loss and the higher probe top-1
    overfit arms[0] (less data): its held-out loss turns upward (final - minimum above its seed spread);
            arms[1] (all data): it does not
A claim is `holds` or `does not hold`; it is `established` when every difference it rests on is larger
than the spread (the larger std over seeds of the two arms compared; one seed is never established).
Each arm and seed trains into <output>/<arm>/seed<k>/{pretrain,probe}; a rerun skips finished arms and
resumes interrupted ones.
"""
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import yaml

from ..train import PretrainConfig, Pretrainer
from ..train.probe import ProbeConfig, Prober
from .report import gap, mean_std, plus_minus, read_json

CLAIM_KINDS = ("order", "geq", "greater", "scaling", "longer", "overfit")
ARM_KEYS = {"name", "change", "pretrain", "probe", "epochs_factor", "train_fraction", "reuse"}
# what --smoke shrinks every arm to: a check of the pipeline, not a measurement
SMOKE = {"pretrain": {"train_subset": 320, "val_images": 32, "val_every": 5, "epochs": 1, "batch_size": 32,
                      "codebook_images": 8, "codebook_size": 16, "log_every": 1},
         "probe": {"train_subset": 128, "val_subset": 64, "epochs": 1, "batch_size": 64}}


@dataclass
class Arm:
    """One arm: its options over the shared ones."""
    name: str
    change: str = ""
    pretrain: Dict[str, Any] = field(default_factory=dict)
    probe: Dict[str, Any] = field(default_factory=dict)
    epochs_factor: float = 1.0
    train_fraction: float = 1.0
    reuse: Optional[str] = None


@dataclass
class Claim:
    """One claim of the paper over named arms (CLAIM_KINDS)."""
    name: str
    kind: str
    arms: List[str]


@dataclass
class AimAblation:
    """An ablation file, read: the shared options, the arms, the claims."""
    pretrain: Dict[str, Any]
    probe: Dict[str, Any]
    arms: List[Arm]
    claims: List[Claim]


def load_aim_ablation(path: str) -> AimAblation:
    """Read an ablation YAML file; every mistake is a ValueError naming the file and the arm or claim."""
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    unknown = set(raw) - {"pretrain", "probe", "arms", "claims"}
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; expected pretrain, probe, arms, claims")
    if not raw.get("arms"):
        raise ValueError(f"{path}: no arms")
    arms: List[Arm] = []
    for i, a in enumerate(raw["arms"]):
        if "name" not in a:
            raise ValueError(f"{path}: arm {i} has no name")
        extra = set(a) - ARM_KEYS
        if extra:
            raise ValueError(f"{path}: arm {a['name']!r} has unknown key(s) {sorted(extra)}")
        arm = Arm(**{**a, "pretrain": dict(a.get("pretrain") or {}), "probe": dict(a.get("probe") or {})})
        if arm.reuse is not None and (arm.reuse not in [b.name for b in arms] or arm.pretrain):
            raise ValueError(f"{path}: arm {arm.name!r} reuses {arm.reuse!r}: name an arm above it, and change "
                             f"only the probe")
        if not 0 < arm.train_fraction <= 1 or arm.epochs_factor <= 0:
            raise ValueError(f"{path}: arm {arm.name!r}: train_fraction must be in (0, 1] and epochs_factor > 0")
        arms.append(arm)
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: arm names repeat: {names}")
    claims = []
    for c in raw.get("claims") or []:
        claim = Claim(c.get("name", "?"), c.get("kind", "?"), list(c.get("arms") or []))
        if claim.kind not in CLAIM_KINDS:
            raise ValueError(f"{path}: claim {claim.name!r} has kind {claim.kind!r}; expected one of {CLAIM_KINDS}")
        missing = [a for a in claim.arms if a not in names]
        if missing or len(claim.arms) < 2:
            raise ValueError(f"{path}: claim {claim.name!r} needs at least two arms of the file; unknown: {missing}")
        claims.append(claim)
    return AimAblation(dict(raw.get("pretrain") or {}), dict(raw.get("probe") or {}), arms, claims)


def arm_pretrain_config(ablation: AimAblation, arm: Arm, seed: int, output: str, full_images: int,
                        **budget) -> PretrainConfig:
    """The PretrainConfig of one arm and seed: shared options < budget overrides < the arm's own; epochs
    scaled by epochs_factor, the training images cut to train_fraction of `full_images`."""
    values = {**ablation.pretrain, **{k: v for k, v in budget.items() if v is not None}, **arm.pretrain}
    values["epochs"] = max(1, round(values.get("epochs", PretrainConfig.epochs) * arm.epochs_factor))
    if arm.train_fraction < 1:
        values["train_subset"] = max(1, round(arm.train_fraction * (values.get("train_subset") or full_images)))
    return PretrainConfig.from_dict({**values, "seed": seed, "resume": True,
                                     "output": os.path.join(output, arm.name, f"seed{seed}", "pretrain")})


def arm_probe_config(ablation: AimAblation, arm: Arm, seed: int, output: str, trunk: str, **budget) -> ProbeConfig:
    """The ProbeConfig of one arm and seed on the trunk pre-trained in `trunk`."""
    values = {**ablation.probe, **{k: v for k, v in budget.items() if v is not None}, **arm.probe}
    return ProbeConfig.from_dict({**values, "checkpoint": trunk, "seed": seed,
                                  "output": os.path.join(output, arm.name, f"seed{seed}", "probe")})


def _loss_curve(run_dir: str) -> Dict[str, List[float]]:
    steps, losses = [], []
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        for record in map(json.loads, f):
            if "loss" in record:
                steps.append(record["step"])
                losses.append(record["loss"])
    return {"step": steps, "loss": losses}


def run_arm(ablation: AimAblation, arm: Arm, seed: int, output: str, full_images: int, progress: bool = False,
            pretrain_budget: Optional[Dict[str, Any]] = None, probe_budget: Optional[Dict[str, Any]] = None,
            train: bool = True) -> Optional[Dict[str, Any]]:
    """Pre-train (unless the arm reuses another's trunk or it is done) and probe one arm with one seed; with
    train=False only a finished arm's record is read (None if it is not finished)."""
    source = next(a for a in ablation.arms if a.name == (arm.reuse or arm.name))
    pre_cfg = arm_pretrain_config(ablation, source, seed, output, full_images, progress=progress,
                                  **(pretrain_budget or {}))
    pre = read_json(os.path.join(pre_cfg.output, "summary.json"))
    probe_cfg = arm_probe_config(ablation, arm, seed, output, pre_cfg.output, progress=progress,
                                 **(probe_budget or {}))
    probed = read_json(os.path.join(probe_cfg.output, "summary.json"))
    if not train and (pre is None or probed is None):
        return None
    if pre is None:
        if arm.reuse:
            raise ValueError(f"arm {arm.name!r} reuses {arm.reuse!r}, which has not been pre-trained with seed "
                             f"{seed}: run that arm too")
        pre = Pretrainer(pre_cfg).fit()
    if probed is None:
        probed = Prober(probe_cfg).fit()
    return {"arm": arm.name, "seed": seed, "reuses": arm.reuse, "steps": pre["steps"], "epochs": pre_cfg.epochs,
            "train_images": pre_cfg.train_subset or full_images, "final_loss": pre["final_train_loss"],
            "final_val_loss": pre.get("final_val_loss"), "val_curve": pre.get("val_curve", []),
            "loss_curve": _loss_curve(pre_cfg.output), "probe_top1": probed["val_top1"],
            "probe_best_top1": probed["best_val_top1"],
            "pretrain_seconds": pre.get("train_seconds") if arm.reuse is None else None,
            "probe_seconds": probed.get("train_seconds"), "pretrain_dir": pre_cfg.output,
            "probe_dir": probe_cfg.output}


def run_aim_ablation(ablation: AimAblation, output: str, seeds: Sequence[int] = (0, 1),
                     only: Optional[Sequence[str]] = None, progress: bool = False, log: Callable = print,
                     full_images: int = 60000, pretrain_budget: Optional[Dict[str, Any]] = None,
                     probe_budget: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Every arm (or those in `only`, with the arms they reuse) for every seed; -> the result (runs, summary,
    claims), the input of save_aim_report. Arms left out by `only` that finished before are reported as they
    are, so the report grows run by run. `full_images`: the training set's size (train_fraction's base)."""
    names = [a.name for a in ablation.arms]
    missing = set(only or []) - set(names)
    if missing:
        raise ValueError(f"unknown arm(s) {sorted(missing)}; the ablation has {names}")
    wanted = set(only or names)
    wanted |= {a.reuse for a in ablation.arms if a.name in wanted and a.reuse}
    runs = []
    for arm in ablation.arms:
        for seed in seeds:
            if arm.name not in wanted:
                done = run_arm(ablation, arm, seed, output, full_images, False, pretrain_budget, probe_budget,
                               train=False)
                runs += [done] if done else []
                continue
            log(f"[{arm.name} seed {seed}] {arm.change}")
            runs.append(run_arm(ablation, arm, seed, output, full_images, progress, pretrain_budget, probe_budget))
            r = runs[-1]
            val = "" if r["final_val_loss"] is None else f", held-out {r['final_val_loss']:.4f}"
            log(f"[{arm.name} seed {seed}] pre-training loss {r['final_loss']:.4f}{val}, probe top-1 "
                f"{r['probe_top1']:.2f} ({r['steps']} steps)")
    example = arm_pretrain_config(ablation, ablation.arms[0], seeds[0], output, full_images,
                                  **(pretrain_budget or {}))
    reported = {r["arm"] for r in runs}
    result = {"seeds": list(seeds), "arms": [dataclasses.asdict(a) for a in ablation.arms if a.name in reported],
              "budget": {"model": example.model, "model_kwargs": example.model_kwargs, "epochs": example.epochs,
                         "batch_size": example.batch_size, "train_images": example.train_subset or full_images,
                         "data": example.data, "val_images": example.val_images,
                         "probe": {**ablation.probe, **(probe_budget or {})}},
              "runs": runs}
    result["summary"] = summarize_arms(result)
    result["claims"] = judge_claims(ablation.claims, result["summary"])
    return result


# --- summary and claims -------------------------------------------------------------------------------------
def summarize_arms(result: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per arm: final pre-training loss, held-out loss, its rise above its minimum, probe top-1, as mean
    and std over seeds."""
    rows = []
    for arm in result["arms"]:
        runs = [r for r in result["runs"] if r["arm"] == arm["name"]]
        if not runs:
            continue
        rise = [r["val_curve"][-1]["val_loss"] - min(v["val_loss"] for v in r["val_curve"]) if r["val_curve"]
                else None for r in runs]
        rows.append({"arm": arm["name"], "change": arm["change"], "seeds": [r["seed"] for r in runs],
                     "steps": runs[0]["steps"], "train_images": runs[0]["train_images"],
                     "final_loss": mean_std([r["final_loss"] for r in runs]),
                     "val_loss": mean_std([r["final_val_loss"] for r in runs]),
                     "val_rise": mean_std(rise), "probe_top1": mean_std([r["probe_top1"] for r in runs]),
                     "pretrain_seconds": mean_std([r["pretrain_seconds"] for r in runs])})
    return rows


def _rise(row: Dict[str, Any]) -> Dict[str, Any]:
    """How far an arm's held-out loss ended above its minimum; it `turns_up` when that is above both the seed
    spread and 0.5 % of the loss (a flat curve's noise)."""
    rise, loss = row["val_rise"], row["val_loss"]
    if rise["mean"] is None:
        return {"between": [row["arm"]], "on": "val_rise", "difference": None, "spread": None,
                "beyond_spread": False, "turns_up": False}
    turns_up = rise["mean"] > max(rise["std"], 0.005 * loss["mean"])
    return {"between": [row["arm"]], "on": "val_rise", "difference": rise["mean"], "spread": rise["std"],
            "beyond_spread": len(row["seeds"]) > 1 and abs(rise["mean"]) > rise["std"], "turns_up": turns_up}


def judge_claims(claims: Sequence[Claim], summary: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Each claim: 'holds' / 'does not hold' / 'not measured' (an arm missing), whether it is established, and
    the differences it rests on."""
    rows = {r["arm"]: r for r in summary}
    out = []
    for claim in claims:
        record = {"claim": claim.name, "kind": claim.kind, "arms": claim.arms}
        if any(a not in rows for a in claim.arms):
            out.append({**record, "outcome": "not measured", "established": False, "differences": []})
            continue
        pairs = list(zip(claim.arms, claim.arms[1:]))
        if claim.kind in ("order", "greater", "geq"):
            gaps = [gap(rows, a, b, "probe_top1") for a, b in pairs]
            ok = [g["difference"] is not None and (g["difference"] >= 0 if claim.kind == "geq"
                                                   else g["difference"] > 0) for g in gaps]
        elif claim.kind in ("scaling", "longer"):
            # larger / longer arms come later: the earlier arm's loss minus the later's must be > 0, and its
            # probe top-1 minus the later's < 0
            gaps = [g for a, b in pairs for g in (gap(rows, a, b, "val_loss"), gap(rows, b, a, "probe_top1"))]
            ok = [g["difference"] is not None and g["difference"] > 0 for g in gaps]
        else:   # overfit: the small set's held-out loss turns upward, the full set's does not
            gaps = [_rise(rows[a]) for a in claim.arms[:2]]
            ok = [gaps[0]["turns_up"], not gaps[1]["turns_up"]]
            # established: the small set's rise is beyond its spread (the full set's flat end is not a difference)
            gaps[1]["beyond_spread"] = gaps[0]["beyond_spread"]
        holds = all(ok)
        out.append({**record, "outcome": "holds" if holds else "does not hold",
                    "established": all(g["beyond_spread"] for g in gaps), "differences": gaps})
    return out


# --- report -----------------------------------------------------------------------------------------------
def format_aim_table(rows: List[Dict[str, Any]]) -> str:
    """The summary as a markdown table, one row per arm."""
    header = ["arm", "change", "steps", "train images", "final pre-training loss", "held-out loss", "probe top-1 (%)",
              "pre-training s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        seconds = r["pretrain_seconds"]["mean"]
        lines.append("| " + " | ".join([r["arm"], r["change"], str(r["steps"]), f"{r['train_images']:,}",
                                        plus_minus(r["final_loss"], 4), plus_minus(r["val_loss"], 4),
                                        plus_minus(r["probe_top1"], 2),
                                        "-" if seconds is None else f"{seconds:.0f}"]) + " |")
    return "\n".join(lines)


def format_claims(claims: List[Dict[str, Any]]) -> str:
    """One line per claim: its outcome, whether established, and the differences (mean, spread)."""
    lines = []
    for c in claims:
        diffs = "; ".join(f"{' - '.join(g['between'])} {g['on']}: "
                          + ("-" if g["difference"] is None else f"{g['difference']:+.4g} (spread {g['spread']:.2g})")
                          for g in c["differences"])
        state = "established" if c["established"] else "not established (spread >= effect, or one seed)"
        lines.append(f"- **{c['claim']}**: {c['outcome']}, {state}. {diffs}")
    return "\n".join(lines)


def plot_aim_ablation(result: Dict[str, Any], path: str) -> None:
    """Three panels: pre-training loss and held-out loss against step (first seed of each arm), and the probe
    top-1 of every arm (dots: seeds, bars: mean)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_val, ax_probe) = plt.subplots(1, 3, figsize=(17, 5))
    rows = result["summary"]
    for i, row in enumerate(rows):
        colour = plt.cm.tab20(i % 20)
        runs = [r for r in result["runs"] if r["arm"] == row["arm"]]
        first = runs[0]
        if not first["reuses"]:
            ax_loss.plot(first["loss_curve"]["step"], first["loss_curve"]["loss"], color=colour, lw=1, label=row["arm"])
            if first["val_curve"]:
                ax_val.plot([v["step"] for v in first["val_curve"]], [v["val_loss"] for v in first["val_curve"]],
                            "-o", color=colour, ms=3, lw=1, label=row["arm"])
        top1 = [r["probe_top1"] for r in runs]
        ax_probe.bar(i, sum(top1) / len(top1), color=colour, alpha=0.4)
        ax_probe.plot([i] * len(top1), top1, "o", color=colour, ms=4)
    ax_loss.set(xlabel="step", ylabel="pre-training loss (per target kind)", yscale="log")
    ax_val.set(xlabel="step", ylabel="held-out pre-training loss", yscale="log")
    ax_probe.set_xticks(range(len(rows)), [r["arm"] for r in rows], rotation=40, ha="right", fontsize=8)
    ax_probe.set_ylabel("attentive-probe top-1 (%)")
    finals = [r["probe_top1"] for r in result["runs"]]
    ax_probe.set_ylim(max(0.0, min(finals) - 3), min(100.0, max(finals) + 1))
    for ax in (ax_loss, ax_val):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, ncol=2)
    for ax in (ax_loss, ax_val, ax_probe):
        ax.grid(alpha=0.3)
    b = result["budget"]
    fig.suptitle(f"AIM ablation on {b['data']}: {b['model']} {b['model_kwargs']}, {b['epochs']} epoch(s) x "
                 f"{b['train_images']} images per arm unless the arm changes it, seeds {result['seeds']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_aim_report(result: Dict[str, Any], out_dir: str, prefix: str = "aim_ablation") -> List[str]:
    """<prefix>.json (runs, summary, claims), <prefix>.md (table + claims), <prefix>.png; -> the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, prefix + ext) for ext in (".json", ".md", ".png")]
    with open(paths[0] + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(paths[0] + ".tmp", paths[0])
    b = result["budget"]
    text = [f"# AIM ablation ({b['data']})", "",
            f"Trunk {b['model']} {b['model_kwargs']}; per arm {b['epochs']} epoch(s) of {b['train_images']:,} "
            f"training images at batch {b['batch_size']} unless the arm changes it; held-out loss on "
            f"{b['val_images']} test images; attentive probe {b['probe']}. Seeds {result['seeds']}; mean ± std.",
            "", format_aim_table(result["summary"]), "", "## Claims", "", format_claims(result["claims"]), ""]
    with open(paths[1], "w") as f:
        f.write("\n".join(text))
    plot_aim_ablation(result, paths[2])
    return paths
