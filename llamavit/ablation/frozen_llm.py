"""The frozen-LLM ablation as data (Pang et al.: a frozen LLM block helps a visual encoder, the last layer always
helps and some help more (§3.6), and the block filters information towards the object (§4)).

An ablation file (YAML, e.g. configs/ablation_frozen_llm.yaml) holds
    train: {TrainConfig options shared by every arm}     model_options: {the encoder's options, shared}
    base_model: <the encoder alone, e.g. timm:vit_tiny_patch16_224>   llm_model: <it + a frozen LLM block>
    sweep: {layers: [0, 7, ...], stacks: [2, 4]}           # expands to arms layer_<i> and last_<k>
    arms: [{name, change, model, model_kwargs}, ...]       # extra arms (the ViT alone, the random block, ...)
    score_images: N  foreground_threshold: T               # the information-filtering score (None: none)
    claims: [{name, kind, arms}, ...]
Every arm and seed is trained by `llamavit.train.Trainer` into <output>/<arm>/seed<k> (resumed if interrupted,
kept when finished), `jobs` runs side by side with `threads` CPU threads each; then each trained model's
activation maps are scored as foreground detectors on the first N test images (eval/activations.py): the last
ViT block's map ("before") and the frozen path's output ("after", the same block for the ViT alone).

Claim kinds: 'greater' (test top-1 of the first arm > the second), 'best_layer' (the single-layer arms: which
is best and whether it beats the last layer beyond the spread), 'filter' (the first arm's AP gain from before to
after the block > the second arm's). Established: the differences exceed the larger seed std (2 seeds or more).
"""
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import yaml

from .report import gap, mean_std, plus_minus, read_json

CLAIM_KINDS = ("greater", "best_layer", "filter")
# --smoke: every arm on a few images, one epoch (the pipeline, not a measurement)
SMOKE = {"train": {"epochs": 1, "train_subset": 256, "val_subset": 128, "batch_size": 64}, "score_images": 32}


@dataclass
class LLMArm:
    """One arm: its name, what it changes, the model it trains and that model's options (over the shared ViT's)."""
    name: str
    change: str
    model: str
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    layers: Optional[List[int]] = None     # the LLM layer indices it takes (None: no block or a random one)


@dataclass
class LLMClaim:
    name: str
    kind: str
    arms: List[str] = field(default_factory=list)


@dataclass
class LLMAblation:
    """An ablation file, resolved into arms."""
    train: Dict[str, Any]
    arms: List[LLMArm]
    claims: List[LLMClaim]
    score_images: int = 1000
    foreground_threshold: Optional[float] = 0.1


def load_llm_ablation(path: str) -> LLMAblation:
    """Read an ablation file: the sweep expands to layer_<i> (one layer) and last_<k> (the last k) arms."""
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    keys = {"train", "model_options", "base_model", "llm_model", "sweep", "arms", "score_images",
            "foreground_threshold", "claims"}
    unknown = set(raw) - keys
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {sorted(unknown)}; expected {sorted(keys)}")
    shared, llm_model = dict(raw.get("model_options") or {}), raw.get("llm_model")
    arms = []
    for i, a in enumerate(raw.get("arms") or []):
        extra = set(a) - {"name", "change", "model", "model_kwargs"}
        if extra or "name" not in a or "model" not in a:
            raise ValueError(f"{path}: arm {i} needs name and model (and may have change, model_kwargs); "
                             f"unknown: {sorted(extra)}")
        model = {"base_model": raw.get("base_model"), "llm_model": llm_model}.get(a["model"], a["model"])
        arms.append(LLMArm(a["name"], a.get("change", ""), model, {**shared, **(a.get("model_kwargs") or {})}))
    sweep = raw.get("sweep") or {}
    if sweep and not llm_model:
        raise ValueError(f"{path}: a sweep needs llm_model, the registered encoder + frozen LLM name")
    for layer in sweep.get("layers", []):
        arms.append(LLMArm(f"layer_{layer}", f"LLM layer {layer} as the frozen block", llm_model,
                           {**shared, "llm_layers": [layer]}, [layer]))
    for k in sweep.get("stacks", []):
        arms.append(LLMArm(f"last_{k}", f"the last {k} LLM layers stacked", llm_model,
                           {**shared, "llm_layers": list(range(-k, 0))}, list(range(-k, 0))))
    names = [a.name for a in arms]
    if not arms:
        raise ValueError(f"{path}: no arms (give arms or a sweep)")
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: arm names repeat: {names}")
    claims = []
    for c in raw.get("claims") or []:
        claim = LLMClaim(c["name"], c["kind"], list(c.get("arms") or []))
        if claim.kind not in CLAIM_KINDS:
            raise ValueError(f"{path}: claim {claim.name!r} has kind {claim.kind!r}; expected one of {CLAIM_KINDS}")
        missing = [a for a in claim.arms if a not in names]
        if missing:
            raise ValueError(f"{path}: claim {claim.name!r} names unknown arm(s) {missing}; the arms are {names}")
        claims.append(claim)
    return LLMAblation(dict(raw.get("train") or {}), arms, claims, int(raw.get("score_images", 1000)),
                       raw.get("foreground_threshold", 0.1))


