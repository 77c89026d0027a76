"""Model facts for `llamavit info`: parameter counts, FLOPs, configuration."""
import dataclasses
from typing import Any, Dict

import torch
from torch.utils.flop_counter import FlopCounterMode

from .models import create_model


def model_info(name: str, **kwargs) -> Dict[str, Any]:
    """Parameters (total / trainable), GFLOPs per image (forward, counted on the meta device, so no
    memory is allocated even for the largest models) and the resolved config of a named model."""
    with torch.device("meta"):
        model = create_model(name, **kwargs)
    model.eval()
    if hasattr(model, "set_soft_mask_rate"):
        # the soft mask changes which of the N x N products are kept, not how many; at rate 1 the count
        # is the architecture's, not the 2N-key form the fused kernel executes
        model.set_soft_mask_rate(1.0)
    cfg = getattr(model, "cfg", None)
    img_size = cfg.img_size if cfg is not None else 224
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    in_chans = cfg.in_chans if cfg is not None else 3
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        if hasattr(model, "example_inputs"):   # diffusion models take (x, t, y)
            model(*model.example_inputs(1, device="meta"))
        else:
            model(torch.empty(1, in_chans, h, w, device="meta"))
    return {
        "model": name,
        "params": sum(p.numel() for p in model.parameters()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "gflops": counter.get_total_flops() / 1e9,
        "input_size": (in_chans, h, w),
        "config": dataclasses.asdict(cfg) if cfg is not None else {},
    }
