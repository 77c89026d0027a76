"""Adaptation claims on Fashion-MNIST (2 CPU threads), each arm pair at the same CPU budget:

- weight-selection: the iLLaMA of configs/fmnist_illama.yaml from a random init vs from SmolLM2-135M by
  weight selection (`--init-from-llm smollm2`, blocks spread over the LLM's depth), per seed (the iLLaMA
  repository says the LLM init helps);
- distill: the same iLLaMA trained alone vs as DeiT-hard student of a stronger teacher (the wide iLLaMA of
  configs/fmnist_illama_wide.yaml, trained first for --teacher-minutes and reused);
- layer-decay: a MAE pre-trained VisionLLaMA (bench/fmnist_mae's trunk and pre-training recipe, --pretrain-
  minutes, reused) fine-tuned by bench/fmnist_mae's fine-tuning recipe with and without layer-wise
  learning-rate decay 0.75.
The first arm is sized to --minutes of training from a measured step time (whole epochs) and every arm of the
study trains that many epochs (a distilled student also pays for its teacher's forward: its seconds are in the
JSON); top-1 on the full test set.
Results merge into bench/results/fmnist_adaptation.json under the study's name (mean and std over seeds).

    python bench/fmnist_adaptation.py weight-selection --seeds 0 1 --minutes 6
    python bench/fmnist_adaptation.py distill --minutes 6 --teacher-minutes 12
    python bench/fmnist_adaptation.py layer-decay --minutes 6 --pretrain-minutes 10
    python bench/fmnist_adaptation.py all --smoke          # a check of the three pipelines
Run it alone: two threads beside another job spin, and the budgets would measure the contention.
"""
import argparse
import json
import os
import shutil
import statistics

import torch
from fmnist_mae import pretrain_config as mae_pretrain_config  # bench/ helper: the MAE trunk and its recipes
from fmnist_mae import supervised_config as mae_finetune_config
from machine import bf16_native, cpu_flags, cpu_model  # bench/ helper
from sizing import epochs_for, seconds_per_step  # bench/ helper

from llamavit.train import Pretrainer, TrainConfig
from llamavit.train.supervised import Trainer

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(HERE, "..", "configs")
RESULTS = os.path.join(HERE, "results", "fmnist_adaptation.json")


def sized_run(cfg: TrainConfig, minutes: float, backbone_only: bool = False, epochs: int = 0) -> dict:
    """Train cfg for `epochs`, or (0) for about `minutes` (epochs from a measured step time); -> summary + sizing."""
    step_s = None
    if not epochs:
        calib = Trainer(TrainConfig.from_dict({**cfg.to_dict(), "output": cfg.output + "-calibration", "epochs": 1}),
                        backbone_only=backbone_only)
        step_s, per_epoch = seconds_per_step(calib), calib.steps_per_epoch
        del calib
        shutil.rmtree(cfg.output + "-calibration", ignore_errors=True)
        epochs = epochs_for(minutes, step_s, per_epoch)
    shutil.rmtree(cfg.output, ignore_errors=True)
    run_cfg = TrainConfig.from_dict({**cfg.to_dict(), "epochs": epochs, "eval_every": epochs})
    summary = Trainer(run_cfg, backbone_only=backbone_only).fit()
    return {"top1": summary["val_top1"], "epochs": epochs, "steps": summary["steps"], "seconds_per_step": step_s,
            "train_seconds": summary["train_seconds"], "final_train_loss": summary["final_train_loss"]}


def paired_runs(study: str, arms, build, minutes: float, seeds, backbone_only: bool = False) -> list:
    """Run every (seed, arm): build(arm, seed) -> TrainConfig. The first run is sized to `minutes`; every other
    run gets its epoch count, so the arms differ only in what they test (a calibration per run would let timing
    noise hand one arm an extra epoch)."""
    runs, epochs = [], 0
    for seed in seeds:
        for arm in arms:
            runs.append({"arm": arm, "seed": seed, **sized_run(build(arm, seed), minutes, backbone_only, epochs)})
            epochs = runs[0]["epochs"]
            print(f"{study} {arm} seed {seed}: {runs[-1]['top1']:.2f} ({runs[-1]['train_seconds']:.0f} s)")
    return runs


def illama_config(args, output: str, seed: int, **extra) -> TrainConfig:
    return TrainConfig.from_yaml(os.path.join(CONFIGS, "fmnist_illama.yaml"), output=output, seed=seed,
                                 progress=False, log_every=50, train_subset=args.train_subset,
                                 val_subset=args.val_subset, **extra)


def weight_selection(args) -> dict:
    extras = {"random": {}, "smollm2": {"init_from_llm": "smollm2"}}
    runs = paired_runs("weight-selection", extras, lambda arm, seed: illama_config(
        args, os.path.join(args.output, f"ws-{arm}-seed{seed}"), seed, **extras[arm]), args.minutes, args.seeds)
    return {"arms": summarize(runs, ("random", "smollm2")), "runs": runs,
            "note": "blocks of the iLLaMA (D 96, 3 heads, SwiGLU 256) selected from SmolLM2-135M layers spread over "
                    "its depth; everything else at its init"}