def arm_train_config(ablation: LLMAblation, arm: LLMArm, seed: int, output: str, **budget):
    """The TrainConfig of one arm and seed; `budget` (epochs, train_subset, ... when not None) overrides."""
    from ..train import TrainConfig
    opts = {**ablation.train, **{k: v for k, v in budget.items() if v is not None}}
    return TrainConfig.from_dict({**opts, "model": arm.model, "model_kwargs": dict(arm.model_kwargs), "seed": seed,
                                  "output": os.path.join(output, arm.name, f"seed{seed}"), "resume": True})


def filter_scores(model: torch.nn.Module, dataset, count: int, threshold: float, mean, std,
                  batch_size: int = 250) -> Dict[str, Dict[str, float]]:
    """{block: {'magnitude': AP, 'frequency': AP, 'magnitude_ratio': ratio}} over the first `count` images of an
    image dataset, each map scored as a detector of the pixels brighter than `threshold` (see eval/activations)."""
    from ..eval.activations import analyze_activations, foreground_from_images
    totals: Dict[str, Dict[str, float]] = {}
    model.eval()
    subset = torch.utils.data.Subset(dataset, range(min(count, len(dataset))))
    for images, _ in torch.utils.data.DataLoader(subset, batch_size=batch_size):
        with torch.no_grad():
            result = analyze_activations(model, images, foreground=foreground_from_images(images, mean, std,
                                                                                           threshold))
        for name, scores in result["foreground"].items():
            entry = totals.setdefault(name, {"magnitude": 0.0, "frequency": 0.0, "magnitude_ratio": 0.0,
                                             "foreground_share": 0.0})
            n = scores["magnitude"]["images_scored"]
            entry["foreground_share"] += scores["magnitude"]["foreground_share"] * n
            entry["magnitude"] += scores["magnitude"]["foreground_ap"] * n
            entry["frequency"] += scores["frequency"]["foreground_ap"] * n
            entry["magnitude_ratio"] += scores["magnitude"]["foreground_ratio"] * n
            entry["images"] = entry.get("images", 0) + n
    return {name: {k: (v / e["images"] if k != "images" else v) for k, v in e.items()} for name, e in totals.items()}


