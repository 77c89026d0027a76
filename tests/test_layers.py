"""Building blocks: RMSNorm, SwiGLU width, RoPE, attention mask modes, patch embedding."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llamavit.layers import (Attention, PatchEmbed, RMSNorm, RotaryEmbedding, apply_rope, naive_soft_mask_attention,
                             prefix_causal_mask, rope_inverse_frequencies, soft_mask_attention, soft_mask_bias,
                             swiglu_hidden_dim)


# --- RMSNorm -----------------------------------------------------------------------------------
def test_rmsnorm_matches_hand_formula():
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(16))
    x = 3.0 * torch.randn(2, 5, 16)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    out = norm(x)
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    # the root mean square of the normalised vector (before the weight) is 1
    plain = RMSNorm(16)(x)
    torch.testing.assert_close(plain.pow(2).mean(-1), torch.ones(2, 5), atol=1e-5, rtol=0)


def test_rmsnorm_eps_is_used():
    norm = RMSNorm(4, eps=1.0)
    x = torch.full((1, 4), 0.5)
    # rms^2 = 0.25, so x / sqrt(0.25 + 1)
    torch.testing.assert_close(norm(x), x / math.sqrt(1.25))
    assert "eps=1.0" in repr(norm)


def test_rmsnorm_computes_in_float32_under_bf16():
    norm = RMSNorm(64)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(64))
    norm = norm.to(torch.bfloat16)
    # large offset + small spread: a mean of squares taken in bf16 loses precision
    x = (100 + torch.randn(3, 64)).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    xf = x.float()
    ref32 = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16) * norm.weight
    assert torch.equal(out, ref32)
    # and that is not what a pure-bf16 computation gives
    ref16 = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert not torch.equal(out, ref16)


# --- SwiGLU --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim,hidden", [(192, 512), (384, 1024), (768, 2048), (1024, 2816)])
def test_swiglu_hidden_dim_named_configs(dim, hidden):
    assert swiglu_hidden_dim(dim, 4.0) == hidden


def test_swiglu_hidden_dim_rounding():
    assert swiglu_hidden_dim(96, 4.0) == 256          # int(2 * 384 / 3) = 256, already a multiple
    assert swiglu_hidden_dim(48, 4.0) == 256          # 128 rounded up
    assert swiglu_hidden_dim(192, 4.0, multiple_of=1) == 512
    assert swiglu_hidden_dim(100, 4.0, multiple_of=1) == 266   # int(800 / 3)


# --- RoPE ----------------------------------------------------------------------------------------
def _half_perm(d):
    """Channel permutation taking the interleaved layout (pairs 2i, 2i+1) to the half layout (i, i + d/2)."""
    return torch.cat((torch.arange(0, d, 2), torch.arange(1, d, 2)))


def test_rope_inverse_frequencies_formula():
    inv = rope_inverse_frequencies(16, theta=10000.0)
    expected = torch.tensor([10000.0 ** (-2 * i / 16) for i in range(8)])
    torch.testing.assert_close(inv, expected)
    with pytest.raises(ValueError, match="even head dim, got 15"):
        rope_inverse_frequencies(15)


def test_rope_tables_equal_official_polar_form():
    d, n, theta = 32, 50, 10000.0
    rope = RotaryEmbedding(d, n, theta=theta)
    # official iLLaMA / LLaMA precompute_freqs_cis
    freqs = 1.0 / (theta ** (torch.arange(0, d, 2)[: d // 2].float() / d))
    freqs = torch.outer(torch.arange(n), freqs).float()
    freqs_cis = torch.polar(torch.ones_like(freqs), freqs)
    cos, sin = rope(n)
    assert cos.shape == sin.shape == (n, d // 2) and cos.dtype == torch.float32
    torch.testing.assert_close(cos, freqs_cis.real, atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, freqs_cis.imag, atol=1e-6, rtol=0)


def test_apply_rope_interleaved_equals_official_complex_form():
    d, n = 16, 9
    rope = RotaryEmbedding(d, n)
    x = torch.randn(2, 3, n, d)
    freqs_cis = torch.polar(torch.ones(n, d // 2), torch.outer(torch.arange(n).float(), rope.inv_freq))
    x_ = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    expected = torch.view_as_real(x_ * freqs_cis).flatten(3)
    torch.testing.assert_close(apply_rope(x, *rope(n), layout="interleaved"), expected, atol=1e-6, rtol=1e-5)


def test_rope_layouts_differ_by_channel_permutation():
    d, n = 16, 11
    cos, sin = RotaryEmbedding(d, n)(n)
    x = torch.randn(2, 3, n, d)
    perm = _half_perm(d)
    inv = torch.argsort(perm)
    interleaved = apply_rope(x, cos, sin, layout="interleaved")
    half_on_permuted = apply_rope(x[..., perm], cos, sin, layout="half")
    assert torch.equal(interleaved, half_on_permuted[..., inv])
    # and the two layouts are genuinely different on the same (unpermuted) input
    assert (interleaved - apply_rope(x, cos, sin, layout="half")).abs().max() > 1e-2


@pytest.mark.parametrize("layout", ["interleaved", "half"])
def test_rope_preserves_norms_and_position_zero(layout):
    d, n = 16, 20
    cos, sin = RotaryEmbedding(d, n)(n)
    x = torch.randn(2, 3, n, d)
    out = apply_rope(x, cos, sin, layout=layout)
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[:, :, 0], x[:, :, 0])          # position 0 is the identity rotation
    assert (out[:, :, 1:] - x[:, :, 1:]).abs().max() > 1e-2        # other positions do rotate


def test_apply_rope_keeps_dtype():
    d, n = 8, 4
    cos, sin = RotaryEmbedding(d, n)(n)
    x = torch.randn(1, 1, n, d, dtype=torch.bfloat16)
    out = apply_rope(x, cos, sin)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, apply_rope(x.float(), cos, sin).to(torch.bfloat16))


@pytest.mark.parametrize("layout", ["interleaved", "half"])
def test_rope_scores_depend_only_on_position_difference(layout):
    d, n = 32, 64
    cos, sin = RotaryEmbedding(d, n)(n)
    q, k = torch.randn(d), torch.randn(d)
    # the same q and k placed at every position
    qr = apply_rope(q.expand(1, 1, n, d), cos, sin, layout=layout)[0, 0]
    kr = apply_rope(k.expand(1, 1, n, d), cos, sin, layout=layout)[0, 0]
    scores = qr @ kr.T                                   # scores[m, j] = <R_m q, R_j k>
    for offset in (0, 1, 5, -3, 17):
        diag = torch.diagonal(scores, offset=-offset)      # all (m, j) with m - j = offset
        torch.testing.assert_close(diag, diag[:1].expand_as(diag), atol=1e-4, rtol=1e-4)
    # and the score does change with the difference
    assert abs(scores[5, 5] - scores[5, 0]) > 1e-3
    assert abs(scores[10, 5] - scores[5, 10]) > 1e-3


def test_rotary_embedding_buffers_are_not_persistent():
    rope = RotaryEmbedding(16, 10)
    assert rope.state_dict() == {}
    buffers = dict(rope.named_buffers())
    assert set(buffers) == {"inv_freq", "cos", "sin"}
    assert buffers["cos"].shape == (10, 8)


def test_rotary_embedding_other_lengths_computed():
    d = 16
    rope = RotaryEmbedding(d, 10)
    cos10, sin10 = rope(10)
    assert cos10 is rope.cos and sin10 is rope.sin
    cos25, sin25 = rope(25)
    assert cos25.shape == (25, d // 2)
    fresh = RotaryEmbedding(d, 25)
    torch.testing.assert_close(cos25, fresh.cos, atol=0, rtol=0)
    torch.testing.assert_close(sin25, fresh.sin, atol=0, rtol=0)
    torch.testing.assert_close(cos25[:10], cos10, atol=0, rtol=0)
    cos4, _ = rope(4)
    torch.testing.assert_close(cos4, cos10[:4], atol=0, rtol=0)


def test_rope_bad_layout_raises():
    with pytest.raises(ValueError, match=r"unknown RoPE layout 'bogus'; expected one of \('interleaved', 'half'\)"):
        RotaryEmbedding(16, 4, layout="bogus")
    cos, sin = RotaryEmbedding(8, 4)(4)
    with pytest.raises(ValueError, match="unknown RoPE layout 'complex'"):
        apply_rope(torch.randn(1, 1, 4, 8), cos, sin, layout="complex")


# --- soft-mask attention ---------------------------------------------------------------------------
def _qkv(b=2, h=3, n=7, d=8, dtype=torch.float64, hkv=None):
    hkv = hkv or h
    q = torch.randn(b, h, n, d, dtype=dtype, requires_grad=True)
    k = torch.randn(b, hkv, n, d, dtype=dtype, requires_grad=True)
    v = torch.randn(b, hkv, n, d, dtype=dtype, requires_grad=True)
    return q, k, v


@pytest.mark.parametrize("rate", [0.0, 0.25, 0.5, 1.0])
def test_soft_mask_attention_matches_naive_values_and_grads(rate):
    q, k, v = _qkv()
    grad_out = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    fused = soft_mask_attention(q, k, v, rate, impl="sdpa")
    naive = naive_soft_mask_attention(q, k, v, rate)
    torch.testing.assert_close(fused, naive, atol=1e-12, rtol=1e-10)
    g_fused = torch.autograd.grad(fused, (q, k, v), grad_out)
    g_naive = torch.autograd.grad(naive, (q, k, v), grad_out)
    for name, a, b in zip("qkv", g_fused, g_naive):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10, msg=f"gradient wrt {name} (rate {rate})")


@pytest.mark.parametrize("rate", [0.0, 0.5])
def test_soft_mask_auto_picks_explicit_on_short_cpu_sequences_and_sdpa_otherwise(rate, monkeypatch):
    import llamavit.layers.attention as attn_mod
    calls = []
    monkeypatch.setattr(attn_mod, "explicit_soft_mask_attention",
                        lambda q, k, v, r, *a: calls.append("explicit") or naive_soft_mask_attention(q, k, v, r))
    q, k, v = _qkv(n=attn_mod.CPU_EXPLICIT_MAX_TOKENS)
    attn_mod.soft_mask_attention(q, k, v, rate)
    assert calls == ["explicit"]
    q, k, v = _qkv(b=1, h=1, n=attn_mod.CPU_EXPLICIT_MAX_TOKENS + 1, d=4)
    out = attn_mod.soft_mask_attention(q, k, v, rate)
    assert calls == ["explicit"]  # the longer sequence went through the mirrored-keys SDPA
    torch.testing.assert_close(out, naive_soft_mask_attention(q, k, v, rate), atol=1e-10, rtol=1e-8)
    with pytest.raises(ValueError, match="unknown soft-mask implementation 'flash'"):
        attn_mod.soft_mask_attention(q, k, v, rate, impl="flash")


def _saved(fn, *args):
    """(output, [saved tensors' shapes], bytes of their distinct storages) of fn(*args) under autograd."""
    shapes, storages = [], {}

    def pack(t):
        shapes.append(tuple(t.shape))
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, shapes, sum(storages.values())


@pytest.mark.parametrize("rate", [0.0, 0.3, 0.99])
def test_explicit_soft_mask_matches_naive_and_saves_one_n_by_n_matrix(rate):
    from llamavit.layers.attention import explicit_soft_mask_attention
    n, d = 11, 8
    qkv = torch.randn(2, n, 3, 4, d, dtype=torch.float64, requires_grad=True)   # as the qkv projection lays them out
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    naive = naive_soft_mask_attention(q, k, v, rate)
    out, shapes, nbytes = _saved(explicit_soft_mask_attention, q, k, v, rate)
    torch.testing.assert_close(out, naive, atol=1e-12, rtol=1e-10)
    grad_out = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, qkv, grad_out)[0], torch.autograd.grad(naive, qkv, grad_out)[0],
                               atol=1e-12, rtol=1e-10)
    # q, k, v (views of the projection: one storage) and P; P * M is recomputed from P in backward
    assert [s for s in shapes if s[-2:] == (n, n)] == [(2, 4, n, n)]
    assert nbytes == qkv.numel() * 8 + 2 * 4 * n * n * 8


