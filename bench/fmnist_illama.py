"""Fashion-MNIST from scratch with an iLLaMA sized for 28x28, on 2 CPU threads, in a wall-clock budget.

The run is sized to the budget twice: a short calibration (12 steps) gives a provisional number of
epochs, the first epoch is trained under it, and its measured wall clock then fixes the number of
epochs (the cosine schedule) so that training plus the test evaluations fit in the budget; training
resumes from the first epoch's checkpoint. The re-plan moves the learning rate at the end of epoch 1
by less than 0.1 % (the schedule is still at its peak there), and it makes the run follow what the
machine actually delivers: on this shared machine a 12-step calibration was 10-25 % off the speed
sustained over half an hour. Writes bench/results/fmnist_illama.json and the curve PNG.

    python bench/fmnist_illama.py                 # the 30-minute run
    python bench/fmnist_illama.py --budget-min 3  # a quick look
"""
import argparse
import json
import os
import shutil
import time

import torch
from machine import bf16_native, cpu_model

from llamavit.train import TrainConfig, Trainer

HERE = os.path.dirname(os.path.abspath(__file__))


def seconds_per_step(cfg: TrainConfig, steps: int = 12) -> float:
    """Median seconds of a full training step (data, forward, backward, AdamW) on this machine."""
    probe = Trainer(TrainConfig.from_dict({**cfg.to_dict(), "output": cfg.output + "-calibration",
                                           "progress": False, "train_subset": cfg.batch_size * steps}))
    times = []
    loader = torch.utils.data.DataLoader(probe.train_set, batch_sampler=probe.sampler)
    start = time.perf_counter()
    for images, targets in loader:
        probe.train_step(images, targets)
        now = time.perf_counter()
        times.append(now - start)
        start = now
    shutil.rmtree(cfg.output + "-calibration", ignore_errors=True)
    times = sorted(times[2:])
    return times[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(HERE, "..", "configs", "fmnist_illama.yaml"))
    ap.add_argument("--budget-min", type=float, default=30.0, help="wall-clock budget in minutes (all included)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-epochs", type=int, default=0, help="cap the calibrated number of epochs")
    ap.add_argument("--output", default="runs/fmnist_illama")
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    ap.add_argument("--tag", default="fmnist_illama")
    args = ap.parse_args()

    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    cfg = TrainConfig.from_yaml(args.config, output=args.output, progress=True)
    if cfg.amp and not bf16_native():
        print("warning: the config trains under bf16 autocast, but this CPU reports neither avx512_bf16 nor "
              "amx_bf16: bf16 matmuls will be emulated and slower than fp32; set amp: false")
    step_s = seconds_per_step(cfg)
    steps_per_epoch = 60000 // cfg.batch_size
    # a test pass every eval_every epochs: 10k images, forward only (~1/3 the cost per image)
    eval_share = 10000 / 60000 / 3 * 1.2 / cfg.eval_every

    def epochs_fitting(epoch_s: float) -> int:
        remaining = args.budget_min * 60 - (time.perf_counter() - t0) - 30   # 30 s for start-up and saving
        epochs = max(1, int(remaining // epoch_s))
        return min(epochs, args.max_epochs) if args.max_epochs else epochs

    # the full loop (logging, loaders, checkpoints) runs ~4 % slower than the bare calibration steps
    provisional = epochs_fitting(1.06 * step_s * steps_per_epoch * (1 + eval_share))
    print(f"calibration: {step_s * 1000:.0f} ms/step -> {provisional} epochs (provisional)")
    if os.path.isdir(cfg.output):
        shutil.rmtree(cfg.output)
    first = Trainer(TrainConfig.from_dict({**cfg.to_dict(), "epochs": provisional, "max_steps": steps_per_epoch})).fit()
    if provisional == 1:   # that epoch was the whole run (and ended with the test evaluation)
        epochs, summary = 1, first
    else:   # the later epochs ran up to 13 % slower than the first on this shared machine (wide config:
        # 899 -> 765-860 img/s), so the margin is 12 %
        epochs = 1 + epochs_fitting(1.12 * first["train_seconds"] * (1 + eval_share))
        print(f"first epoch: {first['train_seconds']:.0f} s -> {epochs} epochs in {args.budget_min:g} min")
        cfg = TrainConfig.from_dict({**cfg.to_dict(), "epochs": epochs, "resume": True})
        summary = Trainer(cfg).fit()
    wall = time.perf_counter() - t0

    os.makedirs(args.results, exist_ok=True)
    history = [json.loads(line) for line in open(os.path.join(cfg.output, "log.jsonl"))]
    result = {
        "benchmark": args.tag,
        "machine": {"cpu": cpu_model(), "threads": args.threads, "torch": torch.__version__},
        "config": cfg.to_dict(),
        "calibrated_ms_per_step": step_s * 1000,
        "provisional_epochs": provisional,
        "first_epoch_s": first["train_seconds"],
        "epochs": epochs,
        "wall_clock_s": wall,
        "budget_s": args.budget_min * 60,
        "test_top1": summary.get("val_top1"),
        "test_top5": summary.get("val_top5"),
        "final_train_loss": summary.get("final_train_loss"),
        "per_epoch_test_top1": [r["val_top1"] for r in history if "val_top1" in r],
        "target_top1": 93.0,
    }
    from llamavit.info import model_info
    result["params"] = model_info(cfg.model, img_size=cfg.img_size, in_chans=cfg.in_chans, num_classes=10,
                                  **cfg.model_kwargs)["params"]
    with open(os.path.join(args.results, f"{args.tag}.json"), "w") as f:
        json.dump(result, f, indent=2)
    shutil.copy(os.path.join(cfg.output, "curves.png"), os.path.join(args.results, f"{args.tag}_curves.png"))
    print(f"test top-1 {result['test_top1']:.2f}% after {epochs} epochs in {wall / 60:.1f} min "
          f"(target 93.0%); wrote {os.path.join(args.results, args.tag + '.json')}")


if __name__ == "__main__":
    main()