def _train_arm(job: Dict[str, Any]) -> Dict[str, Any]:
    """Worker: train (or resume) one arm and seed with `threads` threads, then score its activation maps."""
    torch.set_num_threads(job["threads"])
    from ..data.transforms import rgb_normalization
    from ..train import Trainer
    from ..train.supervised import transform_config
    cfg = job["config"]
    summary = read_json(os.path.join(cfg.output, "summary.json"))
    scores_path = os.path.join(cfg.output, "filter_scores.json")
    scores = read_json(scores_path)
    start = time.perf_counter()
    trainer = None
    if summary is None:   # a finished run is read back (delete its directory to train it again)
        trainer = Trainer(cfg)
        summary = trainer.fit()
    if scores is None and job["threshold"] is not None:
        if trainer is None:
            from ..train import model_from_checkpoint
            model, dataset = model_from_checkpoint(cfg.output), _val_set(cfg)
        else:
            model, dataset = trainer.model, trainer.val_set
        mean, std = rgb_normalization(*[getattr(transform_config(cfg), k) for k in ("mean", "std")], cfg.in_chans)
        scores = filter_scores(model, dataset, job["score_images"], job["threshold"], mean, std)
        with open(scores_path, "w") as f:
            json.dump(scores, f)
    params = summary.get("trainable_parameters"), summary.get("total_parameters")
    return {"arm": job["arm"], "seed": cfg.seed, "top1": summary.get("val_top1"),
            "final_train_loss": summary.get("final_train_loss"), "steps": summary.get("steps"),
            "trainable_params": params[0], "params": params[1], "seconds": summary.get("train_seconds"),
            "wall_s": time.perf_counter() - start, "filter": scores or {}, "run_dir": cfg.output}


def _val_set(cfg):
    from ..train.supervised import build_split
    return build_split(cfg, "val")


def run_llm_ablation(ablation: LLMAblation, output: str, seeds: Sequence[int] = (0, 1),
                     only: Optional[Sequence[str]] = None, jobs: int = 1, threads: int = 1, log: Callable = print,
                     **budget) -> Dict[str, Any]:
    """Every arm (or those in `only`) for every seed, `jobs` at a time with `threads` threads each; finished
    runs are read back, not retrained, and arms left out by `only` that finished before are reported too. ->
    the result (runs, summary, claims), the input of save_llm_report."""
    names = [a.name for a in ablation.arms]
    missing = set(only or []) - set(names)
    if missing:
        raise ValueError(f"unknown arm(s) {sorted(missing)}; the ablation has {names}")
    wanted = set(only or names)
    todo, runs = [], []
    for arm in ablation.arms:
        for seed in seeds:
            cfg = arm_train_config(ablation, arm, seed, output, **budget)
            done = read_json(os.path.join(cfg.output, "summary.json"))
            if arm.name in wanted or done is not None:
                todo.append({"arm": arm.name, "config": cfg, "threads": threads, "score_images": ablation.score_images,
                             "threshold": ablation.foreground_threshold})
    if jobs > 1:
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_train_arm, job): job for job in todo}
            for future in concurrent.futures.as_completed(futures):
                runs.append(future.result())
                _log_run(log, runs[-1])
    else:
        for job in todo:
            runs.append(_train_arm(job))
            _log_run(log, runs[-1])
    order = {(a.name, s): i for i, (a, s) in enumerate((a, s) for a in ablation.arms for s in seeds)}
    runs.sort(key=lambda r: order[(r["arm"], r["seed"])])
    reported = {r["arm"] for r in runs}
    example = arm_train_config(ablation, ablation.arms[0], seeds[0], output, **budget)
    result = {"seeds": list(seeds), "jobs": jobs, "threads_per_job": threads,
              "arms": [dataclasses.asdict(a) for a in ablation.arms if a.name in reported],
              "budget": {"epochs": example.epochs, "batch_size": example.batch_size, "data": example.data,
                         "train_subset": example.train_subset, "img_size": example.img_size,
                         "score_images": ablation.score_images, "foreground_threshold": ablation.foreground_threshold},
              "runs": runs}
    result["summary"] = summarize_llm_arms(result)
    result["claims"] = judge_llm_claims(ablation.claims, result["summary"])
    return result


def _log_run(log: Callable, run: Dict[str, Any]) -> None:
    after = run["filter"].get("llm_out") or {}
    ap = f", foreground AP after the block {after['magnitude']:.3f}" if after else ""
    log(f"[{run['arm']} seed {run['seed']}] top-1 {run['top1']:.2f} ({run['steps']} steps, "
        f"{run['wall_s'] / 60:.1f} min){ap}")


