"""One multi-head attention module with mask modes, always on `F.scaled_dot_product_attention`.

Mask modes (fixed at construction; an `attn_mask` given at forward overrides them):
- 'bidirectional': every token sees every token;
- 'causal': standard renormalised causal attention (token i sees j <= i);
- 'soft': iLLaMA's soft mask. The official code multiplies the softmax probabilities by
  M = r * 1 + (1 - r) * tril(1) AFTER the softmax and does not renormalise, so causal rows do not sum
  to one. Standard causal SDPA gives different numbers.

The soft mask runs as ONE fused SDPA call over the keys written twice ("mirrored keys"):
    out_i = sum_j M_ij e^{s_ij} v_j / sum_j e^{s_ij}
          = SDPA(q, [k; k], [v; 0], bias = [log M, log(1 - M)])_i
because the two copies of each key share e^{s_ij}, weighted M_ij and 1 - M_ij, so their weights add
up to the full softmax denominator while only the first copy carries a value. It is exact in value
and gradient, needs no log-sum-exp output from the kernel, and runs on every SDPA backend.

For long-sequence inference on CPU there is an exact form with memory linear in N, the log-sum-exp
identity: with M = r + (1 - r) tril,
    out = r * SDPA(q, k, v) + (1 - r) * SDPA_causal(q, k, v) * exp(LSE_causal - LSE_full)   (row-wise)
two flash-attention calls on N keys and no N x N buffer. The CPU flash kernel returns the LSE but has
no gradient for it, so this form serves only when no gradient is needed.
"""
import functools
import math
import threading
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .rope import apply_rope, rotate_qkv

RopeTables = Optional[Tuple[torch.Tensor, torch.Tensor]]

MASK_MODES = ("bidirectional", "causal", "soft")


