"""Step time of a pre-training objective against a supervised step of the same trunk (bench helper)."""
import time

import torch
import torch.nn.functional as F


def pretrain_vs_supervised_step(trainer, batch_size: int, steps: int) -> dict:
    """Median seconds of `trainer.train_step(images)` and of a supervised step (cross-entropy on a fresh
    10-class head, AdamW over every weight) of `trainer.model`, on one batch of its training images.
    Leaves the trunk headless again (num_classes 0) but its weights updated: build a fresh trainer after."""
    images = next(iter(torch.utils.data.DataLoader(trainer.train_set, batch_size=batch_size)))[0]
    model = trainer.model
    model.reset_classifier(10)
    labels = torch.randint(0, 10, (images.shape[0],))
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)

    def supervised():
        loss = F.cross_entropy(model(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    out = {}
    for name, fn in (("pretrain", lambda: trainer.train_step(images)), ("supervised", supervised)):
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out[name] = sorted(times[1:])[len(times[1:]) // 2]
    model.reset_classifier(0)
    return out
