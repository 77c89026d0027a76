"""ViT + frozen LLM block: official parity, the frozen block (no gradient, no optimiser state, not in
our checkpoints, referenced by sha256), official training checkpoints, GQA, errors."""
import os
import shutil
import warnings
from pathlib import Path

import pytest
import timm
import torch
from llm_files import TinyLLM, write_gguf, write_meta
from timm.optim import create_optimizer_v2

import llamavit
from llamavit import CheckpointError
from llamavit.info import model_info
from llamavit.layers.llama_block import llama_decoder_block
from llamavit.llm import LLMError, find_smollm2_gguf
from llamavit.train.checkpoint import model_from_checkpoint, read_meta, save_checkpoint

FIXTURES = (Path(__file__).resolve().parent.parent / ".." / "shared" / "fixtures").resolve()
FIXTURE_PATHS = sorted(FIXTURES.glob("vit_llm_*.pt")) if FIXTURES.is_dir() else []
STANDARD = ("embed_dim", "depth", "num_heads", "mlp_ratio", "num_classes", "img_size", "patch_size", "in_chans",
            "qkv_bias", "global_pool")
TOL = 1e-4
NAME = "vit_llama_small_patch16_224"
SMALL = dict(embed_dim=32, depth=2, num_heads=2, img_size=32, patch_size=8, num_classes=5)


def max_diff(a, b):
    assert a.shape == b.shape, f"{tuple(a.shape)} vs {tuple(b.shape)}"
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(params=FIXTURE_PATHS or [None], ids=[p.stem for p in FIXTURE_PATHS] or ["no-fixtures"])
def official(request, tmp_path):
    """(fixture, kwargs, LLM dir, path of the official training checkpoint with / without llama.layers)."""
    if request.param is None:
        pytest.skip(f"no vit_llm_*.pt parity fixtures in {FIXTURES} (expected <repo>/../shared/fixtures)")
    fx = torch.load(request.param, weights_only=True)
    ours = fx["ours"]["kwargs"]
    kwargs = {k: ours[k] for k in STANDARD if k in ours}
    kwargs["llm_layers"] = list(ours["llm_layers"])
    llm_dir = FIXTURES / os.path.dirname(ours["llm_path"])
    full, without = tmp_path / "full.pth", tmp_path / "without_llm.pth"
    torch.save({"model": fx["state_dict"], "epoch": 3}, full)
    torch.save({"model": {k: v for k, v in fx["state_dict"].items() if not k.startswith("llama.layers.")}}, without)
    return fx, kwargs, llm_dir, full, without


def run_all(model, x):
    """logits, features, tokens, llm_out and vit_blocks_out of one forward pass."""
    seen = {}
    hooks = [model.llama.register_forward_hook(lambda m, i, o: seen.__setitem__("llm_out", o)),
             model.blocks.register_forward_hook(lambda m, i, o: seen.__setitem__("vit_blocks_out", o))]
    with torch.no_grad():
        tokens = model.forward_features(x)
        out = {"logits": model(x), "features": model.forward_head(tokens, pre_logits=True), "tokens": tokens, **seen}
    for h in hooks:
        h.remove()
    return out


def check_parity(model, fx):
    got = run_all(model.eval(), fx["inputs"])
    compared = [k for k in got if k in fx["outputs"]]
    assert {"logits", "features", "tokens", "llm_out"} <= set(compared)
    for k in compared:
        assert max_diff(got[k], fx["outputs"][k]) <= TOL, k


