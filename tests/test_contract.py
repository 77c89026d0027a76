"""The model contract (shared/DESIGN.md section 2), checked once on EVERY registered classifier at a tiny size:
forward and features, backward reaching every trainable parameter, gradient checkpointing changing
nothing, reset_classifier, forward_intermediates / feature maps, the attention-mask argument, timm's
parameter groups and no-weight-decay names, and our own checkpoint round trip."""
import fnmatch

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models._manipulate import group_parameters
from timm.optim import create_optimizer_v2

import llamavit
from llamavit.layers import block as block_module
from llamavit.llm import LLMError

# tiny sizes per family (the named config supplies everything else); img: the test input size
TINY = {
    "illama_*": (dict(embed_dim=32, depth=2, num_heads=2), 32),
    "ladder_vit_*": (dict(embed_dim=32, depth=2, num_heads=2), 32),
    "visionllama_pyramid_*": (dict(embed_dims=(16, 32, 48, 64), depths=(2, 2, 2, 2), num_heads=(1, 2, 3, 4)), 64),
    "visionllama_*": (dict(embed_dim=32, depth=2, num_heads=2, mlp_multiple_of=8), 32),
    "aim_*": (dict(embed_dim=32, depth=2, num_heads=2, probe_layers=2), 28),
    "vit_llama_*_patch32_*": (dict(embed_dim=32, depth=2, num_heads=2, llm_path="random", llm_dim=32,
                                   llm_num_heads=2, llm_ffn_hidden=48, llm_num_layers=2), 64),
    "vit_llama_*": (dict(embed_dim=32, depth=2, num_heads=2, llm_path="random", llm_dim=32, llm_num_heads=2,
                         llm_ffn_hidden=48, llm_num_layers=2), 32),
    "vit_smollm2_*": (dict(embed_dim=32, depth=2, num_heads=2), 32),
}
# the image classifiers: DiT generates, and the point-cloud / video encoders take other inputs than images (their
# forward, backward, frozen block and checkpoints: tests/test_points.py, test_video.py, test_modalities.py)
CLASSIFIERS = [n for n in llamavit.list_models() if not n.startswith(("dit", "point_", "video_"))]
NUM_CLASSES = 5


def tiny(name: str):
    """(kwargs, input size) of the first TINY pattern that matches `name`."""
    return next((dict(kw), size) for pattern, (kw, size) in TINY.items() if fnmatch.fnmatch(name, pattern))


def build(name: str, **overrides):
    kwargs, size = tiny(name)
    try:
        model = llamavit.create_model(name, img_size=size, **{"num_classes": NUM_CLASSES, **kwargs, **overrides})
    except LLMError as e:   # the SmolLM2 GGUF comes with `make venv`
        pytest.skip(str(e))
    if hasattr(model, "set_soft_mask_rate"):
        model.set_soft_mask_rate(0.5)   # a mix of both masks: every path of the soft mask runs
    return model, torch.randn(2, 3, size, size)


@pytest.fixture(scope="module", params=CLASSIFIERS)
def name(request):
    return request.param


def test_every_classifier_has_tiny_settings():
    assert all(any(fnmatch.fnmatch(n, p) for p in TINY) for n in CLASSIFIERS)
    assert len(CLASSIFIERS) == 28   # 8 iLLaMA, 1 ladder, 4 + 4 VisionLLaMA, 4 AIM, 5 + 2 ViT + frozen LLM


def test_forward_features_and_head(name):
    model, x = build(name)
    model.eval()
    with torch.no_grad():
        logits, tokens = model(x), model.forward_features(x)
        pooled = model.forward_head(tokens, pre_logits=True)
    assert logits.shape == (2, NUM_CLASSES) and torch.isfinite(logits).all()
    assert tokens.ndim == 3 and tokens.shape[0] == 2 and tokens.shape[-1] == model.num_features
    assert pooled.shape == (2, model.head_hidden_size)
    torch.testing.assert_close(model.forward_head(tokens), logits)


def test_backward_reaches_every_trainable_parameter(name):
    model, x = build(name)
    model.train()
    torch.nn.functional.cross_entropy(model(x), torch.tensor([1, 3])).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    missing = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no (finite) gradient for {missing[:5]}"
    zero = [n for n, p in trainable if not p.grad.abs().sum() > 0]
    assert not zero, f"all-zero gradient for {zero[:5]}"
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    # frozen: the LLM block; AIM's post-trunk norm, which only pre-training reads
    assert all(n.startswith(("llama.", "trunk.post_trunk_norm.")) for n in frozen)


