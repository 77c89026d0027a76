"""Class-conditional diffusion transformers: DiT and DiT-LLaMA (VisionLLaMA's block inside DiT).

Not classifiers: `forward(x, t, y) -> (B, out_chans, H, W)` with x (B, C, H, W) a noisy image or latent,
t (B,) the timestep (DDPM index 0..999, or flow time in [0, 1] for the SiT objective: the sinusoidal
embedding takes fractional values) and y (B,) class labels; `num_classes` is the null label of
classifier-free guidance. out_chans = 2C with `learn_sigma` (noise prediction, then the
variance-interpolation values of improved DDPM), else C.

    patch embed (Conv2d) -> [+ fixed 2D sin-cos positions (DiT only)] -> blocks(x, c) -> final adaLN
    layer -> unpatchify,   c = timestep embedding + label embedding

Block (adaLN-Zero): a SiLU + Linear of c gives shift/scale/gate for both branches;
`x + gate1 * attn(LN(x) * (1 + scale1) + shift1)`, the same for the MLP; the LayerNorms have no affine
weights and the modulation Linear starts at zero, so every block is the identity at initialisation.
- block='dit': attention with qkv bias, tanh-GELU MLP (hidden 4D), positions only from the sin-cos table.
- block='llama' (DiT-LLaMA / SiT-LLaMA): the same attention with 2D RoPE on q and k over the token grid
  (raw indices as the official code; `rope_auto_scale` multiplies positions by rope_ref_img_size / H,
  AS2DRoPE, an option the official DiT-LLaMA does not use) and a bias-free SwiGLU (hidden
  256 * ceil(int(8D/3) / 256)); no absolute positions.

Matches Meituan-AutoML/VisionLLaMA dit/models.py (DiT, DiTLLaMA) and sit/models.py (the same
network; SiT drops the variance half of the output). Differences: our parameters exclude the frozen
sin-cos `pos_embed` Parameter of the official models (DiT computes the table at run time for any grid;
DiT-LLaMA never used it), so official counts = ours + grid tokens * D; guidance is applied to all C
predicted channels, where the official `forward_with_cfg` guides only the first 3 (a reproducibility
quirk it documents); the official attention takes the row width as sqrt(N), so only square grids,
ours takes any grid.
"""
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import Mlp

from ..layers import Attention, PatchEmbed, Rope2D, SwiGLU, run_blocks, swiglu_hidden_dim
from ..layers.pos_embed import sincos_2d

BLOCK_TYPES = ("dit", "llama")


@dataclass
class DiTConfig:
    """DiT / DiT-LLaMA hyper-parameters; the official sizes are registered by name."""
    img_size: int = 32                 # grid side in input pixels (ImageNet 256 -> 32x32 VAE latents)
    patch_size: int = 2
    in_chans: int = 4
    num_classes: int = 1000
    embed_dim: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    block: str = "llama"               # 'llama' (2D RoPE + SwiGLU) | 'dit' (sin-cos positions + GELU MLP)
    class_dropout_prob: float = 0.1    # label dropout for classifier-free guidance; > 0 adds the null class
    learn_sigma: bool = True
    frequency_embedding_size: int = 256
    mlp_multiple_of: int = 256
    rope_theta: float = 10000.0
    rope_auto_scale: bool = False      # AS2DRoPE: positions * rope_ref_img_size / input height
    rope_ref_img_size: Optional[int] = None   # None = img_size


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, N, D); shift, scale (B, 1, D)."""
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """(B,) timesteps (any float) -> (B, D): [cos, sin] of t * 10000^(-i/half), then Linear-SiLU-Linear."""

    def __init__(self, dim: int, frequency_embedding_size: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, dim), nn.SiLU(), nn.Linear(dim, dim))

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat((args.cos(), args.sin()), dim=-1)
        if self.frequency_embedding_size % 2:
            emb = torch.cat((emb, torch.zeros_like(emb[:, :1])), dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoid(t).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """(B,) labels -> (B, D). In training each label becomes the null class (index num_classes) with
    probability `dropout_prob`; `force_drop` (B,) bool drops chosen labels in any mode."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)

    @property
    def has_null_class(self) -> bool:
        return self.embedding_table.num_embeddings > self.num_classes

    def forward(self, labels: torch.Tensor, force_drop: Optional[torch.Tensor] = None) -> torch.Tensor:
        drop = force_drop
        if drop is None and self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        if drop is not None:
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class AdaLNBlock(nn.Module):
    """adaLN-Zero transformer block. x (B, N, D), c (B, D), rope tables or None -> (B, N, D).

    DiT's own block (the condition modulates both branches), around the same Attention and MLP as
    layers/block.py's `Block`."""

    def __init__(self, dim: int, num_heads: int, mlp: nn.Module):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=True, proj_bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = mlp
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor,
                rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1), rope)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """Modulated LayerNorm + Linear: (B, N, D), c (B, D) -> (B, N, p * p * out_chans)."""

    def __init__(self, dim: int, patch_size: int, out_chans: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_chans)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def dit_checkpoint_keys(key: str) -> str:
    """One official DiT / DiT-LLaMA key -> ours (SwiGLU names as timm's)."""
    key = key.removeprefix("module.")
    return (key.replace("mlp.c_fc1.", "mlp.fc1_g.").replace("mlp.c_fc2.", "mlp.fc1_x.")
            .replace("mlp.c_proj.", "mlp.fc2."))


