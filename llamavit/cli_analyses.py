"""`llamavit analyze activations|calibration|quantize|resolution|attention` and `llamavit ablate
illama-ladder`: argument definitions and thin command bodies (the work is in llamavit.eval and
llamavit.ablation)."""
import argparse
import os

LADDER_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                             "ladder_illama.yaml")


def _common(a: argparse.ArgumentParser, output: str, subset_help: str = "use the first N validation images "
            "(default: all)") -> None:
    a.add_argument("--checkpoint", required=True, help="run directory, checkpoint directory or weights file")
    a.add_argument("--data", help="dataset (default: the one the checkpoint was trained on)")
    a.add_argument("--subset", type=int, default=0, help=subset_help)
    a.add_argument("--batch-size", type=int, default=256)
    a.add_argument("--output", default=output, help=f"output directory (default: {output})")
    a.add_argument("--ema", action="store_true", help="use the EMA weights if the checkpoint has them")


def add_analyze_parser(sub) -> None:
    """`llamavit analyze ANALYSIS`: the five analyses of a trained checkpoint."""
    p = sub.add_parser("analyze", help="analyses of a trained model (activations, calibration, ...)",
                       description="Analyses the papers report, run on a llamavit checkpoint.")
    analyses = p.add_subparsers(dest="analysis", required=True, metavar="ANALYSIS")
    a = analyses.add_parser("activations", help="per-token activation magnitude and frequency after each block",
                            description="Information filtering (frozen-LLM paper, section 4): heat maps over the "
                                        "image of each patch token's centred-feature L2 norm and high-frequency "
                                        "content after every block; PNG per image + activations.json.")
    a.add_argument("--checkpoint", required=True, help="run directory, checkpoint directory or weights file")
    a.add_argument("--data", help="dataset (default: the one the checkpoint was trained on)")
    a.add_argument("--num-images", type=int, default=8, help="first N validation images (default: 8)")
    a.add_argument("--high-pass", type=float, default=0.25,
                   help="frequency cut-off in cycles per token, 0.5 = Nyquist (default: 0.25)")
    a.add_argument("--output", default="runs/activations", help="output directory (default: runs/activations)")
    a.add_argument("--ema", action="store_true", help="use the EMA weights if the checkpoint has them")
    a = analyses.add_parser("calibration", help="expected calibration error (15 bins) and reliability diagram",
                            description="ECE over equal-width confidence bins and a reliability diagram; "
                                        "calibration.json + reliability.png.")
    _common(a, "runs/calibration")
    a.add_argument("--bins", type=int, default=15, help="confidence bins (default: 15)")

    a = analyses.add_parser("quantize", help="int8 post-training quantisation: accuracy and size before/after",
                            description="torch.ao int8 quantisation of every Linear on CPU: dynamic, and static "
                                        "(per-Linear quantise/dequantise, scales calibrated on training images); "
                                        "quantization.json + quantization.png.")
    _common(a, "runs/quantize")
    a.add_argument("--methods", nargs="+", default=["dynamic", "static"], choices=["dynamic", "static"])
    a.add_argument("--calibration-batches", type=int, default=4,
                   help="training-image batches that fix the static scales (default: 4)")

    a = analyses.add_parser("resolution", help="accuracy at other input resolutions, without retraining",
                            description="Top-1 at each input size (the eval transform resized); resolution.json "
                                        "+ resolution.png.")
    _common(a, "runs/resolution")
    a.add_argument("--sizes", type=int, nargs="+", required=True, help="input sizes in pixels")

    a = analyses.add_parser("attention", help="attention maps of chosen layers/heads and their ranks",
                            description="Attention probabilities recomputed from q and k in hooks: the class "
                                        "token's (or the mean query's) map over the image per layer and head, "
                                        "numerical and effective ranks, singular-value spectra; one PNG per "
                                        "image + attention_spectrum.png + attention.json.")
    a.add_argument("--checkpoint", required=True, help="run directory, checkpoint directory or weights file")
    a.add_argument("--data", help="dataset (default: the one the checkpoint was trained on)")
    a.add_argument("--num-images", type=int, default=4, help="first N validation images (default: 4)")
    a.add_argument("--layers", type=int, nargs="+", help="attention layer indices, negative allowed (default: all)")
    a.add_argument("--heads", type=int, nargs="+", help="head indices (default: all)")
    a.add_argument("--rtol", type=float, help="rank threshold relative to the largest singular value "
                                              "(default: N x float32 eps, the numerical rank)")
    a.add_argument("--output", default="runs/attention", help="output directory (default: runs/attention)")
    a.add_argument("--ema", action="store_true", help="use the EMA weights if the checkpoint has them")