def test_gradient_checkpointing_changes_nothing(name, monkeypatch):
    model, x = build(name, drop_path_rate=0.0)
    model.train()
    calls = []
    real = block_module.checkpoint
    monkeypatch.setattr(block_module, "checkpoint", lambda *a, **kw: calls.append(1) or real(*a, **kw))

    def run():
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    out, grads = run()
    assert not calls
    model.set_grad_checkpointing(True)
    out_ckpt, grads_ckpt = run()
    assert len(calls) >= 2, "set_grad_checkpointing did not route the blocks through checkpoint"
    torch.testing.assert_close(out_ckpt, out, atol=1e-6, rtol=1e-5)
    assert grads.keys() == grads_ckpt.keys()
    for n in grads:
        torch.testing.assert_close(grads_ckpt[n], grads[n], atol=1e-6, rtol=1e-4, msg=n)


def test_reset_classifier_keeps_the_features(name):
    model, x = build(name)
    model.eval()
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        model.reset_classifier(0)
        torch.testing.assert_close(model(x), pooled)
        assert model.num_classes == 0
        model.reset_classifier(7)
        assert model(x).shape == (2, 7) and model.num_classes == 7
    assert isinstance(model.get_classifier(), torch.nn.Linear)


def test_no_classifier_from_the_start(name):
    model, x = build(name, num_classes=0)
    model.eval()
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out, model.forward_head(model.forward_features(x), pre_logits=True))
    assert out.shape == (2, model.head_hidden_size) and isinstance(model.get_classifier(), torch.nn.Identity)


def test_intermediates_end_in_the_features(name):
    model, x = build(name)
    model.eval()
    info = timm.models.FeatureInfo(model.feature_info, list(range(len(model.feature_info))))
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        features = model.forward_features(x)
        only = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
    torch.testing.assert_close(final, features)
    assert len(maps) == len(info.channels()) >= 2
    for m, chs, red in zip(maps, info.channels(), info.reduction()):
        assert m.shape == (2, chs, x.shape[-2] // red, x.shape[-1] // red)
    torch.testing.assert_close(only[0], maps[0])


def test_attention_mask_argument(name):
    model, x = build(name)
    model.eval()
    if name.startswith("visionllama_pyramid"):
        with pytest.raises(ValueError, match="take no attention mask"):
            model.forward_features(x, attn_mask=torch.ones(4, 4, dtype=torch.bool))
        return
    if hasattr(model, "set_soft_mask_rate"):
        model.set_soft_mask_rate(1.0)   # bidirectional: an all-true mask must change nothing
    with torch.no_grad():
        n = model.forward_features(x).shape[1] if not name.startswith("aim") else model.forward_trunk(x).shape[1]
        full = torch.ones(n, n, dtype=torch.bool)
        torch.testing.assert_close(model.forward_features(x, attn_mask=full), model.forward_features(x),
                                   atol=1e-5, rtol=1e-5)
        causal = model.forward_features(x, attn_mask=full.tril())
    assert not torch.allclose(causal, model.forward_features(x), atol=1e-4)


def test_timm_parameter_groups_and_no_weight_decay(name):
    model, _ = build(name)
    groups = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    assert len(set(groups.values())) > 2
    names = {n for n, _ in model.named_parameters()}
    for pattern in model.no_weight_decay():   # a parameter, or an optional one this config lacks (as timm checks)
        assert any(fnmatch.fnmatch(n, pattern) for n in names) or getattr(model, pattern, None) is None, pattern
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    scales = sorted({g["lr_scale"] for g in optimizer.param_groups})
    assert len(scales) > 2 and scales[-1] == 1.0


def test_our_checkpoint_round_trip(name, tmp_path):
    model, x = build(name)
    model.eval()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    kwargs, size = tiny(name)
    again = llamavit.create_model(name, img_size=size, num_classes=NUM_CLASSES, checkpoint_path=str(path),
                                  **kwargs).eval()
    if hasattr(again, "set_soft_mask_rate"):
        again.set_soft_mask_rate(0.5)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))