class DiT(nn.Module):
    """DiT / DiT-LLaMA. forward(x (B, C, H, W), t (B,), y (B,)) -> (B, 2C or C, H, W); H, W multiples of the patch."""

    # official training checkpoints hold {'model', 'ema', 'opt', 'args'}; the official sampler uses 'ema'
    checkpoint_state_keys = ("ema", "model", "state_dict")

    def __init__(self, cfg: Optional[DiTConfig] = None, **kwargs):
        super().__init__()
        cfg = cfg or DiTConfig(**kwargs)
        if cfg.block not in BLOCK_TYPES:
            raise ValueError(f"block must be one of {BLOCK_TYPES}, got {cfg.block!r}")
        self.cfg = cfg
        self.in_chans = cfg.in_chans
        self.out_chans = cfg.in_chans * 2 if cfg.learn_sigma else cfg.in_chans
        self.num_classes = cfg.num_classes
        self.num_features = self.embed_dim = cfg.embed_dim
        self.patch_size = cfg.patch_size
        self.grad_checkpointing = False

        self.x_embedder = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        self.t_embedder = TimestepEmbedder(cfg.embed_dim, cfg.frequency_embedding_size)
        self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.embed_dim, cfg.class_dropout_prob)
        self.rope = Rope2D(cfg.embed_dim // cfg.num_heads, cfg.rope_theta) if cfg.block == "llama" else None
        self.blocks = nn.ModuleList([AdaLNBlock(cfg.embed_dim, cfg.num_heads, self._mlp(cfg))
                                     for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(cfg.embed_dim, cfg.patch_size, self.out_chans)
        self._pos_cache: dict = {}
        self.initialize_weights()

    @staticmethod
    def _mlp(cfg: DiTConfig) -> nn.Module:
        if cfg.block == "llama":
            hidden = swiglu_hidden_dim(cfg.embed_dim, cfg.mlp_ratio, cfg.mlp_multiple_of)
            return SwiGLU(cfg.embed_dim, hidden, bias=False)
        return Mlp(cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))

    def initialize_weights(self) -> None:
        """The official initialisation: Xavier-uniform Linears, zero biases, N(0, 0.02) label table and
        timestep MLP, and zeros for every adaLN modulation and the output Linear (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [blk.adaLN_modulation[-1] for blk in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                            self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def checkpoint_filter(self, state_dict: dict) -> dict:
        """Official DiT / DiT-LLaMA / SiT(-LLaMA) state dict -> ours. The frozen sin-cos `pos_embed` is
        dropped: DiT recomputes it (the same table) and DiT-LLaMA never reads it."""
        return {dit_checkpoint_keys(k): v for k, v in state_dict.items() if k != "pos_embed"}

    # --- timm-style helpers --------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return set()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @property
    def null_class(self) -> Optional[int]:
        """The label that means 'no class' (classifier-free guidance), or None without label dropout."""
        return self.num_classes if self.y_embedder.has_null_class else None

    def example_inputs(self, batch: int = 1, device=None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, t, y) of the construction size, for FLOP counting and smoke tests."""
        h, w = self.x_embedder.img_size
        return (torch.zeros(batch, self.in_chans, h, w, device=device), torch.zeros(batch, device=device),
                torch.zeros(batch, dtype=torch.long, device=device))

    # --- forward -------------------------------------------------------------------------------
    def positions(self, grid: Tuple[int, int], device) -> Tuple[Optional[torch.Tensor], Optional[tuple]]:
        """(sin-cos table (N, D) or None, RoPE (cos, sin) or None) for a token grid (rows, cols)."""
        gh, gw = grid
        if self.rope is not None:
            ref = self.cfg.rope_ref_img_size or self.x_embedder.img_size[0]
            scale = ref / (gh * self.patch_size) if self.cfg.rope_auto_scale else 1.0
            return None, self.rope(gh * gw, gw, scale)
        key = (gh, gw, device)
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_2d(self.embed_dim, gh, gw, device=device)
        return self._pos_cache[key], None

    def unpatchify(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """(B, N, p * p * C) with (p, q, c) order per token -> (B, C, H, W)."""
        p, (gh, gw) = self.patch_size, grid
        x = x.reshape(x.shape[0], gh, gw, p, p, self.out_chans)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], self.out_chans, gh * p, gw * p)

    def condition(self, t: torch.Tensor, y: torch.Tensor, force_drop: Optional[torch.Tensor] = None) -> torch.Tensor:
        """c (B, D) = timestep embedding + label embedding."""
        return self.t_embedder(t) + self.y_embedder(y, force_drop)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                force_drop: Optional[torch.Tensor] = None) -> torch.Tensor:
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        pos, rope = self.positions(grid, x.device)
        x = self.x_embedder(x)
        if pos is not None:
            x = x + pos.to(x.dtype)
        c = self.condition(t, y, force_drop)
        x = run_blocks(self.blocks, x, self.grad_checkpointing and self.training, c=c, rope=rope)
        return self.unpatchify(self.final_layer(x, c), grid)