def soft_mask_bias(num_tokens: int, rate: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """Additive SDPA bias (N, 2N) for the mirrored-keys form of the soft mask with rate r.

    First N columns: log M (0 on and below the diagonal, log r above); last N: log(1 - M)
    (-inf on and below the diagonal, log(1 - r) above).
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"soft mask rate must be in [0, 1], got {rate}")
    upper = torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=device).triu(1)
    log_rate = math.log(rate) if rate > 0 else float("-inf")
    log_rest = math.log1p(-rate) if rate < 1 else float("-inf")
    first = torch.zeros(num_tokens, num_tokens, device=device, dtype=dtype).masked_fill(upper, log_rate)
    second = torch.full((num_tokens, num_tokens), log_rest, device=device, dtype=dtype)
    second = second.masked_fill(~upper, float("-inf"))
    return torch.cat((first, second), dim=1)


# At short sequences the CPU SDPA kernel is no faster than the explicit formula, and the mirrored keys
# double its work: below this length the explicit form is faster on CPU (bench/throughput.py, 2 threads:
# explicit 0.58x the mirrored time at 197 tokens, mirrored 1.2x faster at 577; crossover near 300).
# Without autograd the explicit form overwrites its one N x N buffer in place and stays the fastest
# (577 tokens: 0.65x the mirrored time, 0.8x the LSE form's); past CPU_INFERENCE_EXPLICIT_MAX_TOKENS
# inference takes the LSE form, whose memory grows with N instead of N^2.
CPU_EXPLICIT_MAX_TOKENS = 320
CPU_INFERENCE_EXPLICIT_MAX_TOKENS = 1024
SOFT_MASK_IMPLS = ("auto", "sdpa", "explicit", "lse")


def soft_mask_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rate: float, dropout_p: float = 0.0,
                        enable_gqa: bool = False, impl: str = "auto") -> torch.Tensor:
    """iLLaMA soft-mask attention. q: (B, H, N, d); k, v: (B, Hkv, N, d) -> (B, H, N, d).

    impl 'sdpa': the mirrored-keys SDPA form; 'explicit': the official formula; 'lse': the log-sum-exp
    identity (CPU, no gradient); 'auto', on CPU without dropout: 'explicit' up to CPU_EXPLICIT_MAX_TOKENS
    tokens (CPU_INFERENCE_EXPLICIT_MAX_TOKENS without gradients), beyond that 'sdpa' for training and
    'lse' for inference; elsewhere 'sdpa'. All give the same numbers.
    """
    if impl not in SOFT_MASK_IMPLS:
        raise ValueError(f"unknown soft-mask implementation {impl!r}; expected one of {SOFT_MASK_IMPLS}")
    if rate >= 1.0:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, enable_gqa=enable_gqa)
    n = q.shape[-2]
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if impl == "auto":
        if q.device.type != "cpu" or dropout_p:
            impl = "sdpa"
        elif needs_grad:
            impl = "explicit" if n <= CPU_EXPLICIT_MAX_TOKENS else "sdpa"
        else:
            impl = "explicit" if n <= CPU_INFERENCE_EXPLICIT_MAX_TOKENS else "lse"
    if impl in ("explicit", "lse") and dropout_p:
        raise ValueError(f"the {impl} soft-mask form has no attention dropout; use impl='sdpa'")
    if impl == "explicit":
        return explicit_soft_mask_attention(q, k, v, rate)
    if impl == "lse":
        if needs_grad or q.device.type != "cpu":
            raise ValueError("the lse soft-mask form runs on CPU without gradients; use impl='sdpa' or 'explicit'")
        return lse_soft_mask_attention(q, k, v, rate)
    bias = soft_mask_bias(n, rate, device=q.device, dtype=q.dtype)
    k2 = torch.cat((k, k), dim=-2)
    v2 = torch.cat((v, torch.zeros_like(v)), dim=-2)
    return F.scaled_dot_product_attention(q, k2, v2, attn_mask=bias, dropout_p=dropout_p, enable_gqa=enable_gqa)


def lse_soft_mask_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rate: float) -> torch.Tensor:
    """Soft-mask attention by the log-sum-exp identity (module docstring), CPU inference only.

    q: (B, H, N, d); k, v: (B, Hkv, N, d) -> (B, H, N, d); 0 <= rate < 1.
    """
    groups = q.shape[-3] // k.shape[-3]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    causal_out, causal_lse = flash(q, k, v, 0.0, True)
    full_out, full_lse = flash(q, k, v, 0.0, False)
    # the kernel returns the LSE in float32 whatever the input dtype
    out = causal_out * (causal_lse - full_lse).exp().unsqueeze(-1).to(causal_out.dtype)
    return out.mul_(1 - rate).add_(full_out, alpha=rate) if rate > 0 else out


def naive_soft_mask_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rate: float) -> torch.Tensor:
    """The official iLLaMA computation, unfused: softmax(q k^T / sqrt(d)) * M, then @ v, through autograd.

    q: (B, H, N, d); k, v: (B, Hkv, N, d), H a multiple of Hkv -> (B, H, N, d). The reference for tests
    and benchmarks; `explicit_soft_mask_attention` computes the same numbers with less memory.
    """
    n, groups = q.shape[-2], q.shape[-3] // k.shape[-3]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)
    probs = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
    return (probs * soft_mask_matrix(n, rate, q.device, probs.dtype)) @ v


def soft_mask_matrix(num_tokens: int, rate: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """M(r) = r + (1 - r) * tril(1), (N, N): what the soft mask multiplies the probabilities by (cached, except
    when traced: a symbolic N has no hash)."""
    if torch.compiler.is_compiling():
        return _mask_matrix(num_tokens, rate, device, dtype)
    return _cached_mask_matrix(num_tokens, rate, device, dtype)


def _mask_matrix(num_tokens: int, rate: float, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    causal = torch.ones(num_tokens, num_tokens, device=device, dtype=dtype).tril()
    return causal * (1 - rate) + rate


_cached_mask_matrix = functools.lru_cache(maxsize=16)(_mask_matrix)


# The explicit form's N x N buffers come from one per-thread workspace reused across layers and calls: a fresh
# (B, H, N, N) buffer per layer per call is large enough that glibc maps it and unmaps it again, so every call
# page-faults it back in and the eager speed depends on the heap's history (bench/README.md). Buffers over
# WORKSPACE_MAX_BYTES are not kept.
WORKSPACE_MAX_BYTES = 256 * 2 ** 20
_workspace = threading.local()


def _scratch(slot: int, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Optional[torch.Tensor]:
    """A reusable buffer of `shape` (its contents undefined), or None (allocate) when it would be too large."""
    if torch.compiler.is_compiling():   # traced (compile, ONNX export): buffers are the compiler's to plan
        return None
    numel = math.prod(shape)
    if numel * dtype.itemsize > WORKSPACE_MAX_BYTES:
        return None
    store = _workspace.__dict__.setdefault("buffers", {})
    # a buffer made under inference_mode cannot be written outside it (and the reverse): one set per mode
    key = (slot, dtype, device, torch.is_inference_mode_enabled())
    buffer = store.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = store[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel].view(shape)


def _matmul(a: torch.Tensor, b: torch.Tensor, slot: int, alpha: float = 1.0) -> torch.Tensor:
    """alpha * a @ b for a (..., N, K), b (..., K, M) with the same batch dims -> (..., N, M), written into workspace
    `slot` (a fresh tensor when the workspace would be too large); alpha is the matmul's, not a pass of its own."""
    *batch, n, k = a.shape
    shape = torch.Size((*batch, n, b.shape[-1]))
    a3, b3 = a.reshape(-1, n, k), b.reshape(-1, k, b.shape[-1])
    out = _scratch(slot, shape, torch.promote_types(a.dtype, b.dtype), a.device)
    if out is None:
        return torch.baddbmm(a3.new_empty(()), a3, b3, beta=0, alpha=alpha).view(shape)
    out3 = out.view(-1, n, shape[-1])
    return torch.baddbmm(out3, a3, b3, beta=0, alpha=alpha, out=out3).view(shape)


def _wide(t: torch.Tensor, slot: int) -> torch.Tensor:
    """t in float32 (in workspace `slot`) when it is half precision; float64 and float32 stay."""
    if t.dtype not in (torch.float16, torch.bfloat16):
        return t
    out = _scratch(slot, t.shape, torch.float32, t.device)
    return t.float() if out is None else out.copy_(t)


def _probabilities(q: torch.Tensor, k: torch.Tensor, keep: bool = False) -> torch.Tensor:
    """P = softmax(q k^T / sqrt(d)), (B, H, N, N) in float32 at least (as autocast's softmax); in workspace slot 0
    unless `keep` (a tensor of its own, saved for backward)."""
    scores = _wide(_matmul(q, k.transpose(-2, -1), 0, alpha=q.shape[-1] ** -0.5), 0)
    return scores.softmax(dim=-1) if keep else torch.softmax(scores, dim=-1, out=scores)


def _masked(probs: torch.Tensor, rate: float) -> torch.Tensor:
    """P * M(r) in workspace slot 1."""
    mask = soft_mask_matrix(probs.shape[-1], rate, probs.device, probs.dtype)
    out = _scratch(1, probs.shape, probs.dtype, probs.device)
    return probs * mask if out is None else torch.mul(probs, mask, out=out)


class _ExplicitSoftMask(torch.autograd.Function):
    """softmax(q k^T / sqrt(d)) * M(r) @ v saving q, k, v and the probabilities P, one (B, H, N, N) matrix where
    autograd keeps two (P and P * M, recomputed here from P in one pass)."""

    @staticmethod
    def forward(ctx, q, k, v, rate):
        with torch.autocast(q.device.type, enabled=False):
            probs = _probabilities(q, k, keep=True)
            out = _masked(probs, rate).to(v.dtype) @ v
        ctx.rate = rate
        ctx.save_for_backward(q, k, v, probs)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, probs = ctx.saved_tensors
        scale = q.shape[-1] ** -0.5
        with torch.autocast(q.device.type, enabled=False):
            grad_out = grad_out.to(v.dtype)
            grad_v = _masked(probs, ctx.rate).to(v.dtype).transpose(-2, -1) @ grad_out
            # d scores = P * (G - rowsum(G * P)) with G = M * (dO v^T): softmax's own backward of G
            mask = soft_mask_matrix(probs.shape[-1], ctx.rate, probs.device, probs.dtype)
            grad_weights = _wide(_matmul(grad_out, v.transpose(-2, -1), 1), 1).mul_(mask)
            grad_scores = _scratch(2, probs.shape, probs.dtype, probs.device)
            if grad_scores is None:
                grad_scores = torch._softmax_backward_data(grad_weights, probs, -1, probs.dtype)
            else:
                torch.ops.aten._softmax_backward_data.out(grad_weights, probs, -1, probs.dtype, grad_input=grad_scores)
            grad_scores = grad_scores.to(q.dtype)
            grad_q = (grad_scores @ k).mul_(scale)
            grad_k = (grad_scores.transpose(-2, -1) @ q).mul_(scale)
        return grad_q, grad_k, grad_v, None


def explicit_soft_mask_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rate: float) -> torch.Tensor:
    """The official soft-mask formula (naive_soft_mask_attention's numbers) on reused buffers; with autograd it
    saves one N x N matrix, not two (_ExplicitSoftMask). q: (B, H, N, d); k, v: (B, Hkv, N, d) -> (B, H, N, d)."""
    groups = q.shape[-3] // k.shape[-3]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=-3), v.repeat_interleave(groups, dim=-3)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _ExplicitSoftMask.apply(q, k, v, rate)
    with torch.autocast(q.device.type, enabled=False):
        probs = _probabilities(q, k)
        return probs.mul_(soft_mask_matrix(q.shape[-2], rate, q.device, probs.dtype)).to(v.dtype) @ v


