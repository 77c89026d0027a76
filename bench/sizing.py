"""Sizing a benchmark arm to a CPU budget from its measured step time (bench helper)."""
import time


def seconds_per_step(trainer, steps: int = 4) -> float:
    """Median seconds of trainer.train_step over `steps` batches (after one warm-up); the trainer is spent
    (its weights moved): build a fresh one for the run."""
    batches = iter(trainer.epoch_batches(0, 0))
    trainer.module.train()
    times = []
    for _ in range(max(2, min(steps + 1, trainer.steps_per_epoch))):
        batch = next(batches)
        t = time.perf_counter()
        trainer.train_step(*batch)
        times.append(time.perf_counter() - t)
    return sorted(times[1:])[len(times[1:]) // 2]


def epochs_for(minutes: float, step_s: float, steps_per_epoch: int) -> int:
    """Whole epochs (at least 1) closest to `minutes` of training at `step_s` seconds per step."""
    return max(1, round(minutes * 60 / step_s / steps_per_epoch))