def test_explicit_soft_mask_with_grouped_heads_and_under_bf16_autocast():
    from llamavit.layers.attention import explicit_soft_mask_attention
    q, k, v = _qkv(n=9, h=4, hkv=2)
    naive = naive_soft_mask_attention(q, k, v, 0.4)
    out = explicit_soft_mask_attention(q, k, v, 0.4)
    torch.testing.assert_close(out, naive, atol=1e-12, rtol=1e-10)
    for a, b in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(naive.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    proj = nn.Linear(8, 24)
    x = torch.randn(2, 9, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, k, v = proj(x).view(2, 9, 3, 1, 8).permute(2, 0, 3, 1, 4).unbind(0)
        out = explicit_soft_mask_attention(q, k, v, 0.3)
    ref = naive_soft_mask_attention(*(t.float() for t in (q, k, v)), 0.3)
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max() < 2e-2
    out.float().square().sum().backward()
    assert proj.weight.grad.dtype == torch.float32 and torch.isfinite(proj.weight.grad).all()


def test_explicit_soft_mask_reuses_its_buffers_without_aliasing_its_outputs():
    import llamavit.layers.attention as attn_mod
    q, k, v = (t.detach().float() for t in _qkv(n=16))
    with torch.no_grad():
        first = attn_mod.explicit_soft_mask_attention(q, k, v, 0.5)
        kept = first.clone()
        buffer = attn_mod._scratch(0, torch.Size((2, 3, 16, 16)), torch.float32, q.device)
        second = attn_mod.explicit_soft_mask_attention(q * 2, k, v, 0.5)
        again = attn_mod._scratch(0, torch.Size((2, 3, 16, 16)), torch.float32, q.device)
    assert buffer.data_ptr() == again.data_ptr()   # one workspace across calls (and layers)
    q.requires_grad_()
    attn_mod._workspace.__dict__.pop("buffers")
    with torch.inference_mode():   # eval under inference_mode first, then training, in one process
        attn_mod.explicit_soft_mask_attention(q, k, v, 0.5)
    attn_mod.explicit_soft_mask_attention(q, k, v, 0.5).sum().backward()
    with torch.no_grad():
        attn_mod.explicit_soft_mask_attention(q, k, v, 0.5)
    assert torch.equal(first, kept) and not torch.equal(first, second)
    assert attn_mod._scratch(0, torch.Size((attn_mod.WORKSPACE_MAX_BYTES // 4 + 1,)), torch.float32, q.device) is None


def test_rmsnorm_and_swiglu_save_less_with_the_same_gradients():
    from llamavit.layers import SwiGLU
    norm = RMSNorm(8).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: norm(x), (x, norm.weight))
    _, shapes, _ = _saved(norm, x)
    assert (3, 5, 8) in shapes and shapes.count((3, 5, 8)) == 1 and (3, 5, 1) in shapes   # x and its scale only
    for bias in (False, True):
        mlp = SwiGLU(8, 16, bias=bias).double()
        assert torch.autograd.gradcheck(lambda x, *p, mlp=mlp: mlp(x), (x, *mlp.parameters()))
        _, shapes, _ = _saved(mlp, x)
        assert shapes.count((3, 5, 16)) == 2   # gate and up; SiLU(gate) and the product are recomputed
        reference = mlp.fc2(F.silu(mlp.fc1_g(x)) * mlp.fc1_x(x))
        torch.testing.assert_close(mlp(x), reference, atol=1e-12, rtol=1e-10)


def test_swiglu_runs_wrapped_projections_through_their_own_forward():
    """A LoRA-wrapped (peft) projection must not be bypassed by the fused training path: with grad the output equals
    the no-grad output and the adapter gets a gradient."""
    from peft import LoraConfig, get_peft_model

    from llamavit.layers import SwiGLU

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = SwiGLU(8, 16, bias=False)

        def forward(self, x):
            return self.mlp(x)

    for target in ("fc2", "fc1_g"):
        torch.manual_seed(0)
        net = get_peft_model(Net(), LoraConfig(r=2, target_modules=[target], init_lora_weights=False))
        x = torch.randn(2, 3, 8, requires_grad=True)
        with torch.no_grad():
            expected = net(x)
        out = net(x)
        torch.testing.assert_close(out, expected)
        out.sum().backward()
        lora_grads = [p.grad for n, p in net.named_parameters() if "lora_" in n]
        assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads), target


@pytest.mark.parametrize("rate", [0.0, 0.25, 0.7])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_lse_soft_mask_matches_naive(rate, dtype, tol):
    q, k, v = (t.detach() for t in _qkv(n=33, h=4, hkv=2, dtype=dtype))
    torch.testing.assert_close(soft_mask_attention(q, k, v, rate, impl="lse"), naive_soft_mask_attention(q, k, v, rate),
                               atol=tol, rtol=tol)


def test_soft_mask_auto_takes_lse_only_for_the_longest_cpu_inference(monkeypatch):
    import llamavit.layers.attention as attn_mod
    calls = []
    for name in ("lse_soft_mask_attention", "explicit_soft_mask_attention"):
        monkeypatch.setattr(attn_mod, name, lambda *a, name=name: calls.append(name.split("_")[0]) or a[0])
    longest = dict(b=1, h=1, n=attn_mod.CPU_INFERENCE_EXPLICIT_MAX_TOKENS + 1, d=2)
    long = dict(b=1, h=1, n=attn_mod.CPU_EXPLICIT_MAX_TOKENS + 1, d=2)
    with torch.no_grad():
        attn_mod.soft_mask_attention(*_qkv(**longest), 0.5)
        attn_mod.soft_mask_attention(*_qkv(**long), 0.5)   # inference: explicit up to the longer limit
    assert calls == ["lse", "explicit"]
    attn_mod.soft_mask_attention(*_qkv(**long), 0.5)   # a gradient is needed: the mirrored-keys SDPA
    attn_mod.soft_mask_attention(*_qkv(), 0.5)
    assert calls == ["lse", "explicit", "explicit"]


def test_lse_soft_mask_refuses_gradients_and_dropout():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="lse soft-mask form runs on CPU without gradients"):
        soft_mask_attention(q, k, v, 0.5, impl="lse")
    with torch.no_grad(), pytest.raises(ValueError, match="the lse soft-mask form has no attention dropout"):
        soft_mask_attention(q, k, v, 0.5, dropout_p=0.1, impl="lse")


def test_soft_mask_forms_agree_with_grouped_query_heads():
    q, k, v = _qkv(h=4, hkv=2)
    explicit = soft_mask_attention(q, k, v, 0.3, impl="explicit")
    fused = soft_mask_attention(q, k, v, 0.3, impl="sdpa", enable_gqa=True)
    torch.testing.assert_close(explicit, fused, atol=1e-12, rtol=1e-10)


def test_naive_soft_mask_is_the_official_formula():
    q, k, v = _qkv(b=1, h=2, n=5, d=4)
    rate = 0.3
    probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(4), dim=-1)
    mask = torch.where(torch.ones(5, 5).tril().bool(), 1.0, rate).double()
    torch.testing.assert_close(naive_soft_mask_attention(q, k, v, rate), (probs * mask) @ v)
    # r = 1 is plain bidirectional attention
    torch.testing.assert_close(soft_mask_attention(q, k, v, 1.0), F.scaled_dot_product_attention(q, k, v))


def test_causal_soft_mask_rows_do_not_sum_to_one():
    """The official quirk: the mask multiplies the probabilities after the softmax, no renormalisation."""
    q, k, _ = _qkv(b=1, h=1, n=6, d=8)
    ones = torch.ones(1, 1, 6, 8, dtype=torch.float64)
    row_sums = soft_mask_attention(q, k, ones, 0.0)[0, 0, :, 0]
    probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8), dim=-1)[0, 0]
    expected = torch.stack([probs[i, : i + 1].sum() for i in range(6)])
    torch.testing.assert_close(row_sums, expected.detach())
    assert (row_sums[:-1] < 1 - 1e-6).all()                     # every row but the last loses mass
    torch.testing.assert_close(row_sums[-1], torch.tensor(1.0, dtype=torch.float64))
    # renormalised causal attention would sum to one everywhere: the two differ
    causal = F.scaled_dot_product_attention(q, k, ones, is_causal=True)[0, 0, :, 0]
    torch.testing.assert_close(causal, torch.ones(6, dtype=torch.float64))


