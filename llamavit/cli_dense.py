"""`llamavit scenes build`, `llamavit segment|detect train|eval|predict` (thin; the library does the work).

    llamavit scenes build --output data/scenes            Fashion-MNIST scenes in the ADE20K and COCO layouts
    llamavit segment train --data data/scenes --backbone visionllama_pyramid_small_224 --head upernet
    llamavit segment eval --checkpoint RUN [--mode slide]   mIoU, mAcc, aAcc and per-class IoU
    llamavit segment predict IMG... --checkpoint RUN --output DIR   overlay PNGs and label maps
    llamavit detect train --data data/scenes --backbone visionllama_pyramid_small_224 --detector fcos
    llamavit detect eval --checkpoint RUN                  COCO box (and mask) mAP, per-class AP
    llamavit detect predict IMG... --checkpoint RUN --output DIR   PNGs with the boxes and class names
"""
import dataclasses
import json
import os

from .cli_options import add_config_flags, config_from_args, run_and_print


def add_scenes_parser(sub) -> None:
    """`llamavit scenes build`."""
    from .data.scenes import SceneConfig
    p = sub.add_parser("scenes", help="build the Fashion-MNIST scenes (segmentation + detection data)",
                       description="Deterministic scenes of Fashion-MNIST items pasted at random scales and positions "
                                   "(occluding each other), written in the ADE20K and COCO layouts. Derived from real "
                                   "images; not a standard benchmark.")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser("build", help="write the scenes", description="Write the scenes into --output "
                           "(skipped when the same scenes are there already).")
    a.add_argument("--output", required=True, help="directory for the scenes")
    defaults = SceneConfig()
    for f in dataclasses.fields(SceneConfig):
        a.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=type(getattr(defaults, f.name)),
                       default=getattr(defaults, f.name), help=f"(default: {getattr(defaults, f.name)})")


def cmd_scenes(args) -> None:
    from .data.scenes import SceneConfig, build_scenes
    cfg = SceneConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SceneConfig)})
    manifest = build_scenes(args.output, cfg, progress=True)
    counts = manifest["counts"]
    print(f"{args.output}: {counts['train']['images']} training and {counts['val']['images']} validation scenes, "
          f"{len(manifest['classes'])} segmentation classes, {len(manifest['categories'])} detection categories")


def add_task_parser(sub, task: str, config_cls: type, helps: dict, what: str, texts: dict,
                    inference_flags=lambda q, action: None) -> None:
    """`llamavit <task> train|eval|predict` for a dense task: train takes the config's flags; eval and predict a
    checkpoint, --ema, --device and `inference_flags(parser, action)`; texts holds each action's help and
    description."""
    p = sub.add_parser(task, help=texts["help"], description=texts["description"])
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser("train", help=f"train a {what}", description=(
        f"Train a {what} on the step loop (every loop flag: --resume, --amp, --grad-accum-steps, ...); "
        f"{texts['train']}. Options from --config (YAML) overridden by flags."))
    a.add_argument("--config", help="YAML file of options (see configs/)")
    add_config_flags(a, config_cls, helps)

    def checkpoint_flags(q, action):
        q.add_argument("--checkpoint", required=True, help=f"a `{task} train` run or checkpoint directory")
        q.add_argument("--ema", action="store_true", help="use the EMA weights")
        q.add_argument("--device", default="cpu")
        inference_flags(q, action)

    e = actions.add_parser("eval", help=texts["eval"][0], description=texts["eval"][1])
    checkpoint_flags(e, "eval")
    e.add_argument("--data", help=f"{texts['data']} directory (default: the run's)")
    e.add_argument("--batch-size", type=int, default=1, help="images per batch (they must share a size)")
    e.add_argument("--json", action="store_true", help="print JSON")
    r = actions.add_parser("predict", help=texts["predict"][0], description=texts["predict"][1])
    r.add_argument("images", nargs="+", help="image files")
    checkpoint_flags(r, "predict")
    r.add_argument("--output", required=True, help="directory for the PNGs")


