"""Weight selection from an LLM (llamavit.models.weight_selection) on the real SmolLM2-135M GGUF.

The expected elements are written out here from the documented rule, and the LLM is read separately
with llamavit.llm, so the tests do not reuse the code they check.
"""
import pytest
import torch
import torch.nn as nn

from llamavit.llm import LLMError, find_smollm2_gguf, open_llm
from llamavit.models import create_model
from llamavit.models.weight_selection import select_from_llm, uniform_indices, uniform_select

# a small student: D 96 (576 / 6), 3 heads (9 / 3) of head_dim 32 (64 / 2), SwiGLU hidden 256
SMALL = dict(embed_dim=96, depth=2, num_heads=3, img_size=32, num_classes=10)


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = find_smollm2_gguf()
    except LLMError as err:
        pytest.skip(f"SmolLM2 GGUF absent: {err}")
    return open_llm(path)


def illama(**kwargs):
    return create_model("illama_tiny_patch16_224", **{**SMALL, **kwargs})


def test_uniform_select_takes_a_stride_when_the_sizes_divide():
    picked = uniform_select(torch.arange(24).view(6, 4), (3, 2))
    assert picked.tolist() == [[0, 2], [8, 10], [16, 18]]   # rows 0, 2, 4; columns 0, 2


def test_uniform_select_rounds_a_linspace_otherwise():
    assert uniform_indices(6, 4).tolist() == [0, 2, 3, 5]    # round(0, 1.67, 3.33, 5)
    assert uniform_select(torch.arange(5), (3,)).tolist() == [0, 2, 4]
    assert uniform_select(torch.arange(9), (6,)).tolist() == [0, 2, 3, 5, 6, 8]


def test_uniform_select_refuses_a_larger_shape():
    with pytest.raises(ValueError, match="dimension 1 is 5 > 4"):
        uniform_select(torch.zeros(6, 4), (3, 5))


def test_query_and_key_rows_are_whole_heads_and_rope_pairs(smollm2):
    model = illama()
    report = select_from_llm(model, layers="first")
    assert report["layers"] == [0, 1]   # the official rule: block i <- LLM layer i
    layer = smollm2.read_layers([1])[0]
    heads, pairs, cols = (0, 3, 6), range(0, 32, 2), list(range(0, 576, 6))
    q_rows = [64 * h + 2 * p + c for h in heads for p in pairs for c in (0, 1)]
    # grouped-query attention: LLM query heads 0, 3, 6 read kv heads 0, 1, 2 (groups of 3)
    k_rows = [64 * (h // 3) + 2 * p + c for h in heads for p in pairs for c in (0, 1)]
    v_rows = [64 * (h // 3) + j for h in heads for j in range(0, 64, 2)]
    qkv = model.blocks[1].attn.qkv.weight
    assert torch.equal(qkv[:96], layer["attention.wq.weight"][q_rows][:, cols])
    assert torch.equal(qkv[96:192], layer["attention.wk.weight"][k_rows][:, cols])
    assert torch.equal(qkv[192:], layer["attention.wv.weight"][v_rows][:, cols])
    o_cols = [64 * h + j for h in heads for j in range(0, 64, 2)]
    assert torch.equal(model.blocks[1].attn.proj.weight, layer["attention.wo.weight"][cols][:, o_cols])


def test_norms_and_swiglu_are_copied(smollm2):
    model = illama()
    select_from_llm(model)
    layer = smollm2.read_layers([0])[0]
    block, hidden = model.blocks[0], uniform_indices(1536, 256)   # round(linspace(0, 1535, 256))
    assert torch.equal(block.norm1.weight, layer["attention_norm.weight"][::6])
    assert torch.equal(block.norm2.weight, layer["ffn_norm.weight"][::6])
    assert torch.equal(block.mlp.fc1_g.weight, layer["feed_forward.w1.weight"][hidden][:, ::6])
    assert torch.equal(block.mlp.fc1_x.weight, layer["feed_forward.w3.weight"][hidden][:, ::6])
    assert torch.equal(block.mlp.fc2.weight, layer["feed_forward.w2.weight"][::6][:, hidden])


def test_even_and_explicit_layer_choices(smollm2):
    assert select_from_llm(illama(depth=2))["layers"] == [0, 15]   # the default: even (30 / 2: a stride of 15)
    assert select_from_llm(illama(depth=3), layers="even")["layers"] == [0, 10, 20]
    assert select_from_llm(illama(depth=4), layers="even")["layers"] == [0, 10, 19, 29]
    assert select_from_llm(illama(), layers=[5, -1])["layers"] == [5, 29]
    with pytest.raises(ValueError, match="layer index 30 out of range"):
        select_from_llm(illama(), layers=[0, 30])
    with pytest.raises(ValueError, match="layers has 1 indices but the model has 2 blocks"):
        select_from_llm(illama(), layers=[0])


def test_create_model_initialises_and_the_model_runs(smollm2):
    torch.manual_seed(0)
    fresh = illama()
    torch.manual_seed(0)
    model = illama(init_from_llm="smollm2")
    report = model.llm_init_report
    assert report["llm_sha256"] and report["llm_path"] == smollm2.path
    assert len(report["set"]) == 2 * 7 and "blocks.0.attn.qkv.bias" in report["left_at_init"]
    # what the selection leaves keeps the model's own init
    for name in ("blocks.0.attn.qkv.bias", "patch_embed.proj.weight", "pos_embed", "head.weight"):
        assert torch.equal(model.get_parameter(name), fresh.get_parameter(name)), name
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_visionllama_keeps_layernorm_biases_and_layer_scale(smollm2):
    model = create_model("visionllama_small_patch16_224", **SMALL)
    select_from_llm(model, layers="even")
    block, layer = model.blocks[1], smollm2.read_layers([15])[0]
    assert torch.equal(block.norm1.weight, layer["attention_norm.weight"][::6])
    assert torch.count_nonzero(block.norm1.bias) == 0 and torch.count_nonzero(block.norm2.bias) == 0
    assert torch.allclose(block.ls1.gamma, torch.full((96,), 1e-4))
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(embed_dim=768, num_heads=12), "embed_dim 768 > the LLM's dim 576"),
    (dict(embed_dim=384, num_heads=3), "head_dim 128 > the LLM's head_dim 64"),
    (dict(embed_dim=96, num_heads=12), "num_heads 12 > the LLM's n_heads 9"),
    (dict(mlp_ratio=25.0), "SwiGLU hidden width 1792 > the LLM's ffn_hidden 1536"),
])
def test_a_student_wider_than_the_llm_is_refused(smollm2, kwargs, message):
    with pytest.raises(ValueError, match=f"the student is wider than the LLM: {message}"):
        select_from_llm(illama(**kwargs))


def test_unsupported_models_are_refused():
    with pytest.raises(ValueError, match="initialises ILLaMA and VisionLLaMA models; got Linear"):
        select_from_llm(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="needs blocks with fused-qkv attention and a SwiGLU MLP.*Mlp"):
        select_from_llm(create_model("ladder_vit_tiny_patch16_224", **SMALL))
    with pytest.raises(ValueError, match="checkpoint_path or init_from_llm, not both"):
        create_model("illama_tiny_patch16_224", checkpoint_path="x.pth", init_from_llm="smollm2")
