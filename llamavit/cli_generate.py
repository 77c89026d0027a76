"""`llamavit generate train|sample|eval`: class-conditional DiT / DiT-LLaMA (thin; the library does the work).

    llamavit generate train --model dit_llama_s_2 --objective ddpm|flow --data fashion_mnist --epochs 10
    llamavit generate sample --checkpoint RUN --sampler ddpm|ddim|euler|heun --steps 250 --cfg-scale 4 --seed 0
    llamavit generate eval --checkpoint RUN --classifier CLS_RUN --num-samples 1000   # classifier-FID, accuracy
"""
import json
import os

import torch

from .cli_options import add_config_flags, config_from_args


def add_generate_parser(sub) -> None:
    """`llamavit generate train|sample|eval`."""
    from .train.generate import HELP, GenerateConfig
    p = sub.add_parser("generate", help="class-conditional image generation (DiT / DiT-LLaMA, DDPM or SiT flow)",
                       description="Train class-conditional diffusion transformers, sample image grids, and "
                                   "score samples with a llamavit classifier.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser("train", help="train a DiT / DiT-LLaMA", description=(
        "Train a dit_* or dit_llama_* model with the DDPM (learned-sigma hybrid loss) or SiT flow objective; EMA of "
        "the weights; --resume continues exactly. Options from --config (YAML) overridden by flags."))
    a.add_argument("--config", help="YAML file of options")
    add_config_flags(a, GenerateConfig, HELP)

    def sampling_flags(q):
        q.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
        q.add_argument("--sampler", choices=["ddpm", "ddim", "euler", "heun"],
                       help="default: ddpm for the DDPM objective, heun for flow")
        q.add_argument("--steps", type=int, default=250, help="sampling steps (respaced DDPM/DDIM or ODE steps)")
        q.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
        q.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--batch-size", type=int, default=256)
        q.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
        q.add_argument("--device", default="cpu")

    s = actions.add_parser("sample", help="sample a class-by-class image grid",
                           description="One row per class: the grid PNG (pixel models) and, beside it, the same name "
                                       "with .pt (the sample tensors and their labels).")
    sampling_flags(s)
    s.add_argument("--per-class", type=int, default=8, help="samples per class (grid columns)")
    s.add_argument("--classes", type=int, nargs="+", help="class indices (default: all)")
    s.add_argument("--output", default="samples.png",
                   help="grid PNG path (default samples.png); <path without .png>.pt is written beside it")

    e = actions.add_parser("eval", help="classifier-feature FID and conditional accuracy of samples", description=(
        "Generate --num-samples images (balanced over classes) and score them with a llamavit classifier "
        "checkpoint: Fréchet distance of its pre-logit features to the Fashion-MNIST test set (NOT Inception-FID) "
        "and its accuracy on the labels the samples were generated for."))
    sampling_flags(e)
    e.add_argument("--classifier", required=True, help="llamavit classifier run trained on the same data")
    e.add_argument("--num-samples", type=int, default=1000)
    e.add_argument("--num-real", type=int, default=10000, help="real test images for the reference statistics")
    e.add_argument("--output", help="write the metrics JSON here")


def _load(args):
    from .train import model_from_checkpoint, read_meta
    from .train.checkpoint import has_ema
    meta = read_meta(args.checkpoint)
    if "objective" not in meta or meta.get("objective") not in ("ddpm", "flow"):
        raise ValueError(f"{args.checkpoint} is not a `llamavit generate train` checkpoint")
    model = model_from_checkpoint(args.checkpoint, use_ema=not args.no_ema and has_ema(args.checkpoint))
    model = model.to(args.device)
    return model, meta


def _sample(args, model, meta, labels):
    from .diffusion.sampling import generate_samples
    return generate_samples(model, labels, meta["objective"], args.sampler, steps=args.steps, cfg_scale=args.cfg_scale,
                            seed=args.seed, batch_size=args.batch_size,
                            diffusion_steps=meta.get("diffusion_steps", 1000),
                            eta=args.eta, clip_denoised=meta.get("pixels", True))


def cmd_generate(args) -> None:
    """Train a generator, sample a grid, or score samples with a classifier."""
    if args.action == "train":
        from .train.generate import GenerateConfig, train_generative
        print(json.dumps(train_generative(config_from_args(GenerateConfig, args)), indent=2))
        return
    from .diffusion.sampling import class_grid_labels, save_grid
    model, meta = _load(args)
    num_classes = len(meta.get("classes") or []) or model.num_classes
    if args.action == "sample":
        classes = args.classes if args.classes is not None else list(range(num_classes))
        labels = torch.tensor(classes).repeat_interleave(args.per_class)
        samples = _sample(args, model, meta, labels)
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        save_grid(samples, args.output, nrow=args.per_class, pixels=meta.get("pixels", True))
        tensors = os.path.splitext(args.output)[0] + ".pt"
        torch.save({"samples": samples, "labels": labels}, tensors)
        print(f"{len(samples)} samples ({len(classes)} classes x {args.per_class}) -> {args.output}, {tensors}")
        return
    per_class = -(-args.num_samples // num_classes)
    labels = class_grid_labels(num_classes, per_class)[:args.num_samples]
    samples = _sample(args, model, meta, labels)
    from .eval.fid import evaluate_generator
    metrics = evaluate_generator(meta, args.classifier, labels, samples, args.num_real)
    metrics.update(sampler=args.sampler or ("ddpm" if meta["objective"] == "ddpm" else "heun"), steps=args.steps,
                   cfg_scale=args.cfg_scale, seed=args.seed, note="classifier-feature FID, not Inception-FID")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(metrics, f, indent=2)
    print(json.dumps(metrics, indent=2))