def add_ablate_parser(sub) -> None:
    """`llamavit ablate illama-ladder`: a ladder file trained rung by rung."""
    p = sub.add_parser("ablate", help="ablation ladders (the iLLaMA ViT -> iLLaMA ladder)", description=(
        "Train every rung of a ladder file with the same budget and seeds, then write ladder.json, ladder.md, "
        "ladder_curves.png and ladder_attention_spectrum.png (attention ranks of every trained rung). "
        "Interrupted runs resume; delete the output directory to start over."))
    p.add_argument("ladder", choices=["illama-ladder"], help="which ladder")
    p.add_argument("--config", default=LADDER_CONFIG, help=f"ladder YAML (default: {LADDER_CONFIG})")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default: 0)")
    p.add_argument("--rungs", nargs="+", help="train only these rungs (default: all)")
    p.add_argument("--epochs", type=int, help="epochs per rung (default: the ladder file's)")
    p.add_argument("--max-steps", type=int, help="stop every rung after N steps (the schedule still spans --epochs)")
    p.add_argument("--train-subset", type=int, help="first N training images (default: the ladder file's, all)")
    p.add_argument("--val-subset", type=int, help="first N test images (default: all)")
    p.add_argument("--batch-size", type=int, help="batch size (default: the ladder file's)")
    p.add_argument("--output", default="runs/ladder_illama", help="output directory (default: runs/ladder_illama)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")


def cmd_analyze(args) -> None:
    """Run one analysis on a checkpoint and print its table."""
    from .eval.loaders import eval_loader
    from .train import model_from_checkpoint, read_meta
    model, meta = model_from_checkpoint(args.checkpoint, use_ema=args.ema).eval(), read_meta(args.checkpoint)
    title = meta.get("model", "")
    if args.analysis == "calibration":
        from .eval.calibration import (analyze_calibration, collect_logits, format_calibration_table,
                                       save_calibration_report)
        loader, data, n = eval_loader(args.checkpoint, args.data, args.subset, args.batch_size)
        result = {**analyze_calibration(*collect_logits(model, loader), num_bins=args.bins), "data": data}
        paths = save_calibration_report(result, args.output, title)
        print(f"{data} ({n} images)\n{format_calibration_table(result)}")
    elif args.analysis == "quantize":
        from .eval.quantize import analyze_quantization, format_quantization_table, save_quantization_report
        loader, data, n = eval_loader(args.checkpoint, args.data, args.subset, args.batch_size)
        calibration = (eval_loader(args.checkpoint, data, 0, args.batch_size, split="train")[0]
                       if "static" in args.methods else None)
        result = {**analyze_quantization(model, loader, calibration, args.methods, args.calibration_batches),
                  "data": data, "calibration_images": args.calibration_batches * args.batch_size}
        paths = save_quantization_report(result, args.output, title)
        print(f"{data} ({n} images), engine {result['engine']}\n{format_quantization_table(result)}")
    elif args.analysis == "resolution":
        from .eval import accuracy_by_resolution
        from .eval.loaders import checkpoint_transform
        from .eval.resolution_report import format_resolution_table, save_resolution_report
        _, data, n = eval_loader(args.checkpoint, args.data, args.subset, args.batch_size)
        tcfg = checkpoint_transform(args.checkpoint)
        results = accuracy_by_resolution(model, data, args.sizes, tcfg, args.batch_size, args.subset)
        paths = save_resolution_report(results, args.output, tcfg.img_size, title)
        print(f"{data} ({n} images), trained at {tcfg.img_size}\n{format_resolution_table(results)}")
    else:   # attention, activations: a few images, one report each
        import torch
        loader, data, _ = eval_loader(args.checkpoint, args.data, args.num_images, args.num_images)
        images, targets = next(iter(loader))
        classes = meta.get("classes")
        labels = [classes[t] if classes else str(int(t)) for t in targets.tolist()]
        if args.analysis == "attention":
            from .eval.attention import analyze_attention, format_rank_table, save_attention_report
            with torch.no_grad():
                result = analyze_attention(model, images, args.layers, args.heads, args.rtol)
            paths = save_attention_report(result, images, args.output, labels)
            print(f"{data}: {len(labels)} images, query: {result['query']}\n{format_rank_table(result)}")
        else:
            from .eval.activations import ActivationConfig, analyze_activations, save_activation_report
            cfg = ActivationConfig(high_pass=args.high_pass)
            with torch.no_grad():
                result = analyze_activations(model, images, cfg)
            paths = save_activation_report(result, images, args.output, labels, cfg)
            print(f"{data}: {len(labels)} images, {len(result['blocks'])} blocks -> {args.output} "
                  f"({len(paths) - 1} PNG + activations.json)")
    print(f"wrote {', '.join(paths)}")


def cmd_ablate(args) -> None:
    """Train every rung of the ladder (resuming finished ones) and write its report."""
    from .ablation import format_ladder_table, load_ladder, run_ladder, save_ladder_report, summarize_ladder
    ladder = load_ladder(args.config)
    budget = {k: getattr(args, k) for k in ("epochs", "max_steps", "train_subset", "val_subset", "batch_size")}
    result = run_ladder(ladder, args.output, seeds=args.seeds, only=args.rungs, progress=args.progress, **budget)
    paths = save_ladder_report(result, args.output)
    print(format_ladder_table(summarize_ladder(result), markdown=False))
    print(f"wrote {', '.join(paths)}")
