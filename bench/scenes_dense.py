"""Dense prediction on Fashion-MNIST scenes (2 CPU threads): semantic segmentation with one head and recipe on
every backbone, from scratch and from a Fashion-MNIST pre-training run, then detection (FCOS) on the two best.

Each arm gets the same CPU budget: its step time is measured on a few steps first and the run is sized to
`--minutes` of training (whole epochs, the poly schedule completed), then validated on the 500 validation scenes
(whole-image inference). The scenes are derived from Fashion-MNIST items (`llamavit scenes build`), not a standard
benchmark: the figures compare backbones with each other, not with published ADE20K / COCO numbers.
Writes bench/results/scenes_dense.json (arms already there are kept unless re-run) and overlay PNGs
bench/results/scenes_dense_{seg,det}_<backbone>_<init>.png (image | ground truth | prediction; boxes for detection).

    python bench/scenes_dense.py                                   # every arm (~2 h on 2 quiet cores)
    python bench/scenes_dense.py --arms visionllama_pyramid twins_svt --minutes 6
    python bench/scenes_dense.py --smoke                           # a two-minute check of the whole pipeline
Run it alone: two threads beside another job spin, and the budgets would measure the contention.
"""
import argparse
import json
import os
import shutil

import torch
from machine import bf16_native, cpu_flags, cpu_model  # bench/ helper
from sizing import epochs_for, seconds_per_step  # bench/ helper
from torchvision.utils import make_grid, save_image

from llamavit.data.dense import ADE20KSegmentation, CocoDetection, build_dense_transform
from llamavit.data.scenes import SceneConfig, build_scenes
from llamavit.dense import detect, draw_detections
from llamavit.dense.draw import segmentation_overlay
from llamavit.models import list_models
from llamavit.train import PretrainConfig, TrainConfig, Pretrainer, Trainer
from llamavit.train.detect import DetectConfig, DetectTrainer
from llamavit.train.segment import SegmentConfig, SegmentTrainer

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "scenes_dense.json")

# backbone: (model name, options, pyramid, input size, pre-training objectives besides classification,
#            what every input side must be a multiple of)
BACKBONES = {
    "visionllama_pyramid": ("visionllama_pyramid_small_224", {}, "native", 96, (), 32),
    "twins_svt": ("twins_svt_small", {}, "native", 96, (), 32),
    "visionllama_plain": ("visionllama_small_patch16_224", {}, "simple", 96, ("mae",), 16),
    "vit": ("vit_small_patch16_224", {}, "simple", 96, (), 16),
    "illama": ("illama_small_patch16_224", {}, "simple", 96, (), 16),
    "aim": ("aim_600m_patch14_224", dict(embed_dim=384, depth=12, num_heads=6, probe_layers=6), "simple", 98, ("aim",),
            14),
    # CPU-sized: the shipped Fashion-MNIST models' trunks (patch 4, width 96, 6 blocks), stride 4 at 96 px
    "illama_p4": ("illama_tiny_patch16_224", dict(patch_size=4, embed_dim=96, depth=6, num_heads=3, mlp_ratio=4.0),
                  "simple", 96, ("zoo",), 32),
    # RoPE positions 8 apart per patch at 96 px, as the shipped weights were trained (AS2DRoPE: 224 / 28 px)
    "visionllama_p4": ("visionllama_small_patch16_224",
                       dict(patch_size=4, embed_dim=96, depth=6, num_heads=3, class_token=False, global_pool="avg",
                            rope_auto_scale=True, rope_ref_img_size=768), "simple", 96, ("zoo",), 32),
}
# 'zoo' initialises a CPU-sized arm from the weights llamavit ships for its trunk (trained on all of Fashion-MNIST
# at 28 px: bench/release_weights.py), instead of a classification run of --pretrain-minutes
ZOO = {"illama_p4": "illama_fmnist_patch4_28.fmnist", "visionllama_p4": "visionllama_fmnist_patch4_28.fmnist_mae"}
SEG_RECIPE = dict(head="fpn", batch_size=16, lr=4e-4, weight_decay=0.05, warmup_steps=50, schedule="poly",
                  drop_path=0.1, aux_head=True)
DET_RECIPE = dict(detector="fcos", fpn_channels=128, batch_size=16, lr=2e-4, weight_decay=0.05, warmup_steps=50,
                  schedule="poly", clip_grad=10.0)


