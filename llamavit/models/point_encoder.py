"""Point-cloud encoder: PointBERT / Point-MAE grouping and mini-PointNet as the tokenizer of TokenEncoder, so the
frozen LLM block (Pang et al.'s point-cloud claim) is measured with the same blocks, path and head as elsewhere.

    points (B, N, C: x y z [features]) -> farthest point sampling: G centres -> k-NN: G groups of K points,
    xyz relative to the centre -> mini-PointNet -> tokens (B, G, D); positions = MLP(centre xyz) (B, G, D)
    -> TokenEncoder (class token, DeiT blocks, optional frozen LLM path, norm, 'token_max' pooling, head)
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn

from .token_encoder import TokenEncoder, TokenEncoderConfig


def farthest_point_sample(xyz: torch.Tensor, num_groups: int) -> torch.Tensor:
    """xyz (B, N, 3) -> indices (B, G=num_groups): point 0 first, then each time the point farthest from those
    already chosen (PointBERT's deterministic start). One step per centre, batched over clouds and points."""
    batch, n, _ = xyz.shape
    if not 0 < num_groups <= n:
        raise ValueError(f"farthest_point_sample: num_groups must be in [1, {n}] (the number of points), "
                         f"got {num_groups}")
    xyz = xyz.detach().float()
    rows = torch.arange(batch, device=xyz.device)
    chosen = torch.zeros(batch, num_groups, dtype=torch.long, device=xyz.device)
    nearest = torch.full((batch, n), float("inf"), device=xyz.device)   # squared distance to the chosen set
    latest = torch.zeros(batch, dtype=torch.long, device=xyz.device)
    for i in range(num_groups):
        chosen[:, i] = latest
        nearest = torch.minimum(nearest, (xyz - xyz[rows, latest][:, None]).square().sum(-1))
        latest = nearest.argmax(dim=1)
    return chosen


def knn_group(xyz: torch.Tensor, centers: torch.Tensor, group_size: int) -> torch.Tensor:
    """xyz (B, N, 3), centers (B, G, 3) -> indices (B, G, K=group_size) of each centre's K nearest points,
    nearest first (a centre taken from xyz is its own first neighbour)."""
    if not 0 < group_size <= xyz.shape[1]:
        raise ValueError(f"knn_group: group_size must be in [1, {xyz.shape[1]}] (the number of points), "
                         f"got {group_size}")
    distances = torch.cdist(centers.detach().float(), xyz.detach().float())   # (B, G, N)
    return distances.topk(group_size, dim=-1, largest=False, sorted=True).indices


class PointwiseMLP(nn.Module):
    """The same MLP on every point: Linear -> BatchNorm (over all points) -> ReLU -> Linear. (M, K, C) -> (M, K, out).
    PointNet's 1x1 convolutions as matmuls: the same function, several times faster on a CPU than Conv1d over
    short groups."""

    def __init__(self, in_features: int, hidden: int, out_features: int):
        super().__init__()
        self.fc1, self.norm = nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden)
        self.act, self.fc2 = nn.ReLU(inplace=True), nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = self.norm(h.reshape(-1, h.shape[-1])).reshape(h.shape)
        return self.fc2(self.act(h))


class PointTokenizer(nn.Module):
    """Points (B, N, in_chans) -> tokens (B, G, D), positions (B, G, D).

    Groups: FPS centres and their k nearest points; a point's xyz is taken relative to its centre, its features
    (columns past xyz) as they are. Each group goes through a mini-PointNet of width w (PointBERT's: 128): a shared
    MLP (1x1 convs in_chans -> w -> 2w), max over the group, that maximum concatenated back to every point,
    4w -> 4w -> D, max again. Positions: MLP(3 -> 128 -> D, GELU) of the centres. Permuting the points keeps
    the tokens as long as point 0 stays first (it is FPS's start).
    """

    def __init__(self, in_chans: int = 3, num_groups: int = 64, group_size: int = 32, embed_dim: int = 384,
                 width: int = 128):
        super().__init__()
        if in_chans < 3:
            raise ValueError(f"in_chans must be >= 3 (x y z [features...]), got {in_chans}")
        if num_groups < 1 or group_size < 1:
            raise ValueError(f"num_groups and group_size must be >= 1, got {num_groups} and {group_size}")
        self.in_chans, self.num_groups, self.group_size = in_chans, num_groups, group_size
        self.first_mlp = PointwiseMLP(in_chans, width, 2 * width)
        self.second_mlp = PointwiseMLP(4 * width, 4 * width, embed_dim)
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, embed_dim))

    def check_input(self, points: torch.Tensor) -> None:
        """Raise ValueError unless points is (B, N, in_chans) with N >= group_size and N >= num_groups."""
        if points.ndim != 3 or points.shape[-1] != self.in_chans:
            raise ValueError(f"PointTokenizer: points must be (B, N, {self.in_chans}) (x y z"
                             f"{' + features' * (self.in_chans > 3)}), got {tuple(points.shape)}")
        n = points.shape[1]
        if n < self.group_size or n < self.num_groups:
            raise ValueError(f"PointTokenizer: a cloud of {n} points is too small for {self.num_groups} groups of "
                             f"{self.group_size} nearest points; give at least {max(self.group_size, self.num_groups)} "
                             f"points or lower num_groups / group_size")

    def group(self, points: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, N, C) -> groups (B, G, K, C), xyz relative to their centre; centres (B, G, 3)."""
        rows = torch.arange(points.shape[0], device=points.device)
        xyz = points[..., :3]
        centers = xyz[rows[:, None], farthest_point_sample(xyz, self.num_groups)]
        groups = points[rows[:, None, None], knn_group(xyz, centers, self.group_size)]
        return torch.cat([groups[..., :3] - centers[:, :, None], groups[..., 3:]], dim=-1), centers

    def forward(self, points: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """points (B, N, in_chans) -> tokens (B, G, D), positions (B, G, D)."""
        self.check_input(points)
        groups, centers = self.group(points)
        batch, g, k, c = groups.shape
        x = self.first_mlp(groups.reshape(batch * g, k, c))                          # (B*G, K, 2w)
        x = torch.cat([x.amax(dim=1, keepdim=True).expand(-1, k, -1), x], dim=-1)   # (B*G, K, 4w)
        tokens = self.second_mlp(x).amax(dim=1).reshape(batch, g, -1)
        return tokens, self.pos_embed(centers)


@dataclass
class PointEncoderConfig(TokenEncoderConfig):
    """TokenEncoderConfig with the point tokenizer's options; PointBERT pools 'token_max'."""
    in_chans: int = 3           # x y z + (in_chans - 3) features (normals, intensity, ...)
    num_groups: int = 64
    group_size: int = 32
    pointnet_width: int = 128   # the mini-PointNet's first width (PointBERT's); the tiny models take 32
    global_pool: str = "token_max"


class PointEncoder(TokenEncoder):
    """TokenEncoder over PointTokenizer. forward: points (B, N, in_chans) -> (B, num_classes); forward_features
    -> (B, 1 + num_groups, D)."""

    def __init__(self, cfg: Optional[PointEncoderConfig] = None, **kwargs):
        cfg = cfg or PointEncoderConfig(**kwargs)
        super().__init__(PointTokenizer(cfg.in_chans, cfg.num_groups, cfg.group_size, cfg.embed_dim,
                                        cfg.pointnet_width), cfg)
