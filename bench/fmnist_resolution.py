"""Resolution transfer on Fashion-MNIST: AS2DRoPE vs 2D RoPE vs learned positions, no retraining.

Three models of the same size (D 96, depth 6, 3 heads, patch 4, class token, ~0.67M parameters) are
trained with the same recipe and budget at one resolution (32 px: Fashion-MNIST's 28 px upsampled,
an 8x8 grid), then evaluated on the full test set resized to 0.5x-2x that resolution:
- `vit`: timm's ViT with a learned absolute position embedding, bicubically interpolated to the new
  grid at test time (`dynamic_img_size=True`);
- `visionllama_2drope`: plain VisionLLaMA, 2D RoPE on raw patch indices (rope_auto_scale=False);
- `visionllama_as2drope`: the same with AS2DRoPE: positions * (anchor / input height), anchor = the
  training resolution, so a larger image covers the training position range more finely.
The paper's claim: AS2DRoPE degrades least away from the training resolution.
Writes bench/results/fmnist_resolution.json and fmnist_resolution.png.

    python bench/fmnist_resolution.py                  # 3 models x 4 epochs, ~25 min on 2 cores
    python bench/fmnist_resolution.py --epochs 1 --train-subset 2048 --test-subset 512   # smoke run
"""
import argparse
import json
import os
import shutil
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from llamavit.eval import accuracy_by_resolution  # noqa: E402
from llamavit.train import TrainConfig, Trainer  # noqa: E402
from llamavit.train.supervised import transform_config  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN_SIZE = 32
SIZES = (16, 20, 24, 28, 32, 40, 48, 56, 64)
SHAPE = {"patch_size": 4, "embed_dim": 96, "depth": 6, "num_heads": 3}
MODELS = {
    "vit": ("timm:vit_tiny_patch16_224", {**SHAPE, "dynamic_img_size": True}),
    "visionllama_2drope": ("visionllama_small_patch16_224", {**SHAPE, "rope_auto_scale": False}),
    "visionllama_as2drope": ("visionllama_small_patch16_224", {**SHAPE, "rope_auto_scale": True,
                                                               "rope_ref_img_size": TRAIN_SIZE}),
}
RECIPE = dict(img_size=TRAIN_SIZE, in_chans=1, data="fashion_mnist", scale=(0.75, 1.0), hflip=0.5, crop_pct=1.0,
              batch_size=128, lr=2e-3, min_lr=1e-5, warmup_epochs=0.5, weight_decay=0.05, betas=(0.9, 0.99),
              clip_grad=1.0, label_smoothing=0.1, progress=False, log_every=50)


def plot(results: dict, path: str) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, r in results["models"].items():
        pts = [(p["img_size"], p["top1"]) for p in r["by_resolution"] if "top1" in p]
        ax.plot([s for s, _ in pts], [a for _, a in pts], "o-", label=f"{name} ({r['params'] / 1e6:.2f}M)")
    ax.axvline(TRAIN_SIZE, color="grey", ls=":", lw=1)
    ax.set_xlabel("test resolution (px); trained at 32")
    ax.set_ylabel("Fashion-MNIST test top-1 (%)")
    ax.set_title(f"Resolution transfer without retraining ({results['epochs']} epochs each)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-subset", type=int, default=0)
    ap.add_argument("--test-subset", type=int, default=0)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--output", default="runs/fmnist_resolution")
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    results = {"benchmark": "fmnist_resolution", "train_size": TRAIN_SIZE, "sizes": list(SIZES),
               "epochs": args.epochs, "seed": args.seed, "recipe": {k: v for k, v in RECIPE.items() if k != "progress"},
               "train_subset": args.train_subset, "test_subset": args.test_subset, "models": {}}
    for tag in args.models:
        model_name, kwargs = MODELS[tag]
        out = os.path.join(args.output, tag)
        shutil.rmtree(out, ignore_errors=True)
        cfg = TrainConfig.from_dict({**RECIPE, "model": model_name, "model_kwargs": kwargs, "epochs": args.epochs,
                                     "seed": args.seed, "output": out, "train_subset": args.train_subset,
                                     "val_subset": args.test_subset})
        t0 = time.perf_counter()
        trainer = Trainer(cfg)
        summary = trainer.fit()
        train_s = time.perf_counter() - t0
        sweep = accuracy_by_resolution(trainer.model, "fashion_mnist", SIZES, transform_config(cfg),
                                       subset=args.test_subset)
        at_train = next(p["top1"] for p in sweep if p["img_size"] == TRAIN_SIZE)
        results["models"][tag] = {
            "model": model_name, "model_kwargs": kwargs, "params": sum(p.numel() for p in trainer.model.parameters()),
            "train_seconds": train_s, "final_train_loss": summary.get("final_train_loss"),
            "by_resolution": sweep,
            "drop_vs_train_res": {p["img_size"]: at_train - p["top1"] for p in sweep if "top1" in p}}
        print(f"{tag}: trained {train_s / 60:.1f} min; " +
              ", ".join(f"{p['img_size']}px {p['top1']:.1f}" for p in sweep if "top1" in p), flush=True)

    others = [t for t in results["models"] if t != "visionllama_as2drope"]
    if "visionllama_as2drope" in results["models"] and others:
        away = [s for s in SIZES if s != TRAIN_SIZE]
        mean_drop = {t: sum(results["models"][t]["drop_vs_train_res"][s] for s in away) / len(away)
                     for t in results["models"]}
        results["mean_drop_away_from_train_res"] = mean_drop
        results["claim_holds"] = all(mean_drop["visionllama_as2drope"] < mean_drop[t] for t in others)
    os.makedirs(args.results, exist_ok=True)
    with open(os.path.join(args.results, "fmnist_resolution.json"), "w") as f:
        json.dump(results, f, indent=2)
    plot(results, os.path.join(args.results, "fmnist_resolution.png"))
    print("| model | " + " | ".join(f"{s}px" for s in SIZES) + " |")
    print("|---" * (len(SIZES) + 1) + "|")
    for tag, r in results["models"].items():
        cells = [f"{p['top1']:.1f}" if "top1" in p else "-" for p in r["by_resolution"]]
        print(f"| {tag} | " + " | ".join(cells) + " |")
    if "claim_holds" in results:
        print(f"mean top-1 drop away from {TRAIN_SIZE}px: " +
              ", ".join(f"{t} {d:.2f}" for t, d in results["mean_drop_away_from_train_res"].items()) +
              f" -> AS2DRoPE degrades least: {results['claim_holds']}")


if __name__ == "__main__":
    main()