# --- parity -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["meta", "hf"])
def test_parity_llm_block_read_from_checkpoint(official, fmt):
    fx, kwargs, llm_dir, _, without = official
    model = llamavit.create_model(NAME, checkpoint_path=str(without), llm_path=str(llm_dir / fmt), **kwargs)
    assert model.llm_source["source"] == "file" and model.llm_source["layers"] == kwargs["llm_layers"]
    check_parity(model, fx)
    assert sum(p.numel() for p in model.parameters()) == fx["param_count"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == fx["trainable_param_count"]


def test_parity_full_official_checkpoint(official):
    """The official training checkpoint stores llama.layers.*: checked against the LLM file, or used alone."""
    fx, kwargs, llm_dir, full, _ = official
    check_parity(llamavit.create_model(NAME, checkpoint_path=str(full), llm_path=str(llm_dir / "meta"), **kwargs), fx)
    ours = fx["ours"]["kwargs"]
    shape = dict(llm_dim=ours["llm_dim"], llm_num_heads=ours["llm_num_heads"], llm_ffn_hidden=ours["llm_ffn_hidden"],
                 llm_norm_eps=ours["llm_norm_eps"], llm_num_layers=fx["llm_checkpoint"]["ckpt_num_layers"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # the checkpoint filled the block: no untrained warning
        model = llamavit.create_model(NAME, checkpoint_path=str(full), **kwargs, **shape)
        check_parity(model, fx)
    assert model.llama.source == "checkpoint"
    assert any(k.startswith("llama.layers.0.") for k in model.state_dict())   # no file to reference: stored


def test_official_block_differing_from_llm_file_is_refused(official, tmp_path):
    fx, kwargs, llm_dir, _, _ = official
    sd = dict(fx["state_dict"])
    sd["llama.layers.0.attention.wv.weight"] = sd["llama.layers.0.attention.wv.weight"] + 0.01
    torch.save({"model": sd}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"llama\.layers\.0\.attention\.wv\.weight differs from layer"):
        llamavit.create_model(NAME, checkpoint_path=str(tmp_path / "other.pth"), llm_path=str(llm_dir / "meta"),
                              **kwargs)


def test_official_checkpoint_without_block_needs_llm(official):
    fx, kwargs, _, _, without = official
    with pytest.raises(CheckpointError, match=r"does not store the frozen LLM block.*pass llm_path="):
        llamavit.create_model(NAME, checkpoint_path=str(without), llm_dim=fx["ours"]["kwargs"]["llm_dim"],
                              llm_num_heads=4, llm_ffn_hidden=64, llm_num_layers=2, **kwargs)


# --- the frozen block -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm")
    return {"meta": str(write_meta(root / "meta", TinyLLM())),
            "gguf": write_gguf(str(root / "tiny.F16.gguf"), TinyLLM(), "F16"),
            "other": str(write_meta(root / "other", TinyLLM(seed=9)))}


def small(llm_path, **kwargs):
    return llamavit.create_model(NAME, llm_path=llm_path, **{**SMALL, **kwargs})


def test_frozen_block_no_grad_no_optimizer_state(tiny_llm):
    model = small(tiny_llm["meta"])
    frozen = list(model.llama.parameters())
    assert frozen and all(not p.requires_grad for p in frozen)
    opt = create_optimizer_v2(model, "adamw", lr=1e-2, weight_decay=0.05)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not in_opt & {id(p) for p in frozen}
    assert in_opt == {id(p) for p in model.parameters() if p.requires_grad}
    before = [p.clone() for p in frozen]
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert all(p.grad is None for p in frozen)
    assert model.llama_dim_mapper1.weight.grad.abs().sum() > 0 and model.blocks[0].attn.qkv.weight.grad is not None
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, frozen))
    assert not any(id(p) in {id(q) for q in frozen} for p in opt.state)


def test_our_checkpoint_references_llm_by_sha256(tiny_llm, tmp_path):
    model = small(tiny_llm["meta"], llm_layers=[1]).eval()
    sd = model.state_dict()
    assert not any(k.startswith("llama.layers.") for k in sd)
    assert {"llama.llm_sha256", "llama.llm_layers", "llama.norm.weight", "llama_dim_mapper1.weight"} <= set(sd)
    meta = {"model": NAME, "model_kwargs": {**SMALL, "llm_path": tiny_llm["meta"], "llm_layers": [1]}}
    ckpt = save_checkpoint(str(tmp_path / "run"), 1, model, meta, {"step": 1})
    assert read_meta(ckpt)["llm"]["sha256"] == model.llm_source["sha256"]
    back = model_from_checkpoint(ckpt).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    # a plain load_state_dict of our state dict works too (the missing frozen keys are expected)
    assert small(tiny_llm["meta"], llm_layers=[1]).load_state_dict(sd).missing_keys == []

    with pytest.raises(CheckpointError, match=r"trained with the LLM of sha256 [0-9a-f]{16}….*has sha256"):
        model_from_checkpoint(ckpt, llm_path=tiny_llm["other"])
    with pytest.raises(CheckpointError, match=r"trained with LLM layers \[1\], this model takes \[2\]"):
        model_from_checkpoint(ckpt, llm_layers=[2])
    with pytest.raises(CheckpointError, match=r"references its frozen LLM block .* without storing it"):
        model_from_checkpoint(ckpt, llm_path=None, llm_dim=32, llm_num_heads=4, llm_ffn_hidden=96, llm_num_layers=3)


def test_same_weights_from_meta_and_gguf_formats(tiny_llm):
    """The same fp16 weights through Meta and GGUF give the same model with GQA (GGUF keeps the norms in
    F32, Meta in fp16: that rounding is the only difference)."""
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(0)
    a = small(tiny_llm["meta"]).eval()
    torch.manual_seed(0)
    b = small(tiny_llm["gguf"]).eval()
    assert a.llm_source["sha256"] != b.llm_source["sha256"]
    assert (a.llm_config.n_heads, a.llm_config.n_kv_heads) == (4, 2)
    with torch.no_grad():
        assert max_diff(a(x), b(x)) < 5e-4


def test_llama_block_matches_the_official_formula_with_gqa():
    torch.manual_seed(0)
    layer = llama_decoder_block(dim=32, n_heads=4, n_kv_heads=2, ffn_hidden=48, norm_eps=1e-5)
    for p in layer.parameters():
        p.data.normal_(0, 0.2)
    x = torch.randn(2, 7, 32)

    def rms(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    a = layer.attn
    h_in = rms(x, layer.norm1.weight)
    q = (h_in @ a.wq.weight.T).view(2, 7, 4, 8).transpose(1, 2)
    k = (h_in @ a.wk.weight.T).view(2, 7, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
    v = (h_in @ a.wv.weight.T).view(2, 7, 2, 8).transpose(1, 2).repeat_interleave(2, dim=1)
    attn = torch.softmax((q @ k.transpose(-2, -1)) / 8 ** 0.5, dim=-1) @ v   # no mask, no RoPE
    h = x + attn.transpose(1, 2).reshape(2, 7, 32) @ a.wo.weight.T
    f = layer.mlp
    g = rms(h, layer.norm2.weight)
    want = h + (torch.nn.functional.silu(g @ f.w1.weight.T) * (g @ f.w3.weight.T)) @ f.w2.weight.T
    with torch.no_grad():
        assert max_diff(layer(x), want) < 1e-5
        # bidirectional: the first token depends on the last
        x2 = x.clone()
        x2[:, -1] += 1
        assert max_diff(layer(x2)[:, 0], layer(x)[:, 0]) > 1e-3


# --- construction without weights, warnings, names ----------------------------------------------------
def test_untrained_block_warns_random_control_does_not(tiny_llm):
    model = llamavit.create_model(NAME, llm_dim=32, llm_num_heads=4, llm_ffn_hidden=64, **SMALL)
    assert model.llm_source["source"] == "untrained" and model.llm_source["layers"] == [31]
    with pytest.warns(UserWarning, match=r"frozen LLM block is UNTRAINED"):
        model(torch.randn(1, 3, 32, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(1, 3, 32, 32))    # once per model
        control = llamavit.create_model(NAME, llm_path="random", llm_dim=32, llm_num_heads=4, llm_ffn_hidden=64,
                                        **SMALL)
        control(torch.randn(1, 3, 32, 32))
    assert any(k.startswith("llama.layers.0.") for k in control.state_dict())   # a random block is saved
    w = control.llama.layers[0].attn.wq.weight
    assert 0.015 < w.std() < 0.025   # the official random block: trunc_normal(std 0.02)


def test_meta_device_counts_official_sizes():
    """ViT-S + LLaMA-7B layer 31: 227.6M parameters, 25.2M trainable (the paper's numbers)."""
    info = model_info("vit_llama_small_patch16_224")
    assert (info["params"], info["trainable_params"]) == (227_583_848, 25_196_392)
    assert info["config"]["llm_dim"] == 4096 and info["gflops"] > 0
    assert model_info("vit_llama_tiny_patch32_224")["params"] > 202_000_000


def test_names_registered_with_timm():
    names = llamavit.list_models("vit_llama_*") + llamavit.list_models("vit_smollm2_*")
    assert names == ["vit_llama_base_patch16_224", "vit_llama_base_patch32_224", "vit_llama_small_patch16_224",
                     "vit_llama_tiny_patch16_224", "vit_llama_tiny_patch32_224", "vit_smollm2_small_patch16_224",
                     "vit_smollm2_tiny_patch16_224"]
    with torch.device("meta"):
        m = timm.create_model("vit_llama_base_patch32_224")
    assert m.patch_embed.proj.kernel_size == (32, 32) and m.embed_dim == 768


def test_smollm2_default_is_the_wheels_last_layer():
    try:
        find_smollm2_gguf()
    except LLMError as e:
        pytest.skip(str(e))
    model = llamavit.create_model("vit_smollm2_tiny_patch16_224", **SMALL)
    src = model.llm_source
    assert src["path"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and src["layers"] == [29]
    assert (src["dim"], src["n_heads"], src["n_kv_heads"], src["ffn_hidden"]) == (576, 9, 3, 1536)
    assert model.llama.layers[0].norm1.eps == 1e-5
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5) and torch.isfinite(out).all()


def test_global_pool_avg_and_timm_contract(tiny_llm):
    model = small(tiny_llm["meta"], global_pool="avg").eval()
    assert "fc_norm.weight" in model.state_dict() and isinstance(model.norm, torch.nn.Identity)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (2, 1 + 16, 32)
        pooled = model.forward_head(tokens, pre_logits=True)
        assert max_diff(pooled, model.fc_norm(tokens[:, 1:].mean(1))) == 0
        assert model(torch.randn(1, 3, 48, 48)).shape == (1, 5)   # other resolutions: pos_embed resampled
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.num_features == 32
    assert "pos_embed" in model.no_weight_decay()


def test_bad_llm_inputs_through_create_model(tiny_llm, tmp_path):
    with pytest.raises(LLMError, match="LLM checkpoint not found"):
        small(str(tmp_path / "missing"))
    with pytest.raises(LLMError, match=r"layer index 5 out of range.*has 3 layers"):
        small(tiny_llm["meta"], llm_layers=[5])
    with pytest.raises(ValueError, match="global_pool must be 'token' or 'avg'"):
        small(tiny_llm["meta"], global_pool="max")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llm["meta"], broken)
    (broken / "params.json").write_text('{"dim": 32}')
    with pytest.raises(LLMError, match="not a LLaMA-architecture Meta checkpoint"):
        small(str(broken))


# --- information-filtering analysis -------------------------------------------------------------------
def test_activation_measures_on_known_maps():
    from llamavit.eval.activations import frequency_map, magnitude_map
    grid = torch.zeros(1, 4, 4, 3)
    grid[0, 1, 2] = torch.tensor([3.0, 0.0, 4.0])   # one token stands out
    mag = magnitude_map(grid)[0]
    assert mag.argmax().item() == 1 * 4 + 2 and mag[1, 2] > 4 * mag[0, 0]
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    smooth = torch.cos(2 * torch.pi * xx / 8)[None, :, :, None].repeat(1, 1, 1, 2)     # 1/8 cycle per token
    checker = ((-1.0) ** (xx + yy))[None, :, :, None].repeat(1, 1, 1, 2)               # Nyquist
    f_smooth, share_smooth = frequency_map(smooth, high_pass=0.25)
    f_check, share_check = frequency_map(checker, high_pass=0.25)
    assert share_smooth.item() < 1e-10 and f_smooth.abs().max() < 1e-5
    assert abs(share_check.item() - 1) < 1e-6 and torch.allclose(f_check, magnitude_map(checker), atol=1e-5)


def test_foreground_scores_on_a_hand_example():
    from llamavit.eval.activations import foreground_from_images, foreground_scores, patch_foreground
    pixels = torch.zeros(1, 8, 8, dtype=torch.bool)
    pixels[0, :4, :4] = True                   # the object: the top-left quarter of the image
    pixels[0, 4, 4] = True                     # one stray pixel: 1/4 of its 2 x 2 patch, background
    fg = patch_foreground(pixels, (4, 4))
    assert fg[0].sum() == 4 and fg[0, :2, :2].all()
    on_object = torch.zeros(1, 4, 4)
    on_object[0, :2, :2] = 2.0
    on_object[0, 2:, 2:] = 1.0
    perfect = foreground_scores(on_object + 0.5, fg)
    assert perfect["foreground_ap"] == pytest.approx(1.0)
    assert perfect["foreground_ratio"] == pytest.approx(2.5 / ((4 * 1.5 + 8 * 0.5) / 12))
    flat = foreground_scores(torch.ones(1, 4, 4), fg)
    assert flat["foreground_ap"] == pytest.approx(4 / 16) and flat["foreground_ratio"] == pytest.approx(1.0)
    untied = torch.arange(16.0).view(1, 4, 4) * 0.01
    inverted = foreground_scores(3.0 - on_object + untied, fg)   # the background first: AP below the base rate
    assert inverted["foreground_ap"] < 0.25 and inverted["foreground_ratio"] < 1
    # the mask from normalised images: the normalisation is undone before the threshold
    raw = torch.zeros(1, 1, 8, 8)
    raw[0, 0, 2, 3] = 0.5
    normalised = (raw - 0.286) / 0.353
    mask = foreground_from_images(normalised, (0.286, 0.286, 0.286), (0.353, 0.353, 0.353), threshold=0.1)
    assert mask.shape == (1, 8, 8) and mask.sum() == 1 and mask[0, 2, 3]


def test_analyze_activations_report(tmp_path):
    import json

    from llamavit.eval.activations import analyze_activations, save_activation_report
    model = llamavit.create_model(NAME, llm_path="random", llm_dim=32, llm_num_heads=4, llm_ffn_hidden=64, **SMALL)
    x = torch.randn(2, 3, 32, 32)
    result = analyze_activations(model, x)
    assert result["blocks"] == ["block0", "block1", "llm_layer0", "llm_out"]
    for maps in result["maps"].values():
        assert maps["magnitude"].shape == maps["frequency"].shape == (2, 4, 4)
        assert (maps["magnitude"] >= 0).all() and (0 <= maps["high_freq_energy"]).all()
    paths = save_activation_report(result, x, str(tmp_path), labels=["a", "b"])
    assert [os.path.basename(p) for p in paths] == ["image000_activations.png", "image001_activations.png",
                                                    "activations.json"]
    with open(paths[0], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    summary = json.load(open(paths[-1]))
    assert set(summary["per_block"]) == set(result["blocks"])
    assert summary["maps"]["llm_out"]["magnitude"][1][3][2] == pytest.approx(
        result["maps"]["llm_out"]["magnitude"][1, 3, 2].item(), abs=1e-4)


def test_cli_analyze_activations(tmp_path, capsys):
    import json

    from llamavit.cli import main
    from llamavit.train import TrainConfig, train
    kwargs = dict(SMALL, llm_path="random", llm_dim=32, llm_num_heads=4, llm_ffn_hidden=64)
    kwargs.pop("img_size"), kwargs.pop("num_classes")
    train(TrainConfig(model=NAME, model_kwargs=kwargs, img_size=32, in_chans=3, data="synthetic", epochs=1,
                      batch_size=16, train_subset=32, val_subset=16, progress=False, output=str(tmp_path / "run"),
                      crop_pct=1.0))
    out = tmp_path / "maps"
    assert main(["analyze", "activations", "--checkpoint", str(tmp_path / "run"), "--num-images", "3",
                 "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3 images, 4 blocks" in printed and "magnitude AP" not in printed   # synthetic data: no foreground
    assert sorted(os.listdir(out)) == ["activations.json", "image000_activations.png", "image001_activations.png",
                                       "image002_activations.png"]
    # the synthetic squares are bright on darker noise: a threshold gives each map its foreground scores
    assert main(["analyze", "activations", "--checkpoint", str(tmp_path / "run"), "--num-images", "3",
                 "--foreground-threshold", "0.9", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "magnitude AP" in printed and "llm_out" in printed and "the AP of a random map" in printed
    summary = json.load(open(out / "activations.json"))
    scores = summary["foreground"]["llm_out"]["magnitude"]
    assert 0 <= scores["foreground_ap"] <= 1 and scores["images_scored"] == 3