def add_segment_parser(sub) -> None:
    """`llamavit segment train|eval|predict`."""
    from .train.segment import HELP, SegmentConfig

    def inference_flags(q, action):
        q.add_argument("--mode", choices=["whole", "slide"], default="whole", help="inference (default: whole)")
        q.add_argument("--stride", type=int, default=0, help="slide stride (default: 2/3 of the training crop)")
    add_task_parser(sub, "segment", SegmentConfig, HELP, "segmenter", {
        "help": "semantic segmentation: train, evaluate, predict",
        "description": "Semantic segmentation with any llamavit or timm backbone (UperNet, FPN or linear head) on "
                       "ADE20K- or COCO-layout data.",
        "train": "validation mIoU each epoch; summary.json holds miou",
        "eval": ("mIoU of a segmenter", "mIoU, mAcc, aAcc and per-class IoU of a checkpoint on the validation split "
                 "of --data (default: the data it was trained on)."),
        "data": "ADE20K- or COCO-layout",
        "predict": ("segment image files", "Per-pixel classes of image files: writes <output>/<name>.png (overlay) "
                    "and <name>_labels.png (class index per pixel).")}, inference_flags)


def cmd_segment(args) -> None:
    if args.action == "train":
        from .train.segment import SegmentConfig, segment
        run_and_print(segment, config_from_args(SegmentConfig, args), drop=("acc",))
    elif args.action == "eval":
        _segment_eval(args)
    else:
        _segment_predict(args)


def _segment_eval(args) -> None:
    from .data.dense import DenseTransformConfig, build_dense_transform
    from .eval.segmentation import evaluate_segmentation
    from .train.segment import load_segmenter, segmentation_dataset
    model, meta = load_segmenter(args.checkpoint, use_ema=args.ema)
    tcfg = DenseTransformConfig(**meta["transform"])
    data = args.data or meta["data"]
    dataset = segmentation_dataset(data, "val", build_dense_transform(tcfg, False, "segment"),
                                   meta.get("reduce_zero_label", True))
    if list(dataset.classes) != list(meta["classes"]):
        raise ValueError(f"{data} names other classes than the checkpoint was trained on")
    model.to(args.device)
    metrics = evaluate_segmentation(model, dataset, len(meta["classes"]), meta["classes"], mode=args.mode,
                                    crop=tcfg.img_size, stride=args.stride, batch_size=args.batch_size,
                                    device=args.device)
    if args.json:
        print(json.dumps(metrics, indent=2))
        return
    print(f"{data} ({len(dataset)} images, {args.mode}): mIoU {metrics['miou']:.2%}  mAcc {metrics['macc']:.2%}  "
          f"aAcc {metrics['aacc']:.2%}")
    for name, iou in metrics["iou"].items():
        print(f"  {name}: IoU {iou:.2%}")


def _segment_predict(args) -> None:
    from PIL import Image

    from .data.dense import DenseTransformConfig
    from .dense.draw import segmentation_overlay
    from .predict import segment_images
    from .train.segment import load_segmenter
    model, meta = load_segmenter(args.checkpoint, use_ema=args.ema)
    tcfg = DenseTransformConfig(**meta["transform"])
    classes = meta["classes"]
    os.makedirs(args.output, exist_ok=True)
    results = segment_images(model.to(args.device), args.images, tcfg, len(classes), args.mode, tcfg.img_size,
                             args.stride)
    for path, (image, labels) in zip(args.images, results):
        stem = os.path.splitext(os.path.basename(path))[0]
        overlay = segmentation_overlay(image, labels, classes)
        Image.fromarray(overlay.permute(1, 2, 0).numpy()).save(os.path.join(args.output, stem + ".png"))
        Image.fromarray(labels.numpy().astype("uint8")).save(
            os.path.join(args.output, stem + "_labels.png"))
        share = labels.flatten().bincount(minlength=len(classes)).float() / labels.numel()
        top = sorted(((share[k].item(), classes[k]) for k in range(len(classes)) if share[k] > 0), reverse=True)[:4]
        print(f"{path}: " + ", ".join(f"{name} {frac:.0%}" for frac, name in top))


