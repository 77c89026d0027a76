"""DiT vs DiT-LLaMA of the same size on Fashion-MNIST (pixel space, 28x28 padded to 32x32, 1 channel),
same CPU time budget each, then class-conditional samples scored with a llamavit classifier.

Steps: (1) train the feature classifier (a small VisionLLaMA, `--classifier-epochs`) unless
`--classifier RUN` is given; (2) train DiT and DiT-LLaMA (D 128, depth 6, 4 heads, patch 4: 64 tokens;
DiT-LLaMA's SwiGLU
hidden 344 so both have ~1.87M parameters)
with DiT's DDPM hybrid objective (or `--objective flow`, SiT's) for `--budget-min` minutes each;
(3) sample `--num-samples` images balanced over the 10 classes from each EMA model (DDIM `--steps`,
guidance `--cfg-scale`, one seed) and report classifier-feature FID against the 10,000 test images
(NOT Inception-FID: comparable only between these runs) and the classifier's accuracy on the labels
the samples were generated for. Writes bench/results/fmnist_dit.json and a grid PNG per model.

    python bench/fmnist_dit.py                 # ~2 h on 2 cores: classifier ~8 min, 2 x 45 min training,
                                               # 2 x ~8 min sampling (1000 samples, DDIM 50, CFG 1.5)
    python bench/fmnist_dit.py --threads 1 --budget-min 35 --classifier runs/fmnist_illama
                                               # the recorded run: bench/fmnist_illama's 90.5 % iLLaMA as
                                               # the feature classifier, one core, ~85 min
    python bench/fmnist_dit.py --smoke         # ~1 min: tiny subsets and models, checks the pipeline only
"""
import argparse
import json
import os
import time

import torch

from llamavit.diffusion.sampling import class_grid_labels, generate_samples, save_grid
from llamavit.eval.fid import evaluate_generator
from llamavit.train import TrainConfig, model_from_checkpoint, train
from llamavit.train.generate import GenerateConfig, train_generative

HERE = os.path.dirname(os.path.abspath(__file__))
SIZE = dict(embed_dim=128, depth=6, num_heads=4, patch_size=4)
SMOKE_SIZE = dict(embed_dim=32, depth=2, num_heads=2, patch_size=4)
# SwiGLU at 2/3 of 4D rounded to 8 (344) instead of 256 (512): the same MLP parameters as DiT's GELU 4D
LLAMA_MLP = dict(mlp_multiple_of=8)
MODELS = {"dit": "dit_s_4", "dit_llama": "dit_llama_s_4"}


def train_classifier(args, output: str) -> str:
    cfg = TrainConfig(model="visionllama_small_patch16_224", img_size=28, in_chans=1,
                      model_kwargs=dict(patch_size=4, embed_dim=64 if not args.smoke else 16, depth=4 if not args.smoke
                                        else 1, num_heads=2 if not args.smoke else 1, class_token=False,
                                        global_pool="avg"),
                      data="fashion_mnist", epochs=args.classifier_epochs, batch_size=128, lr=2e-3,
                      warmup_epochs=0.2, scale=(0.8, 1.0), hflip=0.5, crop_pct=1.0,
                      train_subset=args.train_subset, val_subset=args.num_real, output=output,
                      progress=not args.smoke)
    summary = train(cfg)
    print(f"classifier: test top-1 {summary.get('val_top1')}")
    return output


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-min", type=float, default=45.0, help="training minutes per model")
    ap.add_argument("--objective", choices=["ddpm", "flow"], default="ddpm")
    ap.add_argument("--classifier", help="an existing llamavit Fashion-MNIST classifier run (skips step 1)")
    ap.add_argument("--classifier-epochs", type=int, default=3)
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--num-real", type=int, default=10000)
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps (ODE steps for flow)")
    ap.add_argument("--cfg-scale", type=float, default=1.5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-4, help="AdamW lr (DiT's 1e-4 is for batch 256 x 400k steps)")
    ap.add_argument("--train-subset", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default="runs/fmnist_dit")
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    ap.add_argument("--smoke", action="store_true", help="tiny subsets, a few steps: checks the pipeline only")
    args = ap.parse_args()
    if args.smoke:
        args.budget_min, args.classifier_epochs, args.num_samples, args.num_real = 0.1, 1, 20, 200
        args.steps, args.train_subset, args.batch_size = 4, 256, 32
    torch.set_num_threads(args.threads)
    os.makedirs(args.results, exist_ok=True)

    classifier = args.classifier or train_classifier(args, os.path.join(args.output, "classifier"))
    result = {"benchmark": "fmnist_dit", "smoke": args.smoke, "threads": args.threads, "torch": torch.__version__,
              "objective": args.objective, "budget_min": args.budget_min, "size": SMOKE_SIZE if args.smoke else SIZE,
              "sampler": "ddim" if args.objective == "ddpm" else "heun", "steps": args.steps,
              "cfg_scale": args.cfg_scale, "seed": args.seed, "num_samples": args.num_samples,
              "fid_note": "Frechet distance of llamavit-classifier pre-logit features, NOT Inception-FID",
              "classifier": classifier, "models": {}}
    labels = class_grid_labels(10, -(-args.num_samples // 10))[:args.num_samples]
    for key, name in MODELS.items():
        run = os.path.join(args.output, key)
        size = {**(SMOKE_SIZE if args.smoke else SIZE), **(LLAMA_MLP if key == "dit_llama" else {})}
        cfg = GenerateConfig(model=name, model_kwargs=size, objective=args.objective,
                             data="fashion_mnist", img_size=32, in_chans=1, epochs=1000, max_minutes=args.budget_min,
                             batch_size=args.batch_size, lr=args.lr, train_subset=args.train_subset,
                             seed=args.seed, output=run, progress=not args.smoke, log_every=50)
        summary = train_generative(cfg)
        model = model_from_checkpoint(run, use_ema=True)
        t0 = time.perf_counter()
        samples = generate_samples(model, labels, args.objective, result["sampler"], steps=args.steps,
                                   cfg_scale=args.cfg_scale, seed=args.seed, clip_denoised=True)
        sample_s = time.perf_counter() - t0
        metrics = evaluate_generator({"pixels": True}, classifier, labels, samples, args.num_real)
        grid = os.path.join(args.results, f"fmnist_{key}_samples.png")
        per_class = 8
        idx = torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in range(10)])
        save_grid(samples[idx], grid, nrow=min(per_class, len(idx) // 10 or 1))
        result["models"][key] = {"model": name, "params": summary["params"], "steps": summary["steps"],
                                 "train_seconds": summary["train_seconds"], "final_loss": summary["final_train_loss"],
                                 "sample_seconds": sample_s, "grid": os.path.relpath(grid, HERE), **metrics}
        print(f"{key}: {summary['steps']} steps, FID(classifier) {metrics['fid']:.3f}, "
              f"conditional accuracy {metrics['accuracy']:.1f}%")
    path = os.path.join(args.results, "fmnist_dit_smoke.json" if args.smoke else "fmnist_dit.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
