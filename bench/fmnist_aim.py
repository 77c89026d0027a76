"""AIM on Fashion-MNIST, 2 CPU threads: pre-train a small AIM on the training images (no labels), then
attentive-probe every saved checkpoint and a randomly initialised trunk of the same shape.

Measures: probe test top-1 per checkpoint, the pre-training loss at each checkpoint and their
correlation (the paper's claim that the objective tracks downstream quality), the gap to the random
trunk, and the pre-training step time against a supervised step of the same trunk. The pre-training
length is sized to `--pretrain-min` from a short calibration; a checkpoint is kept at every epoch end
(and every 1/--checkpoints of the run). Writes bench/results/fmnist_aim.json and fmnist_aim.png.

    python bench/fmnist_aim.py                    # 45 min pre-training (2 quiet cores: 15 epochs) + ~2.5 min per probe
    python bench/fmnist_aim.py --smoke            # a one-minute check of the whole pipeline
    python bench/fmnist_aim.py --reprobe          # probe an existing run's checkpoints again (~2.5 min each)
"""
import argparse
import json
import os
import shutil
import time

import torch
from pretrain_timing import pretrain_vs_supervised_step  # bench/ helper

from llamavit.train import PretrainConfig, Pretrainer
from llamavit.train.config import yaml_values
from llamavit.train.probe import ProbeConfig, Prober

HERE = os.path.dirname(os.path.abspath(__file__))
# the trunk and recipe live in the config the released weights are made with; the benchmark sizes the epochs
RECIPE = os.path.join(HERE, "..", "configs", "fmnist_aim_pretrain.yaml")
TRUNK = yaml_values(RECIPE)["model_kwargs"]


def pretrain_config(args, epochs: int, output: str) -> PretrainConfig:
    return PretrainConfig.from_yaml(RECIPE, epochs=epochs, train_subset=args.train_subset, output=output,
                                    progress=not args.smoke, log_every=20, keep_checkpoints=1000)


def probe(args, checkpoint=None, output="") -> dict:
    cfg = ProbeConfig(checkpoint=checkpoint, model=None if checkpoint else "aim_600m_patch14_224",
                      model_kwargs={} if checkpoint else TRUNK, img_size=0 if checkpoint else 28,
                      in_chans=0 if checkpoint else 1, head="attentive", epochs=args.probe_epochs, batch_size=256,
                      lr=args.probe_lr, train_subset=args.train_subset, val_subset=args.val_subset, output=output,
                      progress=not args.smoke)
    return Prober(cfg).fit()


