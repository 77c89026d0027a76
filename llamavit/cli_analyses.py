"""`llamavit analyze activations|calibration|quantize|resolution|attention` and `llamavit ablate
illama-ladder|aim`: argument definitions and thin command bodies (the work is in llamavit.eval and
llamavit.ablation)."""
import argparse
import os
from typing import Dict, List

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
LADDER_CONFIG = os.path.join(CONFIGS, "ladder_illama.yaml")
AIM_CONFIG = os.path.join(CONFIGS, "ablation_aim.yaml")
LLM_CONFIG = os.path.join(CONFIGS, "ablation_frozen_llm.yaml")


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
    a.add_argument("--foreground-threshold", type=float,
                   help="score each map as a foreground detector, the foreground being the pixels brighter than this "
                        "(0-1, the normalisation undone; default: 0.1 on fashion_mnist, where the item is the only "
                        "non-black content, else no score)")
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

    add_shape_bias_parser(analyses)
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


def add_shape_bias_parser(analyses) -> None:
    a = analyses.add_parser("shape-bias", help="shape-texture bias on cue-conflict images (Geirhos et al.)",
                            description="Cue-conflict images (the silhouette of one test item filled with the "
                                        "texture of an item of another class; eval/shape_bias.py) and each "
                                        "model's shape bias: shape / (shape + texture) decisions.")
    a.add_argument("--checkpoint", nargs="+", required=True,
                   help="one or more runs / checkpoints / timm folders trained on the same classes")
    a.add_argument("--data", help="dataset (default: the one the first checkpoint was trained on)")
    a.add_argument("--count", type=int, default=1000, help="cue-conflict images from the first N test items")
    a.add_argument("--seed", type=int, default=0, help="seed of the shape-texture pairing")
    a.add_argument("--threshold", type=float, default=0.1, help="silhouette: pixels brighter than this in [0, 1]")
    a.add_argument("--patch", type=int, default=8, help="side of the texture window, in pixels")
    a.add_argument("--output", default="runs/shape_bias", help="output directory (default: runs/shape_bias)")
    a.add_argument("--ema", action="store_true", help="use the EMA weights if the checkpoints have them")