def test_causal_soft_mask_values_of_later_tokens_do_not_leak_but_keys_do():
    """At r = 0, out_i mixes only v_0..v_i; later KEYS still enter through the softmax denominator."""
    q, k, v = (t.detach() for t in _qkv(b=1, h=2, n=6, d=8))
    base = soft_mask_attention(q, k, v, 0.0)
    v2 = v.clone()
    v2[:, :, 3:] += 5.0
    torch.testing.assert_close(soft_mask_attention(q, k, v2, 0.0)[:, :, :3], base[:, :, :3], atol=1e-12, rtol=0)
    k2 = k.clone()
    k2[:, :, 3:] += 5.0
    assert (soft_mask_attention(q, k2, v, 0.0)[:, :, :3] - base[:, :, :3]).abs().max() > 1e-3


def test_soft_mask_bias_layout_and_rate_check():
    bias = soft_mask_bias(3, 0.25)
    assert bias.shape == (3, 6)
    upper = torch.ones(3, 3).triu(1).bool()
    torch.testing.assert_close(bias[:, :3][upper], torch.full((3,), math.log(0.25)))
    assert (bias[:, :3][~upper] == 0).all()
    torch.testing.assert_close(bias[:, 3:][upper], torch.full((3,), math.log(0.75)))
    assert torch.isneginf(bias[:, 3:][~upper]).all()
    # the mirrored weights add back to one: e^first + e^second = 1 everywhere
    torch.testing.assert_close(bias[:, :3].exp() + bias[:, 3:].exp(), torch.ones(3, 3))
    for bad in (1.5, -0.1):
        with pytest.raises(ValueError, match=rf"soft mask rate must be in \[0, 1\], got {bad}"):
            soft_mask_bias(3, bad)


