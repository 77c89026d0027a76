"""The errors llamavit raises for bad input: each carries one line saying what is wrong and what was expected.

The command line prints them without a traceback (`USER_ERRORS`); everything else is a bug and keeps its
traceback.
"""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint file that cannot be read (truncated, random bytes, not tensors): a run resumes from the one
    before it."""


class DatasetError(RuntimeError):
    """A dataset that is missing or unreadable; the message says how to fix it."""


class ImageReadError(ValueError):
    """An image file that cannot be opened or decoded."""


class RunDirectoryBusy(RuntimeError):
    """Another run holds the run directory."""


class NonFiniteLossError(RuntimeError):
    """The loss or the weights became NaN or infinite; training stopped and kept the last good checkpoint."""


class ExportError(ValueError):
    """An export that failed, or whose file does not compute what the checkpoint computes (the file is removed)."""


class MissingDependency(ValueError):
    """An optional package a feature needs is not installed; the message names the extra that installs it."""


def require_extra(extra: str, what: str, *modules: str) -> None:
    """Raise MissingDependency (`<what> needs <modules>: pip install 'llamavit[<extra>]'`) unless every module
    imports."""
    import importlib
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingDependency(f"{what} needs {', '.join(missing)}, not installed: pip install 'llamavit[{extra}]'")


# what `llamavit` reports in one line (ValueError and TypeError cover bad options and LLM files)
USER_ERRORS = (CheckpointError, DatasetError, ImageReadError, NonFiniteLossError, RunDirectoryBusy, ValueError,
               TypeError, FileNotFoundError)
