"""Row orders of the q/k projections.

Meta's LLaMA rotates channel pairs (2i, 2i+1) of each head (interleaved RoPE); Hugging Face's
conversion reorders the rows of wq/wk inside each head so that pairs become (i, i + head_dim/2)
("rotate half"). llama.cpp's converter applies the inverse of that reorder to HF tensors (its RoPE
for the llama architecture is the interleaved one), so GGUF llama files hold q/k rows in Meta order.
Keys are grouped by KV head: pass n_kv_heads for wk.
"""
import torch


def meta_to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(n_heads * head_dim, D) in Meta order -> HF order: row (h, 2i + c) moves to (h, c * head_dim/2 + i)."""
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def hf_to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of meta_to_hf_rows (this is also what llama.cpp applies to HF q/k tensors)."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)