def sized(trainer_cls, cfg_cls, options: dict, minutes: float, workdir: str):
    """A trainer of cfg_cls(**options) whose whole-epoch run lasts about `minutes` (measured step time)."""
    calib = trainer_cls(cfg_cls(**{**options, "output": os.path.join(workdir, "calibration"), "epochs": 1}))
    step_s = seconds_per_step(calib)
    per_epoch = calib.steps_per_epoch
    del calib
    shutil.rmtree(os.path.join(workdir, "calibration"), ignore_errors=True)
    epochs = epochs_for(minutes, step_s, per_epoch)
    shutil.rmtree(options["output"], ignore_errors=True)
    trainer = trainer_cls(cfg_cls(**{**options, "epochs": epochs, "eval_every": epochs}))
    return trainer, step_s, epochs


def pretrain_size(backbone: str, args) -> int:
    """--pretrain-size rounded down to the backbone's multiple (default: the segmentation input size)."""
    _, _, _, size, _, multiple = BACKBONES[backbone]
    return max(multiple, (args.pretrain_size or size) // multiple * multiple)


def pretrain(backbone: str, objective: str, args) -> str:
    """A Fashion-MNIST pre-training run of the backbone's trunk (classification, AIM or MAE) sized to
    --pretrain-minutes at --pretrain-size; -> its run directory (reused when complete)."""
    name, kwargs = BACKBONES[backbone][:2]
    size = pretrain_size(backbone, args)
    out = os.path.join(args.workdir, f"pretrain-{backbone}-{objective}-{size}px-{args.pretrain_minutes:g}min"
                                     + ("-amp" if args.amp else ""))
    if os.path.isfile(os.path.join(out, "summary.json")):
        return out
    shutil.rmtree(out, ignore_errors=True)
    if objective == "cls":   # timm baselines train on llamavit's loop as 'timm:<name>'
        cls, cfg_cls = Trainer, TrainConfig
        options = dict(model=name if name in list_models() else "timm:" + name, model_kwargs=kwargs, img_size=size,
                       in_chans=3, batch_size=64, lr=1e-3, amp=args.amp,
                       warmup_epochs=0.05, scale=(0.35, 1.0), val_subset=1000, output=out, progress=False)
    else:
        cls, cfg_cls = Pretrainer, PretrainConfig
        options = dict(objective=objective, model=name, model_kwargs=kwargs, img_size=size, in_chans=3,
                       batch_size=64, lr=1e-3, amp=args.amp, output=out, progress=False,
                       **(dict(decoder_dim=256, decoder_depth=4, scale=(0.2, 1.0), color_jitter_prob=0.0)
                          if objective == "mae" else dict(decoder_dim=384, decoder_depth=2)))
    calib = cls(cfg_cls(**{**options, "output": out + "-calibration", "train_subset": 64 * 6}))
    step_s = seconds_per_step(calib, steps=3)
    del calib
    shutil.rmtree(out + "-calibration", ignore_errors=True)
    steps = max(20, int(args.pretrain_minutes * 60 / step_s))
    cls(cfg_cls(**{**options, "train_subset": steps * 64, "epochs": 1})).fit()
    print(f"pre-trained {backbone} ({objective}): {steps} steps of {step_s:.2f} s -> {out}")
    return out


def train_arm(task: str, recipe: dict, trainer_cls, cfg_cls, backbone: str, init: str, args):
    """Train one arm of `task` with `recipe`, sized to --minutes; -> (trainer, the record's shared fields)."""
    name, kwargs, pyramid, size = BACKBONES[backbone][:4]
    checkpoint = None if init == "scratch" else ZOO[backbone] if init == "zoo" else pretrain(backbone, init, args)
    options = dict(recipe, amp=args.amp, data=args.scenes, backbone=name, backbone_kwargs=kwargs, pyramid=pyramid,
                   img_size=size, backbone_checkpoint=checkpoint,
                   output=os.path.join(args.workdir, f"{task}-{backbone}-{init}"), progress=False, log_every=50,
                   max_minutes=args.minutes * 1.5, train_subset=args.train_subset, val_subset=args.val_subset)
    trainer, step_s, epochs = sized(trainer_cls, cfg_cls, options, args.minutes, args.workdir)
    summary = trainer.fit()
    record = {"task": task, "backbone": backbone, "model": name, "init": init, "pyramid": pyramid, "img_size": size,
              "params": sum(p.numel() for p in trainer.model.parameters()), "seconds_per_step": step_s,
              "epochs": epochs, "steps": summary["steps"], "train_seconds": summary["train_seconds"],
              "final_train_loss": summary["final_train_loss"], "recipe": {**recipe, "amp": args.amp},
              "minutes": args.minutes, "pretrain_run": checkpoint}
    if init == "zoo":
        record["pretrain"] = {"objective": "shipped weights", "name": checkpoint}
    elif checkpoint:
        with open(os.path.join(checkpoint, "summary.json")) as f:
            pre = json.load(f)
        record["pretrain"] = {"objective": init, "img_size": pretrain_size(backbone, args), "steps": pre["steps"],
                              "minutes": args.pretrain_minutes,
                              **({"val_top1": pre["val_top1"]} if "val_top1" in pre else {})}
    return trainer, summary, record


def seg_arm(backbone: str, init: str, args) -> dict:
    trainer, summary, record = train_arm("segment", SEG_RECIPE, SegmentTrainer, SegmentConfig, backbone, init, args)
    save_seg_overlays(trainer, os.path.join(args.overlays, f"{args.prefix}_seg_{backbone}_{init}.png"))
    return {**record, "backbone_params": sum(p.numel() for p in trainer.segmenter.backbone.trunk.parameters()),
            **{k: summary[k] for k in ("miou", "macc", "aacc", "iou")}}


def det_arm(backbone: str, init: str, args) -> dict:
    trainer, summary, record = train_arm("detect", DET_RECIPE, DetectTrainer, DetectConfig, backbone, init, args)
    save_det_overlays(trainer, os.path.join(args.overlays, f"{args.prefix}_det_{backbone}_{init}.png"))
    return {**record, **{k: summary[k] for k in ("map", "map_50", "map_75", "map_per_class")}}


def _raw_images(root: str, split_dir: str, count: int):
    files = sorted(os.listdir(os.path.join(root, split_dir)))[:count]
    from torchvision.io import read_image
    return [read_image(os.path.join(root, split_dir, f)) for f in files]


def save_seg_overlays(trainer, path: str, count: int = 4) -> None:
    """Rows of image | ground truth | prediction for the first validation scenes."""
    cfg = trainer.cfg
    data = ADE20KSegmentation(cfg.data, "validation", build_dense_transform(cfg.transform_config(), False, "segment"))
    model = trainer.segmenter.eval()
    tiles = []
    with torch.no_grad():
        for i, raw in enumerate(_raw_images(cfg.data, "images/validation", count)):
            image, mask = data[i]
            pred = model(image[None]).argmax(1)[0]
            if pred.shape != raw.shape[-2:]:
                pred = torch.nn.functional.interpolate(pred[None, None].float(), size=raw.shape[-2:])[0, 0].long()
                mask = torch.nn.functional.interpolate(mask[None, None].float(), size=raw.shape[-2:])[0, 0].long()
            tiles += [raw, segmentation_overlay(raw, mask, trainer.classes, 0.6),
                      segmentation_overlay(raw, pred, trainer.classes, 0.6)]
    save_image(make_grid(tiles, nrow=3, padding=2).float() / 255, path)


def save_det_overlays(trainer, path: str, count: int = 4) -> None:
    """Rows of image with ground-truth boxes | predicted boxes (score >= 0.3) for the first validation scenes."""
    cfg = trainer.cfg
    data = CocoDetection(cfg.data, "val", build_dense_transform(cfg.transform_config(), False, "detect"))
    tiles = []
    for i, raw in enumerate(_raw_images(cfg.data, "val", count)):
        image, target = data[i]
        found = detect(trainer.detector, image[None])[0]
        truth = {"boxes": target["boxes"], "labels": target["labels"], "scores": torch.ones(len(target["labels"]))}
        tiles += [draw_detections(raw, truth, trainer.classes, 0.0), draw_detections(raw, found, trainer.classes, 0.3)]
    save_image(make_grid(tiles, nrow=2, padding=2).float() / 255, path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arms", nargs="*", default=list(BACKBONES), choices=list(BACKBONES),
                    help="backbones (none: only the detection arms of the results so far)")
    ap.add_argument("--inits", nargs="+", default=["scratch", "pretrained"],
                    choices=["scratch", "cls", "aim", "mae", "zoo", "pretrained"],
                    help="cls: a classification run; aim / mae: those pre-trainings where the family has them; "
                         "zoo: the shipped weights (the *_p4 arms); pretrained: every one the backbone has")
    ap.add_argument("--minutes", type=float, default=6.0, help="training budget per arm")
    ap.add_argument("--pretrain-minutes", type=float, default=8.0, help="budget per pre-training run")
    ap.add_argument("--pretrain-size", type=int, default=0,
                    help="pre-training input side (default: the segmentation input size)")
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                    help="bf16 autocast (default: on where the CPU has native bf16)")
    ap.add_argument("--results", default=RESULTS, help="JSON to write (arms already there are kept)")
    ap.add_argument("--detect", type=int, default=2, help="detection arms: the N best segmentation arms")
    ap.add_argument("--workdir", default="runs/bench_scenes_dense")
    ap.add_argument("--scenes", default="", help="scenes directory (default: <workdir>/scenes, built if missing)")
    ap.add_argument("--train-subset", type=int, default=0)
    ap.add_argument("--val-subset", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny scenes and budgets: checks the pipeline")
    args = ap.parse_args()
    torch.set_num_threads(2)
    args.amp = bf16_native() if args.amp is None else args.amp
    if args.smoke:
        args.minutes, args.pretrain_minutes, args.train_subset, args.val_subset = 0.05, 0.05, 64, 8
        args.workdir = os.path.join(args.workdir, "smoke")
    args.scenes = args.scenes or os.path.join(args.workdir, "scenes")
    args.overlays = args.workdir if args.smoke else os.path.dirname(os.path.abspath(args.results))
    args.prefix = os.path.splitext(os.path.basename(args.results))[0]
    scene_cfg = SceneConfig(train=200, val=20) if args.smoke else SceneConfig()
    manifest = build_scenes(args.scenes, scene_cfg)
    results = {} if args.smoke or not os.path.isfile(args.results) else json.load(open(args.results)).get("arms", {})
    for backbone in args.arms:
        own = BACKBONES[backbone][4] if backbone in ZOO else ("cls", *BACKBONES[backbone][4])
        inits = [i for i in ("scratch", *own) if i in args.inits or (i != "scratch" and "pretrained" in args.inits)]
        for init in inits:
            key = f"segment/{backbone}/{init}"
            print(f"--- {key}")
            results[key] = run_arm(seg_arm, backbone, init, args)
            if "miou" in results[key]:
                print(f"{key}: mIoU {results[key]['miou']:.2%} in {results[key]['train_seconds']:.0f} s")
            write(results, args, manifest)
    seg = sorted((r for r in results.values() if r["task"] == "segment" and "miou" in r), key=lambda r: -r["miou"])
    for best in seg[:args.detect]:
        key = f"detect/{best['backbone']}/{best['init']}"
        print(f"--- {key}")
        results[key] = run_arm(det_arm, best["backbone"], best["init"], args)
        if "map_50" in results[key]:
            print(f"{key}: box mAP@0.5 {results[key]['map_50']:.2%} in {results[key]['train_seconds']:.0f} s")
        write(results, args, manifest)


def run_arm(arm, backbone: str, init: str, args) -> dict:
    """One arm's record; an arm that fails is recorded with its error and the others go on."""
    try:
        return arm(backbone, init, args)
    except Exception as e:   # noqa: BLE001 - the benchmark reports it
        if args.smoke:
            raise
        print(f"failed: {type(e).__name__}: {e}")
        return {"task": arm.__name__[:-4].replace("seg", "segment").replace("det", "detect"), "backbone": backbone,
                "init": init, "error": f"{type(e).__name__}: {e}"}


def write(results: dict, args, manifest: dict) -> None:
    if args.smoke:
        return
    out = {"benchmark": "Fashion-MNIST scenes: segmentation (FPN head) and detection (FCOS), equal CPU budget",
           "note": manifest["note"], "scenes": manifest["config"],
           "machine": {"cpu": cpu_model(), "flags": cpu_flags(), "bf16_native": bf16_native(),
                       "threads": torch.get_num_threads()},
           "arms": results}
    os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
    with open(args.results + ".tmp", "w") as f:
        json.dump(out, f, indent=2)
    os.replace(args.results + ".tmp", args.results)


if __name__ == "__main__":
    main()
