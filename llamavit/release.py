"""Releasing a trained classifier as weights llamavit ships (llamavit/weights/, models/zoo.py): its timm folder, its
measured test top-1 and its model card (README.md). bench/release_weights.py runs it for the benchmarks' models."""
import json
import os
import shutil
from typing import Any, Dict, List, Optional

from .eval import evaluate
from .eval.loaders import eval_loader
from .export import classifier_meta, export_timm
from .models.registry import create_model, register_shipped
from .models.timm_folder import CONFIG_NAME, OWN_SECTION
from .models.zoo import CARD_NAME, RECORDED_SUBSET, RELEASE_NAME, WEIGHTS_DIR, read_release
from .train import model_from_checkpoint
from .train.checkpoint import resolve_checkpoint


def write_card(folder: str) -> str:
    """README.md of a shipped folder (its model card) from config.json's llamavit section. -> its path."""
    config = read_release(folder)
    own, cfg = config[OWN_SECTION], config["pretrained_cfg"]
    name = os.path.basename(folder)
    args = ", ".join(f"{k}={v}" for k, v in sorted(config.get("model_args", {}).items()))
    recipe = "\n".join(f"| `{k}` | `{json.dumps(v)}` |" for k, v in sorted(own.get("recipe", {}).items()))
    lines = [
        f"# {name}", "",
        own.get("summary", ""), "",
        "```python",
        "import llamavit",
        f"model = llamavit.create_model(\"{name}\", pretrained=True).eval()   # or timm.create_model(...)",
        "```",
        f"`llamavit predict IMAGE... --model {name}` classifies image files; `llamavit eval --model {name}` scores it.",
        "",
        "## Model", "",
        f"- architecture: `{config['architecture']}` = `{own['base_model']}` with {args}",
        f"- parameters: {own['params']:,}; input {' x '.join(map(str, cfg['input_size']))}, mean {cfg['mean']}, "
        f"std {cfg['std']}, crop_pct {cfg['crop_pct']}",
        f"- classes: {', '.join(config.get('label_names', []))}",
        "",
        "## Measured", "",
        f"- {own['data']} test set ({own['test_images']:,} images): top-1 **{own['test_top1']:.2f} %**, "
        f"top-5 {own['test_top5']:.2f} %",
        f"- the first {RECORDED_SUBSET:,} test images: top-1 {own['test_top1_first_1000']:.2f} % "
        f"(tests/test_zoo.py reproduces it within 0.5 points)",
        "",
        "## Training", "",
        f"{own.get('trained', '')}".strip(), "",
        "| option | value |", "|---|---|", recipe, "",
        "Reproduce:", "", "```", *own.get("reproduce", []), "```", "",
        "## Limits", "",
        f"Trained on {own['data']} only ({cfg['input_size'][1]} x {cfg['input_size'][2]}, "
        f"{cfg['input_size'][0]} channel(s)): a small model for trying the library, not an ImageNet model. "
        "Fashion-MNIST is Zalando Research's (MIT licence); these weights are llamavit's (Apache-2.0).", ""]
    path = os.path.join(folder, CARD_NAME)
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def release_weights(checkpoint: str, name: str, summary: str, trained: str, reproduce: List[str],
                    weights_dir: str = WEIGHTS_DIR, data: Optional[str] = None) -> Dict[str, Any]:
    """Make `weights_dir/<name>` (name `<architecture>.<tag>`, new) from a trained classifier run: the timm folder
    (export_timm's parity check), its architecture renamed to `<architecture>`, the test top-1 measured (all the
    test set, and the first RECORDED_SUBSET images) and recorded, README.md written. summary / trained: the card's
    opening line and training paragraph; reproduce: the commands that remake it. -> config.json's llamavit section."""
    if not RELEASE_NAME.match(name):
        raise ValueError(f"release name {name!r} is not <architecture>.<tag> (lower case, digits, underscores)")
    folder = os.path.join(weights_dir, name)
    if os.path.lexists(folder):
        raise ValueError(f"{folder} exists already; remove it to release {name} again")
    meta = classifier_meta(checkpoint)
    model = model_from_checkpoint(checkpoint).eval()
    run_config = os.path.join(os.path.dirname(os.path.dirname(resolve_checkpoint(checkpoint))), "config.json")
    recipe = {}
    if os.path.isfile(run_config):
        with open(run_config) as f:
            recipe = {k: v for k, v in json.load(f).items() if k not in ("output", "resume", "progress")}
    data = data or meta.get("data") or recipe.get("data")
    tmp = os.path.join(weights_dir, f".tmp-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(weights_dir, exist_ok=True)
    export_timm(model, tmp, meta, {"data": data})
    config = read_release(tmp)
    architecture = name.split(".")[0]
    full, _, count = eval_loader(checkpoint, data, 0)
    first, _, _ = eval_loader(checkpoint, data, RECORDED_SUBSET)
    scores, first_scores = evaluate(model, full), evaluate(model, first)
    config[OWN_SECTION] = {**config.get(OWN_SECTION, {}), "base_model": meta["model"], "data": data,
                           "params": sum(p.numel() for p in model.parameters()), "test_images": count,
                           "test_top1": round(scores["top1"], 2), "test_top5": round(scores["top5"], 2),
                           "test_top1_first_1000": round(first_scores["top1"], 2), "summary": summary,
                           "trained": trained, "reproduce": list(reproduce), "recipe": recipe}
    config["architecture"] = architecture
    with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    os.replace(tmp, folder)
    register_shipped(folder)
    rebuilt = create_model(name, pretrained=True).eval()
    if evaluate(rebuilt, first)["top1"] != first_scores["top1"]:
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(f"{name} rebuilt from {folder} scores differently from {checkpoint}; removed it")
    write_card(folder)
    return config[OWN_SECTION]