def add_detect_parser(sub) -> None:
    """`llamavit detect train|eval|predict`."""
    from .train.detect import HELP, DetectConfig

    def inference_flags(q, action):
        if action == "predict":
            q.add_argument("--score-thresh", type=float, default=0.5, help="draw detections scoring at least this")
    add_task_parser(sub, "detect", DetectConfig, HELP, "detector", {
        "help": "object detection / instance segmentation: train, evaluate, predict",
        "description": "Object detection (FCOS, RetinaNet, Faster R-CNN) and instance segmentation (Mask R-CNN) from "
                       "torchvision on any llamavit or timm backbone, on COCO-layout data.",
        "train": "validation COCO mAP each epoch; summary.json holds map and map_50",
        "eval": ("COCO mAP of a detector", "COCO box mAP (and mask mAP for Mask R-CNN) of a checkpoint on the val "
                 "split of --data (default: the data it was trained on)."),
        "data": "COCO-layout",
        "predict": ("detect objects in image files", "Boxes (and masks) in image files: writes <output>/<name>.png "
                    "with the detections drawn and their class names.")}, inference_flags)


def cmd_detect(args) -> None:
    if args.action == "train":
        from .train.detect import DetectConfig, train_detector
        run_and_print(train_detector, config_from_args(DetectConfig, args), drop=("map_per_class", "mar_100_per_class"))
    elif args.action == "eval":
        _detect_eval(args)
    else:
        _detect_predict(args)


def _detect_eval(args) -> None:
    from .data.dense import CocoDetection, DenseTransformConfig, build_dense_transform
    from .train.detect import evaluate_detection, load_detector
    model, meta = load_detector(args.checkpoint, use_ema=args.ema)
    tcfg = DenseTransformConfig(**meta["transform"])
    data = args.data or meta["data"]
    dataset = CocoDetection(data, "val", build_dense_transform(tcfg, False, "detect"))
    if list(dataset.classes) != list(meta["classes"]):
        raise ValueError(f"{data} names other categories than the checkpoint was trained on")
    masks = meta["detector"]["arch"] == "mask_rcnn"
    metrics = evaluate_detection(model.to(args.device), dataset, meta["classes"], masks=masks, device=args.device,
                                 batch_size=args.batch_size)
    if args.json:
        print(json.dumps(metrics, indent=2))
        return
    line = f"{data} ({len(dataset)} images): box mAP {metrics['map']:.2%}  mAP@0.5 {metrics['map_50']:.2%}"
    if masks:
        line += f"  mask mAP {metrics['mask_map']:.2%}"
    print(line)
    for name, ap in metrics["map_per_class"].items():
        print(f"  {name}: AP {ap:.2%}")


def _detect_predict(args) -> None:
    from PIL import Image

    from .data.dense import DenseTransformConfig
    from .dense.detection import draw_detections
    from .predict import detect_images
    from .train.detect import load_detector
    model, meta = load_detector(args.checkpoint, use_ema=args.ema)
    classes = meta["classes"]
    os.makedirs(args.output, exist_ok=True)
    results = detect_images(model.to(args.device), args.images, DenseTransformConfig(**meta["transform"]))
    for path, (image, found) in zip(args.images, results):
        stem = os.path.splitext(os.path.basename(path))[0]
        drawn = draw_detections(image, found, classes, score_thresh=args.score_thresh)
        Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(os.path.join(args.output, stem + ".png"))
        shown = [(classes[int(lab) - 1], float(s)) for lab, s in zip(found["labels"], found["scores"])
                 if s >= args.score_thresh]
        print(f"{path}: " + (", ".join(f"{name} {score:.2f}" for name, score in shown) or "nothing found"))