def add_ablate_parser(sub) -> None:
    """`llamavit ablate illama-ladder|aim|llm-layers`: a ladder file trained rung by rung, AIM's ablation arms, or
    the frozen-LLM arms (controls, the layer sweep, stacked layers)."""
    p = sub.add_parser("ablate", help="ablations: the iLLaMA ViT -> iLLaMA ladder, AIM's pre-training ablations, "
                                      "the frozen-LLM layer sweep",
                       description=(
        "illama-ladder: train every rung of a ladder file with the same budget and seeds, then write ladder.json, "
        "ladder.md, ladder_curves.png and ladder_attention_spectrum.png (attention ranks of every trained rung). "
        "aim: pre-train every arm of an AIM ablation file with the same budget, attentive-probe each, judge the "
        "paper's claims, and write aim_ablation.json, aim_ablation.md and aim_ablation.png. "
        "llm-layers: train the ViT alone, with a random frozen block, with each swept LLM layer and with stacked "
        "last layers (side by side with --jobs), score each model's information filtering, judge the paper's "
        "claims, and write frozen_llm_ablation.json, .md and .png. "
        "Interrupted runs resume and finished arms are kept; delete the output directory to start over."))
    p.add_argument("ladder", choices=["illama-ladder", "aim", "llm-layers"], help="which ablation")
    p.add_argument("--config", help=f"ablation YAML (default: {LADDER_CONFIG} / {AIM_CONFIG} / {LLM_CONFIG})")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default: 0 for the ladder, 0 1 for aim)")
    p.add_argument("--rungs", nargs="+", help="illama-ladder: train only these rungs (default: all)")
    p.add_argument("--arms", nargs="+", help="aim, llm-layers: run only these arms (aim: and those they reuse; "
                                             "default: all)")
    p.add_argument("--jobs", type=int, default=1, help="llm-layers: runs side by side (default: 1)")
    p.add_argument("--threads", type=int, help="llm-layers: CPU threads per run (default: the cores / --jobs)")
    p.add_argument("--epochs", type=int, help="epochs per rung / arm (default: the file's)")
    p.add_argument("--max-steps", type=int, help="illama-ladder: stop every rung after N steps")
    p.add_argument("--train-subset", type=int, help="first N training images (default: the file's, all)")
    p.add_argument("--val-subset", type=int, help="first N test images (default: all)")
    p.add_argument("--batch-size", type=int, help="batch size (default: the file's)")
    p.add_argument("--probe-epochs", type=int, help="aim: probe epochs (default: the file's)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="aim: bf16 autocast in pre-training (default: the file's; fast only on CPUs with bf16)")
    p.add_argument("--smoke", action="store_true",
                   help="aim, llm-layers: tiny subsets and one epoch: checks the pipeline only")
    p.add_argument("--output", help="output directory (default: runs/ladder_illama / runs/ablation_aim / "
                                    "runs/ablation_frozen_llm)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")


def short_names(paths: List[str]) -> Dict[str, str]:
    """Each path's shortest trailing components that tell it from the others (runs/a/seed0, runs/b/seed0 ->
    a/seed0, b/seed0). A checkpoint given twice is refused."""
    parts = {p: os.path.normpath(p).split(os.sep) for p in paths}
    if len({os.path.normpath(p) for p in paths}) < len(paths):
        raise ValueError(f"a checkpoint is given twice: {' '.join(paths)}")
    for k in range(1, max(len(v) for v in parts.values()) + 1):
        names = {p: "/".join(v[-k:]) for p, v in parts.items()}
        if len(set(names.values())) == len(names):
            return names
    return {p: os.path.normpath(p) for p in paths}


def _shape_bias(args) -> None:
    """analyze shape-bias: one cue-conflict set, every checkpoint's score."""
    import torch
    from torchvision.transforms.functional import pil_to_tensor

    from .data import build_dataset
    from .eval.fid import classifier_inputs
    from .eval.loaders import checkpoint_transform, training_data
    from .eval.shape_bias import build_cue_conflict_set, save_shape_bias_report, shape_bias_score
    from .train import model_from_checkpoint, read_meta
    data = args.data or training_data(args.checkpoint[0])
    dataset = build_dataset(data, "val")
    classes = list(dataset.classes)
    count = min(args.count, len(dataset))
    items = [dataset[i] for i in range(count)]
    images = torch.stack([pil_to_tensor(img.convert("L"))[0].float() / 255 for img, _ in items])
    labels = torch.tensor([int(label) for _, label in items])
    cue = build_cue_conflict_set(images, labels, count, args.seed, args.threshold, args.patch)
    result = {"set": {"data": data, "count": count, "seed": args.seed, "threshold": args.threshold,
                      "patch": args.patch, "shape_labels": cue["shape_labels"].tolist(),
                      "texture_labels": cue["texture_labels"].tolist()}, "models": {}}
    predictions, names = {}, short_names(args.checkpoint)
    for path in args.checkpoint:
        model_classes = read_meta(path).get("classes")
        if model_classes and list(model_classes) != classes:
            raise ValueError(f"{path} predicts {len(model_classes)} classes other than {data}'s: shape bias needs "
                             f"a model of the dataset's classes")
        tcfg = checkpoint_transform(path)
        model = model_from_checkpoint(path, use_ema=args.ema).eval()
        x = classifier_inputs(cue["images"], tcfg.img_size, tcfg.in_chans, tcfg.mean, tcfg.std)
        with torch.no_grad():
            predicted = torch.cat([model(chunk).argmax(-1) for chunk in x.split(256)])
        name = names[path]
        predictions[name] = predicted
        result["models"][name] = {"checkpoint": path, **shape_bias_score(predicted, cue["shape_labels"],
                                                                         cue["texture_labels"], classes)}
    print(f"{data}: {count} cue-conflict images (seed {args.seed}, texture window {args.patch} px)")
    print(f"{'model':24s} {'shape bias':>10s} {'shape':>6s} {'texture':>8s} {'other':>6s}")
    for name, r in result["models"].items():
        bias = "-" if r["shape_bias"] is None else f"{r['shape_bias']:.3f}"
        print(f"{name:24s} {bias:>10s} {r['shape_decisions']:6d} {r['texture_decisions']:8d} {r['other_decisions']:6d}")
    paths = save_shape_bias_report(result, cue["images"], predictions, args.output, classes)
    print(f"wrote {', '.join(paths)}")


def cmd_analyze(args) -> None:
    """Run one analysis on a checkpoint and print its table."""
    from .eval.loaders import eval_loader
    from .train import model_from_checkpoint, read_meta
    if args.analysis == "shape-bias":
        return _shape_bias(args)
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
            from .eval.activations import (ActivationConfig, analyze_activations, foreground_from_images,
                                           format_foreground_table, save_activation_report)
            from .eval.loaders import checkpoint_transform
            cfg = ActivationConfig(high_pass=args.high_pass)
            threshold = args.foreground_threshold
            if threshold is None and data == "fashion_mnist":
                threshold = 0.1
            foreground = None
            if threshold is not None:
                from .data.transforms import rgb_normalization
                tcfg = checkpoint_transform(args.checkpoint)
                mean, std = rgb_normalization(tcfg.mean, tcfg.std, tcfg.in_chans)
                foreground = foreground_from_images(images, mean, std, threshold)
            with torch.no_grad():
                result = analyze_activations(model, images, cfg, foreground)
            paths = save_activation_report(result, images, args.output, labels, cfg)
            if foreground is not None:
                print(format_foreground_table(result))
            print(f"{data}: {len(labels)} images, {len(result['blocks'])} blocks -> {args.output} "
                  f"({len(paths) - 1} PNG + activations.json)")
    print(f"wrote {', '.join(paths)}")


def cmd_ablate(args) -> None:
    """Train every rung of the ladder / arm of the AIM ablation (resuming finished ones) and write its report."""
    if args.ladder == "aim":
        return _ablate_aim(args)
    if args.ladder == "llm-layers":
        return _ablate_llm(args)
    from .ablation import format_ladder_table, load_ladder, run_ladder, save_ladder_report, summarize_ladder
    ladder = load_ladder(args.config or LADDER_CONFIG)
    budget = {k: getattr(args, k) for k in ("epochs", "max_steps", "train_subset", "val_subset", "batch_size")}
    output = args.output or "runs/ladder_illama"
    result = run_ladder(ladder, output, seeds=args.seeds or [0], only=args.rungs, progress=args.progress, **budget)
    paths = save_ladder_report(result, output)
    print(format_ladder_table(summarize_ladder(result), markdown=False))
    print(f"wrote {', '.join(paths)}")


def _ablate_aim(args) -> None:
    from .ablation.aim import SMOKE, format_claims, load_aim_ablation, run_aim_ablation, save_aim_report
    ablation = load_aim_ablation(args.config or AIM_CONFIG)
    pretrain = {"epochs": args.epochs, "train_subset": args.train_subset, "batch_size": args.batch_size,
                "amp": args.amp}
    probe = {"epochs": args.probe_epochs, "val_subset": args.val_subset}
    seeds, output, progress = args.seeds or [0, 1], args.output or "runs/ablation_aim", args.progress
    if args.smoke:
        pretrain, probe = {**pretrain, **SMOKE["pretrain"]}, {**probe, **SMOKE["probe"]}
        seeds, output, progress = args.seeds or [0], args.output or "runs/ablation_aim_smoke", False
    result = run_aim_ablation(ablation, output, seeds=seeds, only=args.arms, progress=progress,
                              pretrain_budget=pretrain, probe_budget=probe)
    result["smoke"] = args.smoke
    paths = save_aim_report(result, output)
    print(format_claims(result["claims"]))
    print(f"wrote {', '.join(paths)}")


def _ablate_llm(args) -> None:
    from .ablation.frozen_llm import SMOKE, format_llm_claims, format_llm_table, load_llm_ablation, run_llm_ablation, \
        save_llm_report
    ablation = load_llm_ablation(args.config or LLM_CONFIG)
    budget = {k: getattr(args, k) for k in ("epochs", "train_subset", "val_subset", "batch_size")}
    seeds, output = args.seeds or [0, 1], args.output or "runs/ablation_frozen_llm"
    if args.smoke:
        budget, seeds = {**budget, **SMOKE["train"]}, args.seeds or [0]
        output = args.output or output + "_smoke"
        ablation.score_images = SMOKE["score_images"]
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    result = run_llm_ablation(ablation, output, seeds=seeds, only=args.arms, jobs=args.jobs, threads=threads,
                              **budget)
    result["smoke"] = args.smoke
    paths = save_llm_report(result, output)
    print(format_llm_table(result["summary"]))
    print(format_llm_claims(result["claims"]))
    print(f"wrote {', '.join(paths)}")
