"""DiT / DiT-LLaMA and the generative objectives: official parameter counts and outputs, adaLN-Zero,
DiT's hybrid loss against a hand computation, samplers (shapes, seeds, guidance), classifier-FID, and
`llamavit generate` end to end (exact resume, latents files)."""
import json
import math
from pathlib import Path

import pytest
import torch

import llamavit
from llamavit.cli import main
from llamavit.diffusion import GaussianDiffusion, LinearFlow, guided_model, linear_betas, space_timesteps
from llamavit.diffusion.sampling import generate_samples
from llamavit.eval.fid import evaluate_samples, frechet_distance
from llamavit.layers import grid_positions, rope_2d_angles

FIXTURE = Path(__file__).parent / "fixtures" / "dit_official_tiny.pt"
TINY = dict(embed_dim=32, depth=2, num_heads=2, patch_size=4, img_size=16, in_chans=1, num_classes=4,
            mlp_multiple_of=8)


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster


def tiny(name="dit_llama_s_2", **kwargs):
    return llamavit.create_model(name, **{**TINY, **kwargs})


def perturbed(model, scale=0.05):
    """adaLN-Zero starts with zero outputs: give every weight some value so the tests see the network."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


# --- models ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,official", [
    ("dit_llama_b_4", 130_429_568), ("dit_llama_l_4", 464_222_336), ("dit_llama_xl_2", 674_968_352),
    ("dit_b_4", 130_475_648), ("dit_xl_2", 675_129_632)])
def test_parameter_counts_match_the_official_models(name, official):
    # the official models also count a frozen sin-cos pos_embed Parameter (grid tokens x D), which DiT
    # recomputes and DiT-LLaMA never uses: ours leave it out
    with torch.device("meta"):
        model = llamavit.create_model(name)
    ours = sum(p.numel() for p in model.parameters())
    assert ours + model.x_embedder.num_patches * model.embed_dim == official


@pytest.mark.parametrize("block,name", [("dit", "dit_s_2"), ("llama", "dit_llama_s_2")])
def test_official_outputs_and_checkpoint_formats(block, name, tmp_path):
    fx = torch.load(FIXTURE, weights_only=True)
    sd = fx[block]["state_dict"]
    junk = {k: torch.zeros_like(v) for k, v in sd.items()}
    for wrap, obj in (("plain", sd), ("train", {"model": junk, "ema": sd, "opt": {}, "args": None})):
        path = tmp_path / f"{wrap}.pt"
        torch.save(obj, path)   # the official training checkpoint: its sampler uses 'ema'
        model = llamavit.create_model(name, checkpoint_path=str(path), **fx["kwargs"]).eval()
        out = model(fx["x"], fx["t"], fx["y"])
        assert out.shape == (3, 8, 8, 8)
        assert (out - fx[block]["out"]).abs().max().item() < 1e-5


def test_adaln_zero_block_is_identity_and_output_zero_at_init():
    model = tiny()
    x, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    for blk in model.blocks:
        assert torch.equal(blk(x, c, model.positions((4, 4), x.device)[1]), x)
    out = model(torch.randn(2, 1, 16, 16), torch.tensor([3, 900]), torch.tensor([0, 4]))
    assert out.shape == (2, 2, 16, 16) and torch.equal(out, torch.zeros_like(out))


def test_blocks_attention_positions_and_mlp():
    llama, dit = tiny(), tiny("dit_s_2")
    assert llama.blocks[0].mlp.fc1_g.bias is None and type(dit.blocks[0].mlp).__name__ == "Mlp"
    pos, rope = dit.positions((4, 4), "cpu")
    assert rope is None and pos.shape == (16, 32)
    _, (cos, _) = llama.positions((4, 4), "cpu")
    x, y = grid_positions(16, 4)
    assert torch.allclose(cos, rope_2d_angles(x, y, 16).cos())
    # AS2DRoPE: at twice the construction size positions are halved (anchor = img_size)
    scaled = tiny(rope_auto_scale=True)
    _, (cos2, _) = scaled.positions((8, 8), "cpu")
    x, y = grid_positions(64, 8)
    assert torch.allclose(cos2, rope_2d_angles(x * 0.5, y * 0.5, 16).cos())
    out = perturbed(scaled).eval()(torch.randn(1, 1, 32, 24), torch.tensor([5]), torch.tensor([1]))
    assert out.shape == (1, 2, 32, 24)


def test_label_dropout_uses_the_null_class():
    model = tiny(class_dropout_prob=1.0)
    model.train()
    y = torch.tensor([0, 1, 2])
    assert torch.equal(model.y_embedder(y), model.y_embedder.embedding_table.weight[[4, 4, 4]])
    assert model.null_class == 4 and tiny(class_dropout_prob=0.0).null_class is None


# --- diffusion ---------------------------------------------------------------------------------------
def test_hybrid_loss_against_a_hand_computation():
    diffusion = GaussianDiffusion.create(1000)
    x0 = torch.rand(3, 1, 2, 2) * 2 - 1
    noise, t = torch.randn(3, 1, 2, 2), torch.tensor([0, 10, 600])
    out = torch.randn(3, 2, 2, 2) * 0.5
    seen = {}

    def model_fn(xt, tt):
        seen["xt"], seen["t"] = xt, tt
        return out

    terms = diffusion.training_losses(model_fn, x0, t, noise)
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    a_bar = torch.cumprod(1 - betas, 0)
    for i, step in enumerate(t.tolist()):
        ab, b = a_bar[step], betas[step]
        ab_prev = a_bar[step - 1] if step > 0 else torch.tensor(1.0, dtype=torch.float64)
        xt = ab.sqrt() * x0[i].double() + (1 - ab).sqrt() * noise[i].double()
        assert torch.allclose(seen["xt"][i].double(), xt, atol=1e-6)
        eps, v = out[i, :1].double(), out[i, 1:].double()
        assert math.isclose(terms["mse"][i].item(), ((noise[i].double() - eps) ** 2).mean().item(), rel_tol=1e-5)
        post_var = lambda s: betas[s] * (1 - a_bar[s - 1]) / (1 - a_bar[s])  # noqa: E731, s >= 1
        log_min = math.log(post_var(max(step, 1)))
        log_var = (v + 1) / 2 * math.log(b) + (1 - v) / 2 * log_min
        x0_hat = xt / ab.sqrt() - (1 / ab - 1).sqrt() * eps
        coef1, coef2 = b * ab_prev.sqrt() / (1 - ab), (1 - ab_prev) * (1 - b).sqrt() / (1 - ab)
        mean = coef1 * x0_hat + coef2 * xt
        if step > 0:
            true_mean = coef1 * x0[i].double() + coef2 * xt
            kl = 0.5 * (-1 + log_var - log_min + math.exp(log_min) / log_var.exp()
                        + (true_mean - mean) ** 2 / log_var.exp())
            expected = kl.mean().item() / math.log(2)
        else:   # decoder NLL of the 8-bit bin around x0 (exact normal CDF; the code uses DDPM's tanh approximation)
            std = (0.5 * log_var).exp()
            lo, hi = (x0[i].double() - mean - 1 / 255) / std, (x0[i].double() - mean + 1 / 255) / std
            cdf = torch.special.ndtr
            p = torch.where(x0[i] < -0.999, cdf(hi), torch.where(x0[i] > 0.999, 1 - cdf(lo), cdf(hi) - cdf(lo)))
            expected = -p.log().mean().item() / math.log(2)
        assert math.isclose(terms["vb"][i].item(), expected, rel_tol=2e-3), (step, terms["vb"][i].item(), expected)
    assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"])


def test_vb_term_trains_only_the_variance_channels():
    diffusion = GaussianDiffusion.create(1000)
    out = torch.randn(2, 2, 2, 2, requires_grad=True)
    terms = diffusion.training_losses(lambda xt, t: out, torch.rand(2, 1, 2, 2), torch.tensor([5, 50]),
                                      torch.randn(2, 1, 2, 2))
    terms["vb"].sum().backward()
    assert out.grad[:, :1].abs().max() == 0 and out.grad[:, 1:].abs().max() > 0


def test_schedule_and_respacing():
    betas = linear_betas(1000)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)
    assert space_timesteps(1000, 4) == [0, 333, 666, 999]
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    spaced = GaussianDiffusion.create(1000, respacing=10)
    full = GaussianDiffusion.create(1000)
    kept = spaced.timestep_map
    # the respaced process keeps the original cumulative alphas at the kept steps
    assert torch.allclose(spaced.t["alphas_cumprod"], full.t["alphas_cumprod"][kept])


def test_flow_loss_and_euler_step_by_hand():
    x1, noise, t = torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2), torch.tensor([0.25, 0.9])
    v = torch.randn(2, 2, 2, 2)
    terms = LinearFlow().training_losses(lambda xt, tt: v, x1, t, noise)
    assert torch.allclose(terms["loss"], ((v[:, :1] - (x1 - noise)) ** 2).mean(dim=(1, 2, 3)))
    # constant velocity field: Euler and Heun both land exactly at noise + v
    const = torch.randn(1, 1, 2, 2)
    for method in ("euler", "heun"):
        x = LinearFlow().sample(lambda x_, t_: const.expand(len(x_), -1, -1, -1), noise, 4, method)
        assert torch.allclose(x, noise + const, atol=1e-6)


def test_guidance_scale_one_is_the_conditional_model_and_scale_s_extrapolates():
    model = perturbed(tiny()).eval()
    x, t, y = torch.randn(3, 1, 16, 16), torch.tensor([1, 50, 700]), torch.tensor([0, 1, 3])
    with torch.no_grad():
        cond = model(x, t, y)
        assert torch.equal(guided_model(model, y, 1.0)(x, t), cond)
        uncond = model(x, t, torch.full_like(y, model.null_class))
        out = guided_model(model, y, 3.0)(x, t)
    assert torch.allclose(out[:, :1], uncond[:, :1] + 3.0 * (cond[:, :1] - uncond[:, :1]), atol=1e-5)
    assert torch.allclose(out[:, 1:], cond[:, 1:], atol=1e-6)
    with pytest.raises(ValueError, match="null class"):
        guided_model(tiny(class_dropout_prob=0.0), y, 2.0)


@pytest.mark.parametrize("objective,sampler", [("ddpm", "ddpm"), ("ddpm", "ddim"), ("flow", "euler"), ("flow", "heun")])
def test_samplers_shapes_and_seed_determinism(objective, sampler):
    model = perturbed(tiny(), 0.02)
    labels = torch.tensor([0, 1, 2, 3, 0])
    kw = dict(objective=objective, sampler=sampler, steps=4, cfg_scale=2.0, batch_size=3, clip_denoised=True)
    a = generate_samples(model, labels, seed=7, **kw)
    torch.manual_seed(123)   # the global RNG must not matter
    b = generate_samples(model, labels, seed=7, **kw)
    c = generate_samples(model, labels, seed=8, **kw)
    assert a.shape == (5, 1, 16, 16) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="samples with one of"):
        generate_samples(model, labels, objective=objective, sampler="heun" if objective == "ddpm" else "ddim")


# --- evaluation --------------------------------------------------------------------------------------
def test_frechet_distance_of_known_gaussians():
    d, m = 6, torch.arange(6.0)
    eye = torch.eye(d, dtype=torch.float64)
    # FD(N(0, I), N(m, 4I)) = |m|^2 + d (1 + 4 - 2 * 2)
    assert frechet_distance(torch.zeros(d), eye, m, 4 * eye) == pytest.approx(float((m ** 2).sum()) + d)
    a = torch.randn(d, d, dtype=torch.float64)
    cov = a @ a.T + eye
    assert frechet_distance(m, cov, m, cov) == pytest.approx(0.0, abs=1e-6)


def test_classifier_fid_and_conditional_accuracy():
    classifier = llamavit.create_model("visionllama_small_patch16_224", embed_dim=16, depth=1, num_heads=1,
                                       img_size=28, patch_size=7, in_chans=1, num_classes=4, mlp_multiple_of=8,
                                       class_token=False, global_pool="avg", init_values=None)
    real = torch.rand(40, 1, 28, 28)
    labels = torch.arange(4).repeat_interleave(5)
    same = evaluate_samples(real[:20], labels, real[:20], classifier, img_size=28, in_chans=1)
    assert same["fid"] == pytest.approx(0.0, abs=1e-4) and 0 <= same["accuracy"] <= 100
    far = evaluate_samples(torch.zeros(20, 1, 28, 28) + torch.rand(20, 1, 1, 1), labels, real, classifier, 28, 1)
    assert far["fid"] > 1e-3 and set(far["per_class_accuracy"]) == {0, 1, 2, 3}


# --- the command -------------------------------------------------------------------------------------
MODEL_FLAGS = ["--model", "dit_llama_s_2", "--model-kwargs", "embed_dim=32", "depth=2", "num_heads=2",
               "patch_size=4", "mlp_multiple_of=8", "--no-progress", "--batch-size", "8", "--log-every", "1"]


def _losses(run):
    return [r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())]


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_generate_train_resumes_exactly_and_samples(objective, tmp_path, capsys):
    common = MODEL_FLAGS + ["--data", "synthetic", "--img-size", "16", "--epochs", "3", "--objective", objective]
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["generate", "train", *common, "--output", str(full)]) == 0
    assert main(["generate", "train", *common, "--output", str(part), "--max-steps", "10"]) == 0
    assert main(["generate", "train", *common, "--output", str(part), "--resume"]) == 0
    assert _losses(full) == _losses(part) and len(_losses(full)) == 24
    a = llamavit.load_checkpoint(tiny(), str(full / "checkpoints" / "step-00000024" / "ema.safetensors"))
    b = llamavit.load_checkpoint(tiny(), str(part / "checkpoints" / "step-00000024" / "ema.safetensors"))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    grid = tmp_path / "grid.png"
    assert main(["generate", "sample", "--checkpoint", str(full), "--steps", "3", "--per-class", "2",
                 "--cfg-scale", "1.5", "--output", str(grid)]) == 0
    saved = torch.load(tmp_path / "grid.pt", weights_only=True)
    assert grid.is_file() and saved["samples"].shape == (8, 1, 16, 16)
    assert saved["labels"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    capsys.readouterr()


def test_generate_train_on_a_latents_file(tmp_path, capsys):
    latents = tmp_path / "latents.pt"
    torch.save({"latents": torch.randn(16, 4, 8, 8), "labels": torch.arange(16) % 3}, latents)
    run = tmp_path / "run"
    assert main(["generate", "train", *MODEL_FLAGS, "--data", str(latents), "--epochs", "1",
                 "--output", str(run)]) == 0
    model = llamavit.train.model_from_checkpoint(str(run))
    assert (model.in_chans, model.num_classes, model.out_chans) == (4, 3, 8)
    assert main(["generate", "sample", "--checkpoint", str(run), "--steps", "2", "--per-class", "1",
                 "--sampler", "ddim", "--output", str(tmp_path / "lat.png")]) == 0
    assert torch.load(tmp_path / "lat.pt", weights_only=True)["samples"].shape == (3, 4, 8, 8)
    bad = tmp_path / "bad.pt"
    torch.save({"x": torch.zeros(1)}, bad)
    assert main(["generate", "train", *MODEL_FLAGS, "--data", str(bad), "--output", str(run)]) == 2
    assert "'latents'" in capsys.readouterr().err


def test_nan_loss_stops_generative_training(tmp_path):
    from llamavit.train import NonFiniteLossError
    from llamavit.train.generate import GenerateConfig, GenerativeTrainer
    cfg = GenerateConfig(model="dit_llama_s_2", model_kwargs={k: v for k, v in TINY.items()
                                                              if k not in ("img_size", "in_chans", "num_classes")},
                         data="synthetic", img_size=16, epochs=1, batch_size=8, output=str(tmp_path / "run"),
                         progress=False)
    trainer = GenerativeTrainer(cfg)
    trainer.loss = lambda *batch: {"loss": torch.full((), float("inf"), requires_grad=True)}
    with pytest.raises(NonFiniteLossError, match=r"loss is inf at step 0; training stopped"):
        trainer.fit()
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
