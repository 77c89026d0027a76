"""Per-step schedules: the iLLaMA soft-mask rate (the learning rate uses timm's CosineLRScheduler)."""


def soft_mask_rate(step: int, steps_per_epoch: int, schedule: str, cutoff_epochs: float) -> float:
    """iLLaMA's soft-mask rate at an optimiser step (official mask_scheduler, evaluated lazily).

    'constant': 1 for the first cutoff epochs, then 0. 'linear': 1 -> 0 linearly over the first cutoff
    epochs (np.linspace(1, 0, cutoff_steps) endpoints included), then 0.
    """
    cutoff = int(cutoff_epochs * steps_per_epoch)
    if step >= cutoff:
        return 0.0
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 - step / (cutoff - 1) if cutoff > 1 else 1.0
    raise ValueError(f"unknown soft-mask schedule {schedule!r}")