def prefix_causal_mask(num_tokens: int, prefix_len, device=None, rank: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean SDPA mask, True = may attend: j <= i or j < prefix_len (AIM's pre-training mask).

    prefix_len: an int -> (N, N); a (B,) tensor of per-sample lengths -> (B, 1, N, N). rank: (N,) when each
    token comes in another visiting order (default: its index); then i sees j when rank[j] <= rank[i] or
    rank[j] < prefix_len, i.e. the same mask in that order.
    """
    idx = torch.arange(num_tokens, device=device) if rank is None else rank.to(device)
    causal = idx[None, :] <= idx[:, None]
    if isinstance(prefix_len, torch.Tensor) and prefix_len.ndim == 1:
        prefix = idx[None, None, :] < prefix_len.to(device)[:, None, None]
        return (causal[None] | prefix)[:, None]
    return causal | (idx[None, :] < int(prefix_len))


# --- the one attention core: RoPE on q and k, then the mask mode or explicit mask, on SDPA ---------------------------

def rotate_qk(q: torch.Tensor, k: torch.Tensor, rope: RopeTables = None, key_rope: RopeTables = None,
              layout: str = "interleaved") -> Tuple[torch.Tensor, torch.Tensor]:
    """RoPE on queries (tables `rope`) and keys (`key_rope`, default `rope`). q: (B, H, N, d); k: (B, Hkv, M, d)."""
    key_rope = rope if key_rope is None else key_rope
    if rope is not None:
        q = apply_rope(q, *rope, layout=layout)
    if key_rope is not None:
        k = apply_rope(k, *key_rope, layout=layout)
    return q, k


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_mode: str = "bidirectional",
           soft_mask_rate: float = 0.0, attn_mask: Optional[torch.Tensor] = None,
           dropout_p: float = 0.0) -> torch.Tensor:
    """Attention of rotated q (B, H, N, d) over k, v (B, Hkv, M, d) -> (B, H, N, d).

    An explicit `attn_mask` (boolean, True = may attend, or additive; (N, M) or (B, 1, N, M)) overrides the
    mask mode. Hkv < H is grouped-query attention.
    """
    gqa = k.shape[-3] != q.shape[-3]
    if attn_mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, enable_gqa=gqa)
    if mask_mode == "soft":
        return soft_mask_attention(q, k, v, soft_mask_rate, dropout_p=dropout_p, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=mask_mode == "causal", dropout_p=dropout_p,
                                          enable_gqa=gqa)


def attention_weights(q: torch.Tensor, k: torch.Tensor, mask_mode: str = "bidirectional", soft_mask_rate: float = 0.0,
                      attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The (B, H, N, M) float32 matrix `attend` applies to the values, computed explicitly.

    Soft mask: softmax(q k^T * scale) * M(r), whose causal rows need not sum to one (the official form).
    """
    n, m = q.shape[-2], k.shape[-2]
    k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    scores = (q.float() @ k.float().transpose(-2, -1)) * q.shape[-1] ** -0.5
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
        return scores.softmax(dim=-1)
    if mask_mode == "causal":
        scores = scores.masked_fill(torch.ones(n, m, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    probs = scores.softmax(dim=-1)
    if mask_mode == "soft" and soft_mask_rate < 1.0:
        r = soft_mask_rate
        probs = probs * (r + (1 - r) * torch.ones(n, m, device=q.device).tril())
    return probs


def check_mask_mode(mask_mode: str) -> None:
    """Raise ValueError naming the modes unless mask_mode is one of MASK_MODES."""
    if mask_mode not in MASK_MODES:
        raise ValueError(f"unknown mask mode {mask_mode!r}; expected one of {MASK_MODES}")


class Attention(nn.Module):
    """Multi-head self-attention with grouped-query heads, optional RoPE and a mask mode.

    x: (B, N, dim) -> (B, N, dim). `qkv` is one Linear producing num_heads query heads and
    num_kv_heads key/value heads (num_kv_heads < num_heads = grouped-query attention).
    An explicit `attn_mask` given to forward (boolean, True = may attend; (N, N) or (B, 1, N, N))
    overrides the mask mode. `probabilities` returns the attention matrix the forward pass applies.
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: Optional[int] = None, qkv_bias: bool = True,
                 proj_bias: bool = True, mask_mode: str = "bidirectional", head_dim: Optional[int] = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, rope_layout: str = "interleaved"):
        super().__init__()
        check_mask_mode(mask_mode)
        num_kv_heads = num_kv_heads or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
            head_dim = dim // num_heads
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.mask_mode = mask_mode
        self.soft_mask_rate = 0.0
        self.rope_layout = rope_layout
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, (num_heads + 2 * num_kv_heads) * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(num_heads * head_dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def qkv_heads(self, x: torch.Tensor, rope: RopeTables = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, N, dim) -> rotated q (B, H, N, d), k and v (B, Hkv, N, d)."""
        b, n, _ = x.shape
        qkv = self.qkv(x)
        # traced (compile, export), the plain ops are the compiler's to fuse; rotate_qkv's out= writes are eager-only
        if rope is not None and self.rope_layout == "interleaved" and not torch.compiler.is_compiling():
            return rotate_qkv(qkv, self.num_heads, self.num_kv_heads, self.head_dim, *rope)
        q, k, v = qkv.view(b, n, -1, self.head_dim).transpose(1, 2).split(
            [self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        q, k = rotate_qk(q, k, rope, layout=self.rope_layout)
        return q, k, v

    def forward(self, x: torch.Tensor, rope: RopeTables = None,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv_heads(x, rope)
        out = attend(q, k, v, self.mask_mode, self.soft_mask_rate, attn_mask,
                     self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, -1)))

    def probabilities(self, x: torch.Tensor, rope: RopeTables = None,
                      attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The (B, heads, N, N) float32 matrix the forward pass applies to the values, for input x (B, N, dim)."""
        q, k, _ = self.qkv_heads(x, rope)
        return attention_weights(q, k, self.mask_mode, self.soft_mask_rate, attn_mask)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"mask_mode={self.mask_mode}")
