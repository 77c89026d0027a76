"""TensorBoard output of a run (`--tensorboard`): every numeric value of each log record as a scalar, and at the
end the run's PNGs (curves.png, reconstructions.png, samples) as images, in <output>/tensorboard. Rank 0 only; the
step loop owns it."""
import glob
import os
from numbers import Number
from typing import Any, Dict, Optional

import numpy as np

from ..errors import require_extra

DIR_NAME = "tensorboard"


def require_tensorboard() -> None:
    """One line naming the extra to install when the tensorboard package is missing."""
    require_extra("tensorboard", "--tensorboard", "tensorboard")


class TensorBoardLog:
    """A torch.utils.tensorboard SummaryWriter on <output>/tensorboard. purge_step: a resumed run's first step; the
    events an interrupted run wrote from it on are dropped, as the JSONL log drops its records."""

    def __init__(self, output: str, purge_step: Optional[int] = None):
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(os.path.join(output, DIR_NAME), purge_step=purge_step)

    def scalars(self, record: Dict[str, Any]) -> None:
        """Every number of a log record (not `step`, not booleans) as a scalar at the record's step."""
        step = int(record.get("step", 0))
        for key, value in record.items():
            if key != "step" and isinstance(value, Number) and not isinstance(value, bool):
                self.writer.add_scalar(key, float(value), step)

    def images(self, output: str, step: int) -> int:
        """The PNGs at the top of the run directory as images (tag: the file name without .png); -> how many."""
        from PIL import Image
        paths = sorted(glob.glob(os.path.join(output, "*.png")))
        for path in paths:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(os.path.splitext(os.path.basename(path))[0], pixels, step, dataformats="HWC")
        return len(paths)

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