def pretrain(args):
    """Calibrate the step time, size the run to the budget, pre-train; (config, step times, seconds, summary)."""
    # calibrate the step time, then size the run to the budget
    calib = Pretrainer(pretrain_config(args, 1, os.path.join(args.output, "calibration")))
    times = pretrain_vs_supervised_step(calib, calib.cfg.batch_size, steps=6)
    per_epoch = (args.train_subset or 60000) // 128
    steps = max(args.checkpoints, int(args.pretrain_min * 60 / (1.08 * times["pretrain"])))
    epochs = max(1, round(steps / per_epoch))
    trainer = Pretrainer(pretrain_config(args, epochs, os.path.join(args.output, "pretrain")))
    trainer.cfg.ckpt_every = max(1, trainer.total_steps // args.checkpoints)
    trainer.cfg.log_every = min(20, trainer.cfg.ckpt_every)
    print(f"calibration: {times['pretrain'] * 1000:.0f} ms/pre-training step, {times['supervised'] * 1000:.0f} "
          f"ms/supervised step -> {epochs} epochs ({trainer.total_steps} steps)")
    t_pre = time.perf_counter()
    summary = trainer.fit()
    return trainer.cfg, times, time.perf_counter() - t_pre, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrain-min", type=float, default=45.0, help="pre-training budget in minutes")
    ap.add_argument("--checkpoints", type=int, default=5,
                    help="besides every epoch end, a checkpoint every 1/N of the run (all are probed)")
    ap.add_argument("--probe-epochs", type=int, default=20, help="probe epochs (on cached features: cheap)")
    ap.add_argument("--probe-lr", type=float, default=3e-3)
    ap.add_argument("--reprobe", action="store_true",
                    help="probe the checkpoints of an existing --output run again (no pre-training); the "
                         "pre-training figures are kept from the existing results JSON")
    ap.add_argument("--train-subset", type=int, default=0)
    ap.add_argument("--val-subset", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", default="runs/fmnist_aim")
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    ap.add_argument("--smoke", action="store_true", help="tiny subsets, a few steps: checks the pipeline only")
    args = ap.parse_args()
    if args.smoke:
        args.pretrain_min, args.checkpoints, args.probe_epochs = 0.3, 2, 1
        args.train_subset, args.val_subset = args.train_subset or 1024, args.val_subset or 512
        args.results = os.path.join(args.output, "results")
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    json_path = os.path.join(args.results, "fmnist_aim.json")
    if args.reprobe:
        if not os.path.isfile(json_path):
            raise SystemExit(f"--reprobe needs the results of a finished run: {json_path} does not exist")
        with open(json_path) as f:
            previous = json.load(f)
        cfg = PretrainConfig.from_dict(previous["pretrain_config"])
        times = {"pretrain": previous["ms_per_pretrain_step"] / 1000,
                 "supervised": previous["ms_per_supervised_step"] / 1000}
        pretrain_s, summary = previous["pretrain_wall_s"], {"final_train_loss": previous["pretrain_final_loss"]}
    else:
        shutil.rmtree(args.output, ignore_errors=True)
        cfg, times, pretrain_s, summary = pretrain(args)

    # probe every checkpoint and the random trunk
    ckpt_root = os.path.join(cfg.output, "checkpoints")
    history = [json.loads(line) for line in open(os.path.join(cfg.output, "log.jsonl"))]
    steps_per_epoch = (cfg.train_subset or 60000) // cfg.batch_size
    points = []
    for name in sorted(d for d in os.listdir(ckpt_root) if d.startswith("step-")):
        step = int(name.split("-")[1])
        # the loss over the last ~epoch of steps before the checkpoint
        span = min(steps_per_epoch, cfg.ckpt_every)
        window = [r["loss"] for r in history if "loss" in r and step - span < r["step"] <= step]
        result = probe(args, os.path.join(ckpt_root, name), os.path.join(args.output, "probe", name))
        points.append({"step": step, "pretrain_loss": sum(window) / max(1, len(window)),
                       "probe_top1": result["val_top1"]})
        print(f"{name}: pre-training loss {points[-1]['pretrain_loss']:.4f}, probe top-1 {result['val_top1']:.2f}")
    random_top1 = probe(args, None, os.path.join(args.output, "probe", "random"))["val_top1"]
    losses, accs = torch.tensor([p["pretrain_loss"] for p in points]), torch.tensor([p["probe_top1"] for p in points])
    corr = torch.corrcoef(torch.stack((losses, accs)))[0, 1].item() if len(points) > 2 else None

    os.makedirs(args.results, exist_ok=True)
    result = {"benchmark": "fmnist_aim", "smoke": args.smoke, "threads": args.threads, "torch": torch.__version__,
              "trunk": TRUNK, "pretrain_config": cfg.to_dict(), "pretrain_wall_s": pretrain_s,
              "pretrain_final_loss": summary["final_train_loss"], "checkpoints": points,
              "final_probe_top1": points[-1]["probe_top1"], "random_trunk_probe_top1": random_top1,
              "gain_over_random": points[-1]["probe_top1"] - random_top1, "loss_vs_probe_pearson": corr,
              "ms_per_pretrain_step": times["pretrain"] * 1000, "ms_per_supervised_step": times["supervised"] * 1000,
              "pretrain_over_supervised_step_time": times["pretrain"] / times["supervised"],
              "probe": {"head": "attentive", "epochs": args.probe_epochs, "lr": args.probe_lr, "batch_size": 256},
              "reprobed": args.reprobe, "wall_clock_s": time.perf_counter() - t0}
    with open(json_path, "w") as f:
        json.dump(result, f, indent=2)
    plot(points, random_top1, os.path.join(args.results, "fmnist_aim.png"))
    print(json.dumps({k: v for k, v in result.items() if k not in ("pretrain_config", "checkpoints")}, indent=2))


def plot(points, random_top1: float, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([p["pretrain_loss"] for p in points], [p["probe_top1"] for p in points], "o-")
    labelled = points[::max(1, len(points) // 6)] + points[-1:]   # the late points crowd together
    for p in {p["step"]: p for p in labelled}.values():
        ax.annotate(str(p["step"]), (p["pretrain_loss"], p["probe_top1"]), fontsize=7)
    ax.axhline(random_top1, color="grey", ls="--", label=f"random trunk {random_top1:.1f}%")
    ax.set_xlabel("pre-training loss (normalised-pixel MSE)")
    ax.set_ylabel("attentive probe test top-1 (%)")
    ax.invert_xaxis()
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
