"""GGUF files (llama.cpp), read with the `gguf` package: GGUFReader memory-maps the file and only the
requested layer's tensors are dequantised.

For the llama architecture llama.cpp's converter stores q/k rows in Meta's interleaved order (it
undoes Hugging Face's rotate-half reorder, see permute.py), so tensors map one to one onto Meta names.
"""
import struct
import sys
from typing import Dict, List

import numpy as np
import torch

from .base import LLMConfig, LLMError, LLMReader

# ours (Meta) -> GGUF name inside blk.{i}.
GGUF_NAMES = {"attention.wq.weight": "attn_q.weight", "attention.wk.weight": "attn_k.weight",
              "attention.wv.weight": "attn_v.weight", "attention.wo.weight": "attn_output.weight",
              "feed_forward.w1.weight": "ffn_gate.weight", "feed_forward.w2.weight": "ffn_down.weight",
              "feed_forward.w3.weight": "ffn_up.weight", "attention_norm.weight": "attn_norm.weight",
              "ffn_norm.weight": "ffn_norm.weight"}
SUPPORTED_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")


def _import_gguf():
    try:
        import gguf
    except ImportError as e:
        raise LLMError("reading .gguf files needs the `gguf` package: pip install gguf") from e
    return gguf


def _fast_reader_class():
    """gguf.GGUFReader that reads metadata arrays in one go instead of building numpy views of every
    element (the tokenizer holds ~150k): opening SmolLM2 drops from ~1.7 s to well under 0.1 s.
    Arrays of numbers keep their values (`contents()` of the whole field works); arrays of strings
    keep name and type but no values — llamavit reads none of them."""
    gguf = _import_gguf()

    class FastGGUFReader(gguf.GGUFReader):
        def _get_field_parts(self, orig_offs, raw_type):
            if GGUFValueType(raw_type) != GGUFValueType.ARRAY or self.byte_order != "I" or sys.byteorder != "little":
                return super()._get_field_parts(orig_offs, raw_type)
            itype, count = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
            start = orig_offs + 12
            item = GGUFValueType(itype[0])
            if item == GGUFValueType.STRING:
                view, offs = memoryview(self.data), start
                for _ in range(int(count[0])):
                    offs += 8 + struct.unpack_from("<Q", view, offs)[0]
                return offs - orig_offs, [itype, count, self.data[start:offs]], [], [GGUFValueType.ARRAY, item]
            nptype = self.gguf_scalar_to_np.get(item)
            if nptype is None:   # nested arrays: the package's element-by-element parser
                return super()._get_field_parts(orig_offs, raw_type)
            values = self._get(start, nptype, int(count[0]))
            return 12 + int(values.nbytes), [itype, count, values], [2], [GGUFValueType.ARRAY, item]

    GGUFValueType = gguf.GGUFValueType
    return FastGGUFReader


def _field(reader, path: str, key: str, default=None):
    field = reader.get_field(key)
    if field is None:
        if default is None:
            raise LLMError(f"{path}: GGUF metadata has no {key}")
        return default
    return field.contents()


def _f32_round(x: float) -> float:
    """GGUF stores eps as float32 (1e-5 -> 9.9999997e-06): keep the 7 significant digits it carries."""
    return float(f"{x:.7g}")


class GGUFReader(LLMReader):
    format = "gguf"

    def __init__(self, path: str):
        self.path = path
        try:
            self._reader = _fast_reader_class()(path)
        except (ValueError, OSError) as e:
            raise LLMError(f"{path}: not a readable GGUF file ({e})") from e
        r = self._reader
        arch = _field(r, path, "general.architecture", "")
        if arch != "llama":
            raise LLMError(f"{path}: GGUF architecture {arch!r} is not 'llama'")
        heads = int(_field(r, path, "llama.attention.head_count"))
        self.config = LLMConfig(
            dim=int(_field(r, path, "llama.embedding_length")),
            n_layers=int(_field(r, path, "llama.block_count")), n_heads=heads,
            n_kv_heads=int(_field(r, path, "llama.attention.head_count_kv", heads)),
            ffn_hidden=int(_field(r, path, "llama.feed_forward_length")),
            norm_eps=_f32_round(float(_field(r, path, "llama.attention.layer_norm_rms_epsilon"))),
            rope_theta=float(_field(r, path, "llama.rope.freq_base", 10000.0)))
        self._tensors = {t.name: t for t in self._reader.tensors}

    def files(self) -> List[str]:
        return [self.path]

    def _dequantize(self, name: str) -> torch.Tensor:
        gguf = _import_gguf()
        t = self._tensors.get(name)
        if t is None:
            raise LLMError(f"{self.path}: tensor {name} missing")
        qtype = t.tensor_type.name
        if qtype not in SUPPORTED_TYPES:
            raise LLMError(f"{self.path}: tensor {name} is quantised as {qtype}, which llamavit does not read "
                           f"(supported: {', '.join(SUPPORTED_TYPES)}); re-quantise the file with llama-quantize")
        # t.data is a view of the memory map with numpy shape (rows, cols) or, quantised, (rows, bytes per row)
        values = gguf.quants.dequantize(t.data, t.tensor_type) if qtype.startswith("Q") else t.data
        shape = tuple(int(d) for d in reversed(t.shape))   # GGUF lists dims innermost first
        return torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))

    def _read_layer(self, index: int) -> Dict[str, torch.Tensor]:
        return {ours: self._dequantize(f"blk.{index}.{name}") for ours, name in GGUF_NAMES.items()}
