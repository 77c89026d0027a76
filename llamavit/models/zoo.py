"""llamavit's own weights: models trained by the benchmarks in bench/, shipped inside the package as timm folders.

Each lives in `llamavit/weights/<architecture>.<tag>/` (config.json + model.safetensors, as `llamavit export
--format timm` writes them, + README.md, its model card). At import the registry registers `<architecture>` with
the folder's construction arguments and `<architecture>.<tag>` as a timm pretrained tag whose file is the folder's
weights, so `llamavit.create_model(NAME, pretrained=True)`, `timm.create_model(NAME, pretrained=True)` and
`llamavit predict --model NAME` work offline (registry.shipped_folder resolves a name). llamavit/release.py
(bench/release_weights.py) makes a folder from a trained run. This module finds and reads the folders; registry.py
registers them.
"""
import json
import os
import re
from typing import Any, Dict

from .timm_folder import CONFIG_NAME, is_timm_folder

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights")
CARD_NAME = "README.md"
RELEASE_NAME = re.compile(r"^[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*$")   # <architecture>.<tag>
RECORDED_SUBSET = 1000   # the recorded top-1 on the first N test images is what tests/test_zoo.py reproduces


def shipped_weights(weights_dir: str = WEIGHTS_DIR) -> Dict[str, str]:
    """{'<architecture>.<tag>': folder} of the timm folders under `weights_dir`, sorted by name."""
    if not os.path.isdir(weights_dir):
        return {}
    names = sorted(d for d in os.listdir(weights_dir) if RELEASE_NAME.match(d))
    return {d: os.path.join(weights_dir, d) for d in names if is_timm_folder(os.path.join(weights_dir, d))}


def read_release(folder: str) -> Dict[str, Any]:
    """A shipped folder's config.json (architecture, model_args, pretrained_cfg, label_names, llamavit)."""
    with open(os.path.join(folder, CONFIG_NAME)) as f:
        return json.load(f)