def distill(args) -> dict:
    teacher = os.path.join(args.output, "teacher")
    if not os.path.isfile(os.path.join(teacher, "summary.json")):
        cfg = TrainConfig.from_yaml(os.path.join(CONFIGS, "fmnist_illama_wide.yaml"), output=teacher, progress=False,
                                    log_every=50, train_subset=args.train_subset, val_subset=args.val_subset)
        sized_run(cfg, args.teacher_minutes)
    with open(os.path.join(teacher, "summary.json")) as f:
        teacher_top1 = json.load(f)["val_top1"]
    extras = {"alone": {}, "distilled": {"teacher": teacher, "distill": "hard", "distill_alpha": 0.5}}
    runs = paired_runs("distill", extras, lambda arm, seed: illama_config(
        args, os.path.join(args.output, f"distill-{arm}-seed{seed}"), seed, **extras[arm]), args.minutes, args.seeds)
    return {"teacher": {"config": "configs/fmnist_illama_wide.yaml", "minutes": args.teacher_minutes,
                        "top1": teacher_top1}, "arms": summarize(runs, ("alone", "distilled")), "runs": runs}


def layer_decay(args) -> dict:
    pre = os.path.join(args.output, "mae")
    if not os.path.isfile(os.path.join(pre, "summary.json")):
        mae_args = argparse.Namespace(train_subset=args.train_subset, smoke=args.smoke)
        calib = Pretrainer(mae_pretrain_config(mae_args, 1, pre + "-calibration"))
        step_s, per_epoch = seconds_per_step(calib), calib.steps_per_epoch
        shutil.rmtree(pre + "-calibration", ignore_errors=True)
        Pretrainer(mae_pretrain_config(mae_args, epochs_for(args.pretrain_minutes, step_s, per_epoch), pre)).fit()
    extras = {"no_decay": {}, "decay_0.75": {"layer_decay": 0.75}}

    def build(arm, seed):
        recipe = mae_finetune_config(argparse.Namespace(train_subset=args.train_subset, val_subset=args.val_subset,
                                                        seed=seed, smoke=True), 1,
                                     os.path.join(args.output, f"ld-{arm}-seed{seed}"), checkpoint=pre)
        return TrainConfig.from_dict({**recipe.to_dict(), "log_every": 50, **extras[arm]})
    runs = paired_runs("layer-decay", extras, build, args.minutes, args.seeds, backbone_only=True)
    return {"pretrain": {"minutes": args.pretrain_minutes, "run": pre}, "arms": summarize(runs, ("no_decay",
                                                                                                  "decay_0.75")),
            "runs": runs}


def summarize(runs, arms) -> dict:
    out = {}
    for arm in arms:
        top1 = [r["top1"] for r in runs if r["arm"] == arm]
        out[arm] = {"top1_mean": statistics.mean(top1), "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                    "seeds": len(top1)}
    first, second = arms
    out["difference"] = out[second]["top1_mean"] - out[first]["top1_mean"]
    return out


STUDIES = {"weight-selection": weight_selection, "distill": distill, "layer-decay": layer_decay}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", choices=[*STUDIES, "all"])
    ap.add_argument("--minutes", type=float, default=6.0, help="training budget of each arm")
    ap.add_argument("--teacher-minutes", type=float, default=12.0)
    ap.add_argument("--pretrain-minutes", type=float, default=10.0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--train-subset", type=int, default=0)
    ap.add_argument("--val-subset", type=int, default=0)
    ap.add_argument("--output", default="runs/fmnist_adaptation")
    ap.add_argument("--results", default=RESULTS)
    ap.add_argument("--smoke", action="store_true", help="tiny subsets and budgets: checks the pipelines only")
    args = ap.parse_args()
    if args.smoke:
        args.minutes, args.teacher_minutes, args.pretrain_minutes, args.seeds = 0.02, 0.02, 0.02, [0]
        args.train_subset, args.val_subset = 512, 256
        args.output = os.path.join(args.output, "smoke")
        args.results = os.path.join(args.output, "fmnist_adaptation.json")
    torch.set_num_threads(2)
    results = json.load(open(args.results)) if os.path.isfile(args.results) else {}
    for name in STUDIES if args.study == "all" else [args.study]:
        results[name] = {**STUDIES[name](args), "minutes_per_arm": args.minutes, "seeds": args.seeds,
                         "machine": {"cpu": cpu_model(), "flags": cpu_flags(), "bf16_native": bf16_native(),
                                     "threads": 2}, "smoke": args.smoke}
        os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
        with open(args.results + ".tmp", "w") as f:
            json.dump(results, f, indent=2)
        os.replace(args.results + ".tmp", args.results)
        print(json.dumps({name: results[name]["arms"]}, indent=2))


if __name__ == "__main__":
    main()
