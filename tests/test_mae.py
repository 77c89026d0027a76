"""MAE pre-training of the plain VisionLLaMA: masking counts, kept tokens rotated by their true grid
positions (also under AS2DRoPE), the masked-patch loss, and `pretrain mae` -> `finetune` end to end."""
import pytest
import torch

import llamavit
from llamavit.cli import main
from llamavit.objectives import MAEDecoderConfig, MAEObjective, patchify, random_masking

TRUNK = dict(embed_dim=32, depth=2, num_heads=2, img_size=16, patch_size=4, in_chans=1, num_classes=0,
             mlp_multiple_of=8, init_values=None)


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster


def objective(ratio=0.75, **kwargs):
    trunk = llamavit.create_model("visionllama_small_patch16_224", **{**TRUNK, **kwargs}).eval()
    return MAEObjective(trunk, MAEDecoderConfig(dim=32, depth=1, mask_ratio=ratio), in_chans=1).eval()


@pytest.mark.parametrize("n,ratio,kept", [(16, 0.75, 4), (196, 0.75, 49), (49, 0.75, 12), (10, 0.5, 5)])
def test_masking_keeps_exactly_the_right_patches(n, ratio, kept):
    ids_keep, mask = random_masking(3, n, ratio)
    assert ids_keep.shape == (3, kept) and (mask.sum(1) == n - kept).all()
    for b in range(3):   # the kept ids are distinct and exactly the unmasked patches
        assert sorted(ids_keep[b].tolist()) == torch.nonzero(mask[b] == 0).flatten().tolist()


def test_kept_tokens_take_the_full_grid_rope_rows():
    trunk = objective().trunk
    tables = trunk.rope_tables((16, 16))   # class row first
    keep = torch.tensor([[4, 0, 15], [1, 8, 2]])
    tokens, args, _ = trunk.embed(torch.randn(2, 1, 16, 16), keep=keep)
    cos, sin = args["rope"]
    assert tokens.shape == (2, 4, 32) and cos.shape == (2, 1, 4, 8)
    rows = torch.tensor([[0, 5, 1, 16], [0, 2, 9, 3]])   # the class token, then patch p at row p + 1
    for b in range(2):
        assert torch.equal(cos[b, 0], tables[0][rows[b]]) and torch.equal(sin[b, 0], tables[1][rows[b]])


@pytest.mark.parametrize("kwargs", [{}, {"rope_auto_scale": True, "rope_ref_img_size": 32},
                                    {"class_token": False, "global_pool": "avg"}])
def test_encoder_on_shuffled_tokens_equals_the_trunk(kwargs):
    # with nothing masked the encoder sees every patch in a random order: if each token is rotated by its
    # true position, the outputs are the trunk's own tokens in that order
    obj = objective(ratio=0.0, **kwargs)
    images = torch.randn(2, 1, 16, 16)
    ids_keep, mask = random_masking(2, 16, 0.0)
    assert mask.sum() == 0 and not torch.equal(ids_keep[0], torch.arange(16))
    with torch.no_grad():
        ours = obj.trunk.forward_features(images, keep=ids_keep)
        ref = obj.trunk.forward_features(images)
        if obj.trunk.num_prefix_tokens == 0:
            ref = obj.trunk.norm(ref)
    p = obj.trunk.num_prefix_tokens
    expected = torch.cat((ref[:, :p], torch.gather(ref[:, p:], 1, ids_keep[..., None].expand(-1, -1, 32))), 1)
    assert (ours - expected).abs().max().item() < 1e-5


def test_loss_counts_only_masked_patches():
    obj = objective()
    images = torch.randn(2, 1, 16, 16)
    torch.manual_seed(3)
    loss, preds, mask = obj(images)
    assert preds.shape == (2, 16, 16) and mask.sum().item() == 2 * 12
    target = patchify(images, 4)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = ((preds - target) ** 2).mean(-1)
    assert torch.allclose(loss, per_patch[mask.bool()].mean())


def test_pretrain_mae_then_finetune(tmp_path, capsys):
    flags = ["--model", "visionllama_small_patch16_224", "--model-kwargs", "patch_size=4", "embed_dim=32", "depth=2",
             "num_heads=2", "mlp_multiple_of=8", "--data", "synthetic", "--img-size", "16", "--in-chans", "1",
             "--batch-size", "16", "--no-progress"]
    run = tmp_path / "mae"
    assert main(["pretrain", "mae", *flags, "--decoder-dim", "32", "--decoder-depth", "1", "--epochs", "2",
                 "--output", str(run)]) == 0
    assert (run / "reconstructions.png").is_file()
    assert llamavit.train.read_meta(str(run))["objective"] == "mae"
    assert main(["finetune", "--checkpoint-path", str(run), "--data", "synthetic", "--epochs", "1",
                 "--batch-size", "16", "--no-progress", "--output", str(tmp_path / "ft")]) == 0
    capsys.readouterr()
