"""MAE pre-training then fine-tuning vs training from scratch, a small plain VisionLLaMA on Fashion-MNIST,
the same total CPU time for both arms.

Both arms train the same trunk (VisionLLaMA, patch 4 on 28x28 = 49 tokens, D 96, depth 6, 3 heads,
AS2DRoPE, average pooling) with the same supervised recipe (that of bench/fmnist_illama: AdamW 2e-3,
label smoothing 0.1, crops 0.75-1, flips); the MAE arm spends `--pretrain-frac` of the budget on
`llamavit pretrain mae` (mask ratio 0.75, decoder 2 x 64, no labels) and the rest on `llamavit finetune`.
Epoch counts come from a short calibration of both step times, so the arms get the same minutes; the
measured wall times are reported next to the accuracies (full test set, evaluated once at the end).
Writes bench/results/fmnist_mae.json and fmnist_mae_reconstructions.png.

    python bench/fmnist_mae.py --threads 1 --budget-min 20     # ~45 min: two 20-minute arms
    python bench/fmnist_mae.py --smoke                         # a one-minute check of the pipeline
"""
import argparse
import json
import os
import shutil
import time

import torch
from pretrain_timing import pretrain_vs_supervised_step  # bench/ helper

from llamavit.train import MAE_DEFAULTS, PretrainConfig, Pretrainer, TrainConfig, finetune, train
from llamavit.train.config import yaml_values

HERE = os.path.dirname(os.path.abspath(__file__))
# the recipes live in the configs the released weights are made with; the benchmark sizes the epochs
PRETRAIN = os.path.join(HERE, "..", "configs", "fmnist_mae_pretrain.yaml")
FINETUNE = os.path.join(HERE, "..", "configs", "fmnist_mae_finetune.yaml")
_TRUNK_CONFIG = yaml_values(PRETRAIN)
MODEL, TRUNK, BATCH = _TRUNK_CONFIG["model"], _TRUNK_CONFIG["model_kwargs"], _TRUNK_CONFIG["batch_size"]


def pretrain_config(args, epochs: int, output: str) -> PretrainConfig:
    # the config's decoder (2 x 64) is much lighter than the encoder, as in MAE (8 x 512 against ViT-L's 24 x 1024)
    return PretrainConfig.from_yaml(PRETRAIN, defaults={**MAE_DEFAULTS, "objective": "mae"}, epochs=epochs,
                                    train_subset=args.train_subset, output=output, progress=not args.smoke)


def supervised_config(args, epochs: int, output: str, checkpoint=None) -> TrainConfig:
    """The fine-tuning recipe, also for the from-scratch arm (the same trunk, no checkpoint)."""
    return TrainConfig.from_yaml(FINETUNE, model=MODEL, model_kwargs=TRUNK, checkpoint_path=checkpoint, img_size=28,
                                 in_chans=1, epochs=epochs, train_subset=args.train_subset,
                                 val_subset=args.val_subset, output=output, seed=args.seed, progress=not args.smoke)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-min", type=float, default=20.0, help="training minutes per arm")
    ap.add_argument("--pretrain-frac", type=float, default=0.5, help="share of the MAE arm spent pre-training")
    ap.add_argument("--train-subset", type=int, default=0)
    ap.add_argument("--val-subset", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default="runs/fmnist_mae")
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    ap.add_argument("--smoke", action="store_true", help="tiny subsets, a few steps: checks the pipeline only")
    args = ap.parse_args()
    if args.smoke:
        args.budget_min, args.train_subset, args.val_subset = 0.2, 512, 256
        args.results = os.path.join(args.output, "results")
    torch.set_num_threads(args.threads)
    shutil.rmtree(args.output, ignore_errors=True)
    t0 = time.perf_counter()

    calibration = Pretrainer(pretrain_config(args, 1, os.path.join(args.output, "calibration")))
    times = pretrain_vs_supervised_step(calibration, BATCH, steps=6)
    epoch_steps = (args.train_subset or 60000) // BATCH
    budget_s = args.budget_min * 60 / 1.08  # data loading and the final evaluation take the rest

    def epochs_for(seconds: float, step_s: float) -> int:
        return max(1, round(seconds / (step_s * epoch_steps)))

    plan = {"scratch": epochs_for(budget_s, times["supervised"]),
            "mae_pretrain": epochs_for(budget_s * args.pretrain_frac, times["pretrain"]),
            "mae_finetune": epochs_for(budget_s * (1 - args.pretrain_frac), times["supervised"])}
    print(f"calibration: {times['pretrain'] * 1000:.0f} ms/MAE step, {times['supervised'] * 1000:.0f} ms/supervised "
          f"step -> epochs {plan}")

    arms = {}
    t = time.perf_counter()
    scratch = train(supervised_config(args, plan["scratch"], os.path.join(args.output, "scratch")))
    arms["scratch"] = {"epochs": plan["scratch"], "wall_s": time.perf_counter() - t, "top1": scratch["val_top1"],
                       "final_train_loss": scratch["final_train_loss"]}
    print(f"scratch: {arms['scratch']}")

    t = time.perf_counter()
    pretrainer = Pretrainer(pretrain_config(args, plan["mae_pretrain"], os.path.join(args.output, "mae")))
    pre = pretrainer.fit()
    pretrain_s = time.perf_counter() - t
    recon = pretrainer.save_reconstructions()
    t = time.perf_counter()
    tuned = finetune(supervised_config(args, plan["mae_finetune"], os.path.join(args.output, "mae_finetune"),
                                       checkpoint=pretrainer.cfg.output))
    arms["mae_then_finetune"] = {"pretrain_epochs": plan["mae_pretrain"], "finetune_epochs": plan["mae_finetune"],
                                 "pretrain_wall_s": pretrain_s, "finetune_wall_s": time.perf_counter() - t,
                                 "wall_s": pretrain_s + time.perf_counter() - t,
                                 "pretrain_final_loss": pre["final_train_loss"], "top1": tuned["val_top1"],
                                 "final_train_loss": tuned["final_train_loss"]}
    print(f"mae: {arms['mae_then_finetune']}")

    os.makedirs(args.results, exist_ok=True)
    shutil.copyfile(recon, os.path.join(args.results, "fmnist_mae_reconstructions.png"))
    result = {"benchmark": "fmnist_mae", "smoke": args.smoke, "threads": args.threads, "torch": torch.__version__,
              "model": MODEL, "trunk": TRUNK, "budget_min_per_arm": args.budget_min,
              "pretrain_frac": args.pretrain_frac, "ms_per_mae_step": times["pretrain"] * 1000,
              "ms_per_supervised_step": times["supervised"] * 1000,
              "mae_config": pretrainer.cfg.to_dict(), "arms": arms,
              "mae_gain_points": arms["mae_then_finetune"]["top1"] - arms["scratch"]["top1"],
              "wall_clock_s": time.perf_counter() - t0}
    path = os.path.join(args.results, "fmnist_mae.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: v for k, v in result.items() if k != "mae_config"}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