def _before_after(run: Dict[str, Any]) -> Dict[str, Optional[float]]:
    """The magnitude map's foreground AP at the last ViT block and after the frozen path (the same block when the
    model has none)."""
    blocks = [b for b in run["filter"] if b.startswith("block")]
    if not blocks:
        return {"before": None, "after": None}
    before = run["filter"][max(blocks, key=lambda b: int(b[5:]))]["magnitude"]
    after = run["filter"].get("llm_out", {}).get("magnitude", before)
    return {"before": before, "after": after}


def summarize_llm_arms(result: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per arm: top-1, final training loss, foreground AP before / after the block and its gain, as mean
    and std over seeds."""
    rows = []
    for arm in result["arms"]:
        runs = [r for r in result["runs"] if r["arm"] == arm["name"]]
        if not runs:
            continue
        ba = [_before_after(r) for r in runs]
        gains = [b["after"] - b["before"] if b["before"] is not None else None for b in ba]
        rows.append({"arm": arm["name"], "change": arm["change"], "layers": arm["layers"],
                     "seeds": [r["seed"] for r in runs], "steps": runs[0]["steps"],
                     "trainable_params": runs[0]["trainable_params"], "params": runs[0]["params"],
                     "top1": mean_std([r["top1"] for r in runs]),
                     "final_train_loss": mean_std([r["final_train_loss"] for r in runs]),
                     "ap_before": mean_std([b["before"] for b in ba]), "ap_after": mean_std([b["after"] for b in ba]),
                     "ap_gain": mean_std(gains), "seconds": mean_std([r["seconds"] for r in runs]),
                     "foreground_share": mean_std([next(iter(r["filter"].values()))["foreground_share"]
                                                   if r["filter"] else None for r in runs])})
    return rows


def judge_llm_claims(claims: Sequence[LLMClaim], summary: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Each claim: 'holds' / 'does not hold' / 'not measured', whether it is established, its differences."""
    rows = {r["arm"]: r for r in summary}
    out = []
    for claim in claims:
        record = {"claim": claim.name, "kind": claim.kind, "arms": claim.arms}
        arms = claim.arms if claim.kind != "best_layer" else [a for a in rows if rows[a]["layers"] and
                                                              len(rows[a]["layers"]) == 1]
        too_few = claim.kind == "best_layer" and len(arms) < 2   # a choice needs two layers at least
        if any(a not in rows for a in arms) or not arms or too_few:
            out.append({**record, "outcome": "not measured", "established": False, "differences": []})
            continue
        if claim.kind == "greater":
            gaps = [gap(rows, arms[0], arms[1], "top1")]
            holds = gaps[0]["difference"] is not None and gaps[0]["difference"] > 0
        elif claim.kind == "filter":
            gaps = [gap(rows, arms[0], arms[1], "ap_gain")]
            holds = gaps[0]["difference"] is not None and gaps[0]["difference"] > 0
        else:   # best_layer: the best single layer, against the last one
            best = max(arms, key=lambda a: rows[a]["top1"]["mean"])
            last = max(arms, key=lambda a: rows[a]["layers"][0])
            gaps = [gap(rows, best, last, "top1")]
            record["best"] = best
            holds = best != last
        out.append({**record, "outcome": "holds" if holds else "does not hold",
                    "established": all(g["beyond_spread"] for g in gaps), "differences": gaps})
    return out


# --- report ---------------------------------------------------------------------------------------------------
def format_llm_table(rows: List[Dict[str, Any]]) -> str:
    """The summary as a markdown table, one row per arm."""
    header = ["arm", "change", "trainable / total params", "top-1 (%)", "foreground AP before", "after", "gain"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        params = f"{r['trainable_params']:,} / {r['params']:,}" if r["params"] else "-"
        aps = " | ".join(plus_minus(r[k], 3) for k in ("ap_before", "ap_after", "ap_gain"))
        lines.append(f"| {r['arm']} | {r['change']} | {params} | {plus_minus(r['top1'], 2)} | {aps} |")
    share = next((r["foreground_share"]["mean"] for r in rows if r["foreground_share"]["mean"] is not None), None)
    if share is not None:
        lines.append(f"\nForeground AP: the activation magnitude of the patch tokens as a detector of the item's "
                     f"patches; a random map scores the share of foreground patches, {share:.3f}.")
    return "\n".join(lines)


def format_llm_claims(claims: List[Dict[str, Any]]) -> str:
    """One line per claim: outcome, established or not, the difference and spread it rests on."""
    lines = []
    for c in claims:
        diffs = "; ".join(f"{' - '.join(d['between'])} on {d['on']}: {d['difference']:+.3f} (spread {d['spread']:.3f})"
                          for d in c["differences"] if d["difference"] is not None)
        best = f" [best: {c['best']}]" if "best" in c else ""
        lines.append(f"- {c['claim']}: **{c['outcome']}**{best}, "
                     f"{'established' if c['established'] else 'not established'}" + (f" ({diffs})" if diffs else ""))
    return "\n".join(lines)


def plot_llm_ablation(result: Dict[str, Any], path: str) -> None:
    """Left: top-1 by LLM layer index (single-layer arms, mean ± std) beside the other arms' bands; right: the
    foreground AP before and after the block, per arm."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["summary"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    single = sorted([r for r in rows if r["layers"] and len(r["layers"]) == 1], key=lambda r: r["layers"][0])
    if single:
        ax.errorbar([r["layers"][0] for r in single], [r["top1"]["mean"] for r in single],
                    yerr=[r["top1"]["std"] for r in single], marker="o", capsize=3, label="one frozen LLM layer")
    for i, r in enumerate(r for r in rows if not (r["layers"] and len(r["layers"]) == 1)):
        m, s = r["top1"]["mean"], r["top1"]["std"]
        ax.axhline(m, color=f"C{i + 1}", ls="--", lw=1, label=f"{r['arm']} ({m:.2f})")
        ax.axhspan(m - s, m + s, color=f"C{i + 1}", alpha=0.15)
    ax.set_xlabel("LLM layer index")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("top-1 by frozen LLM layer")
    ax.legend(fontsize=7)
    scored = [r for r in rows if r["ap_before"]["mean"] is not None]
    if scored:
        xs = range(len(scored))
        bx.bar([x - 0.2 for x in xs], [r["ap_before"]["mean"] for r in scored], 0.4, label="last ViT block",
               yerr=[r["ap_before"]["std"] for r in scored])
        bx.bar([x + 0.2 for x in xs], [r["ap_after"]["mean"] for r in scored], 0.4, label="after the frozen block",
               yerr=[r["ap_after"]["std"] for r in scored])
        share = scored[0]["foreground_share"]["mean"]
        if share is not None:
            bx.axhline(share, color="gray", ls=":", lw=1, label=f"a random map ({share:.3f})")
        bx.set_xticks(list(xs), [r["arm"] for r in scored], rotation=45, ha="right", fontsize=7)
        bx.set_ylabel("foreground AP of the activation magnitude")
        bx.set_title("information filtering")
        bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_llm_report(result: Dict[str, Any], out_dir: str, prefix: str = "frozen_llm_ablation") -> List[str]:
    """<prefix>.json (everything), <prefix>.md (table + claims) and <prefix>.png; -> the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"{prefix}.{ext}") for ext in ("json", "md", "png")]
    with open(paths[0], "w") as f:
        json.dump(result, f, indent=2)
    with open(paths[1], "w") as f:
        f.write(f"# Frozen LLM ablation\n\n{format_llm_table(result['summary'])}\n\n## Claims\n\n"
                f"{format_llm_claims(result['claims'])}\n")
    plot_llm_ablation(result, paths[2])
    return paths
