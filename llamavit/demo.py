"""`make demo` / `llamavit demo`: a short Fashion-MNIST run of the demo iLLaMA, its evaluation, and
predictions on a few test images saved as PNG files, printing each step."""
import os
import time

from .data import build_dataset
from .predict import predict_images
from .train import TrainConfig, Trainer
from .train.supervised import transform_config

DEMO_MODEL = {"patch_size": 4, "embed_dim": 96, "depth": 6, "num_heads": 3}


def run_demo(output: str = "runs/demo", epochs: int = 1, train_subset: int = 0, num_samples: int = 8) -> dict:
    """Train the demo iLLaMA on Fashion-MNIST, evaluate it, classify test images; -> the run summary."""
    cfg = TrainConfig(model="illama_tiny_patch16_224", model_kwargs=dict(DEMO_MODEL), img_size=28, in_chans=1,
                      data="fashion_mnist", train_subset=train_subset, epochs=epochs, batch_size=128, lr=2e-3,
                      min_lr=1e-5, warmup_epochs=0.1, betas=(0.9, 0.99), clip_grad=1.0, scale=(0.75, 1.0),
                      crop_pct=1.0, soft_mask="linear", soft_mask_epochs=min(0.3, epochs), output=output,
                      log_every=10)
    print(f"[1/3] training iLLaMA ({DEMO_MODEL}, 28x28 grayscale, class token last, soft mask 1 -> 0) on "
          f"{train_subset or 60000} Fashion-MNIST images for {epochs} epoch(s); run directory {output}")
    start = time.perf_counter()
    trainer = Trainer(cfg)
    params = sum(p.numel() for p in trainer.model.parameters())
    summary = trainer.fit()
    print(f"      {params:,} parameters, {summary['steps']} steps in {time.perf_counter() - start:.0f} s, "
          f"final train loss {summary['final_train_loss']:.3f}")

    print("[2/3] evaluating on the 10,000 Fashion-MNIST test images")
    print(f"      test top-1 {summary['val_top1']:.2f}%  top-5 {summary['val_top5']:.2f}%")

    print(f"[3/3] classifying the first {num_samples} test images, saved as PNG files")
    raw_test = build_dataset("fashion_mnist", "val")
    sample_dir = os.path.join(output, "samples")
    os.makedirs(sample_dir, exist_ok=True)
    paths, truths = [], []
    for i in range(num_samples):
        img, label = raw_test[i]
        path = os.path.join(sample_dir, f"test_{i:05d}.png")
        img.save(path)
        paths.append(path)
        truths.append(raw_test.classes[label])
    results = predict_images(trainer.model, paths, transform_config(cfg), trainer.classes, topk=3)
    for path, truth, top in zip(paths, truths, results):
        mark = "ok " if top[0][0] == truth else "MISS"
        print(f"      {mark} {os.path.basename(path)} (true: {truth}): " +
              ", ".join(f"{name} {prob:.0%}" for name, prob in top))
    hits = sum(top[0][0] == truth for truth, top in zip(truths, results))
    print(f"      {hits}/{num_samples} correct")
    print(f"done. Try:  llamavit predict {paths[0]} --checkpoint {output}")
    print(f"            llamavit eval --checkpoint {output}")
    return summary