# --- Attention module --------------------------------------------------------------------------------
def _manual_attention(attn: Attention, x, allowed=None, rope=None, soft_rate=None):
    """Unfused reference for Attention.forward: explicit scores, boolean mask (True = may attend), GQA by repeat."""
    b, n, _ = x.shape
    h, hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    qkv = attn.qkv(x).view(b, n, h + 2 * hkv, d).transpose(1, 2)
    q, k, v = qkv[:, :h], qkv[:, h:h + hkv], qkv[:, h + hkv:]
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    k = k.repeat_interleave(h // hkv, dim=1)
    v = v.repeat_interleave(h // hkv, dim=1)
    scores = q @ k.transpose(-2, -1) * d ** -0.5
    if soft_rate is not None:
        out = naive_soft_mask_attention(q, k, v, soft_rate)
    else:
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        probs = scores.softmax(-1)
        out = probs @ v
    return attn.proj(out.transpose(1, 2).reshape(b, n, h * d))


def test_attention_causal_mode_is_renormalised_causal():
    attn = Attention(32, 4, mask_mode="causal").double()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    tril = torch.ones(9, 9, dtype=torch.bool).tril()
    torch.testing.assert_close(attn(x), _manual_attention(attn, x, tril))
    # different from the official soft mask at r = 0
    soft = Attention(32, 4, mask_mode="soft").double()
    soft.load_state_dict(attn.state_dict())
    soft.soft_mask_rate = 0.0
    assert (soft(x) - attn(x)).abs().max() > 1e-3
    torch.testing.assert_close(soft(x), _manual_attention(attn, x, soft_rate=0.0))


def test_attention_bidirectional_with_rope():
    attn = Attention(32, 2).double()
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    rope = RotaryEmbedding(16, 6)(6)
    out = attn(x, rope)
    torch.testing.assert_close(out, _manual_attention(attn, x, rope=rope), atol=1e-6, rtol=1e-6)
    assert (out - attn(x)).abs().max() > 1e-4           # RoPE is actually applied


def test_prefix_causal_mask_int():
    mask = prefix_causal_mask(5, 2)
    expected = torch.tensor([[1, 1, 0, 0, 0],
                             [1, 1, 0, 0, 0],
                             [1, 1, 1, 0, 0],
                             [1, 1, 1, 1, 0],
                             [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert mask.dtype == torch.bool and torch.equal(mask, expected)
    assert torch.equal(prefix_causal_mask(4, 0), torch.ones(4, 4, dtype=torch.bool).tril())
    assert torch.equal(prefix_causal_mask(4, 1), torch.ones(4, 4, dtype=torch.bool).tril())
    assert torch.equal(prefix_causal_mask(4, 4), torch.ones(4, 4, dtype=torch.bool))


def test_prefix_causal_mask_per_sample():
    lens = torch.tensor([1, 3, 5])
    mask = prefix_causal_mask(5, lens)
    assert mask.shape == (3, 1, 5, 5) and mask.dtype == torch.bool
    for i, n in enumerate(lens.tolist()):
        assert torch.equal(mask[i, 0], prefix_causal_mask(5, n)), f"sample {i}"


def test_attention_prefix_mask_is_injected_not_a_mode():
    attn = Attention(32, 4).double()
    x = torch.randn(3, 7, 32, dtype=torch.float64)
    torch.testing.assert_close(attn(x, attn_mask=prefix_causal_mask(7, 3)),
                               _manual_attention(attn, x, prefix_causal_mask(7, 3)))
    lens = torch.tensor([1, 4, 7])
    out = attn(x, attn_mask=prefix_causal_mask(7, lens))
    torch.testing.assert_close(out, _manual_attention(attn, x, prefix_causal_mask(7, lens)))
    with pytest.raises(ValueError, match="unknown mask mode 'prefix'; expected one of"):
        Attention(32, 4, mask_mode="prefix")
    # sample with prefix 7 sees everything: bidirectional
    bi = Attention(32, 4).double()
    bi.load_state_dict(attn.state_dict())
    torch.testing.assert_close(out[2], bi(x)[2])


def test_explicit_attn_mask_overrides_mode():
    attn = Attention(32, 4, mask_mode="causal").double()
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    full = torch.ones(6, 6, dtype=torch.bool)
    torch.testing.assert_close(attn(x, attn_mask=full), _manual_attention(attn, x))
    custom = torch.rand(6, 6) > 0.5
    custom.fill_diagonal_(True)
    torch.testing.assert_close(attn(x, attn_mask=custom), _manual_attention(attn, x, custom))
    # per-sample (B, 1, N, N) mask, overriding the soft mode too
    soft = Attention(32, 4, mask_mode="soft").double()
    soft.load_state_dict(attn.state_dict())
    per_sample = torch.stack([custom, full])[:, None]
    torch.testing.assert_close(soft(x, attn_mask=per_sample), _manual_attention(attn, x, per_sample))


@pytest.mark.parametrize("mode", ["bidirectional", "causal", "soft"])
def test_grouped_query_attention_equals_repeated_kv(mode):
    attn = Attention(32, num_heads=4, num_kv_heads=2, mask_mode=mode).double()
    assert attn.qkv.out_features == (4 + 2 * 2) * 8
    attn.soft_mask_rate = 0.5
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    rope = RotaryEmbedding(8, 5)(5)
    if mode == "soft":
        expected = _manual_attention(attn, x, rope=rope, soft_rate=0.5)
    else:
        allowed = torch.ones(5, 5, dtype=torch.bool).tril() if mode == "causal" else None
        expected = _manual_attention(attn, x, allowed, rope=rope)
    torch.testing.assert_close(attn(x, rope), expected, atol=1e-6, rtol=1e-6)
    assert "kv_heads=2" in repr(attn)


def test_attention_constructor_errors():
    with pytest.raises(ValueError, match=r"num_heads \(4\) must be a multiple of num_kv_heads \(3\)"):
        Attention(48, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match=r"unknown mask mode 'sliding'; expected one of \('bidirectional', 'causal', "
                                         r"'soft'\)"):
        Attention(32, 4, mask_mode="sliding")
    with pytest.raises(ValueError, match=r"dim \(30\) must be divisible by num_heads \(4\)"):
        Attention(30, 4)
    # an explicit head_dim lifts the divisibility requirement
    attn = Attention(30, 4, head_dim=8)
    assert attn.qkv.out_features == 3 * 4 * 8 and attn(torch.randn(1, 3, 30)).shape == (1, 3, 30)


# --- PatchEmbed ----------------------------------------------------------------------------------------
# --- inference buffers reused in place ---------------------------------------------------------------
def test_inference_in_place_paths_equal_the_autograd_paths():
    """RMSNorm, SwiGLU and the explicit soft mask overwrite their own buffers only without autograd."""
    from llamavit.layers import SwiGLU
    torch.manual_seed(0)
    x = torch.randn(2, 9, 16)
    norm, mlp = RMSNorm(16), SwiGLU(16, 32, bias=False)
    norm.weight.data.uniform_(0.5, 1.5)
    q, k, v = (torch.randn(2, 3, 9, 8) for _ in range(3))
    with torch.no_grad():
        fast = (norm(x), mlp(x), naive_soft_mask_attention(q, k, v, 0.0), naive_soft_mask_attention(q, k, v, 0.4))
    slow = (norm(x), mlp(x), naive_soft_mask_attention(q.requires_grad_(), k, v, 0.0),
            naive_soft_mask_attention(q, k, v, 0.4))
    assert all(t.grad_fn is not None for t in slow)   # the second pass did run with autograd
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-6)
    # under autocast the weight (fp32) multiplies a bf16 activation out of place, as before
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert norm(x.bfloat16()).dtype == torch.float32


def test_apply_rope_on_strided_qkv_views_equals_contiguous():
    """q and k come as strided views of the qkv projection; the rotation must not depend on the layout."""
    qkv = torch.randn(2, 5, 3, 4, 8).permute(2, 0, 3, 1, 4)   # (3, B, heads, N, head_dim), strided
    cos, sin = RotaryEmbedding(8, 5)(5)
    for t in (qkv[0], qkv[1], qkv[1][..., 1:7]):   # the last has an odd offset: copied first
        assert not t.is_contiguous()
        torch.testing.assert_close(apply_rope(t, cos[:, :t.shape[-1] // 2], sin[:, :t.shape[-1] // 2]),
                                   apply_rope(t.contiguous(), cos[:, :t.shape[-1] // 2], sin[:, :t.shape[-1] // 2]),
                                   rtol=0, atol=1e-6)   # vectorised vs strided kernel: last-bit rounding


def test_patch_embed_raster_order():
    pe = PatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=12)
    x = torch.randn(2, 3, 32, 24)
    out = pe(x)
    assert out.shape == (2, 4 * 3, 12)
    assert pe.grid_size == (4, 4) and pe.num_patches == 16
    # token r * 3 + c is the patch at row r, column c
    w, b = pe.proj.weight.reshape(12, -1), pe.proj.bias
    for r, c in [(0, 0), (0, 2), (1, 0), (3, 2)]:
        patch = x[:, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8].reshape(2, -1)
        torch.testing.assert_close(out[:, r * 3 + c], patch @ w.T + b, atol=1e-5, rtol=1e-5)


def test_patch_embed_errors_state_expected_and_given():
    pe = PatchEmbed(img_size=32, patch_size=8, in_chans=3, embed_dim=12)
    with pytest.raises(ValueError, match=r"expected 3 input channel\(s\), got 1 \(input shape \(2, 1, 32, 32\)\)"):
        pe(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"input size 30x32 is not a positive multiple of the patch size 8x8$"):
        pe(torch.randn(2, 3, 30, 32))
    with pytest.raises(ValueError, match=r"expected images of shape \(B, C, H, W\), got a tensor of shape "
                                         r"\(3, 32, 32\)"):
        pe(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match=r"input size 0x32 is not a positive multiple"):
        pe(torch.randn(1, 3, 0, 32))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-6), (torch.bfloat16, 0.0)])
def test_rotate_qkv_matches_split_then_rope_in_values_and_gradients(dtype, tol):
    """The fused split + RoPE of the qkv projection (one gradient buffer) gives apply_rope's numbers on split heads,
    with grouped-query heads, and a zero gradient for a head group that is not used."""
    from llamavit.layers.rope import rotate_qkv
    b, n, heads, kv_heads, d = 2, 5, 4, 2, 8
    qkv = torch.randn(b, n, (heads + 2 * kv_heads) * d, dtype=dtype, requires_grad=True)
    cos, sin = RotaryEmbedding(d, n)(n)
    fused = rotate_qkv(qkv, heads, kv_heads, d, cos, sin)
    q, k, v = qkv.view(b, n, -1, d).transpose(1, 2).split([heads, kv_heads, kv_heads], dim=1)
    reference = (apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
    assert all(t.is_contiguous() for t in fused)   # ready for batched matmuls without a copy
    grads = [torch.randn_like(t) for t in fused]
    for ours, theirs in zip(fused, reference):
        torch.testing.assert_close(ours, theirs, atol=tol, rtol=tol)
    torch.testing.assert_close(torch.autograd.grad(fused, qkv, grads)[0], torch.autograd.grad(reference, qkv, grads)[0],
                               atol=tol * 4, rtol=tol * 4)
    q_only = torch.autograd.grad(rotate_qkv(qkv, heads, kv_heads, d, cos, sin)[0].sum(), qkv)[0]
    assert q_only[..., heads * d:].abs().sum() == 0 and q_only[..., :heads * d].abs().sum() > 0
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda t: rotate_qkv(t, heads, kv_heads, d, cos.double(), sin.double()), (qkv,))


def test_rope_tables_cached_under_inference_mode_serve_training():
    """VisionLLaMA caches its 2D RoPE tables; an eval under inference_mode first (as a benchmark or a validation loop
    does) must not make the next training step fail on saving inference tensors."""
    import llamavit
    model = llamavit.create_model("visionllama_fmnist_patch4_28")
    x = torch.randn(2, model.in_chans if hasattr(model, "in_chans") else 1, 28, 28)
    with torch.inference_mode():
        expected = model.eval()(x)
    out = model(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert all(p.grad is not None for p in model.blocks[0].attn.qkv.parameters())
