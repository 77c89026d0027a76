"""Orders in which an autoregressive objective visits the patches of a (gh, gw) grid (the AIM paper's
Table 3 and apple/ml-l3m's `ar_patterns`).

An order is a LongTensor `order` of the N = gh * gw raster indices: order[k] is the k-th patch visited.
The patches keep their own positions; only who-sees-whom (the prefix-causal mask) and who-predicts-whom
(patch order[k] predicts patch order[k + 1]) follow the order.

- raster: row by row, left to right (AIM's default);
- reverse_raster: the raster order backwards (starts at the bottom-right patch);
- column: column by column, top to bottom (ml-l3m calls it `horizontal_raster`); reverse_column: backwards;
- spiral: ml-l3m's spiral: walk the grid from the top-left patch down the first column, turning
  (down -> right -> up -> left) at the border or at a visited patch, until the centre; then visit that walk
  backwards, so the order starts at the centre and ends at the top-left patch;
- checkerboard: the patches with (row + col) even in raster order, then the odd ones;
- random: one fixed permutation drawn from `seed` (ml-l3m ships fixed tables for 196 and 256 patches; ours is
  drawn per grid, so it is not theirs).
"""
from functools import lru_cache
from typing import Tuple

import torch

ORDERS = ("raster", "reverse_raster", "column", "reverse_column", "spiral", "checkerboard", "random")


def _spiral(gh: int, gw: int) -> torch.Tensor:
    steps = ((1, 0), (0, 1), (-1, 0), (0, -1))     # (row, col) moves: down, right, up, left
    seen = torch.zeros(gh, gw, dtype=torch.bool)
    row = col = heading = 0
    walk = []
    for _ in range(gh * gw):
        walk.append(row * gw + col)
        seen[row, col] = True
        for turn in range(4):
            dr, dc = steps[(heading + turn) % 4]
            r, c = row + dr, col + dc
            if 0 <= r < gh and 0 <= c < gw and not seen[r, c]:
                heading, row, col = (heading + turn) % 4, r, c
                break
    return torch.tensor(walk[::-1])


@lru_cache(maxsize=64)
def _order(name: str, grid: Tuple[int, int], seed: int) -> torch.Tensor:
    gh, gw = grid
    raster = torch.arange(gh * gw)
    if name == "raster":
        return raster
    if name == "reverse_raster":
        return raster.flip(0)
    if name == "column":
        return raster.reshape(gh, gw).T.flatten()
    if name == "reverse_column":
        return raster.reshape(gh, gw).T.flatten().flip(0)
    if name == "spiral":
        return _spiral(gh, gw)
    if name == "checkerboard":
        rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        even = ((rows + cols) % 2 == 0).flatten()
        return torch.cat([raster[even], raster[~even]])
    if name == "random":
        return torch.randperm(gh * gw, generator=torch.Generator().manual_seed(seed))
    raise ValueError(f"unknown patch order {name!r}; expected one of {ORDERS}")


def patch_order(name: str, grid: Tuple[int, int], seed: int = 0) -> torch.Tensor:
    """(N,) raster indices in visiting order for a (gh, gw) grid; `seed` only matters for 'random'."""
    return _order(name, (int(grid[0]), int(grid[1])), int(seed)).clone()


def visit_rank(order: torch.Tensor) -> torch.Tensor:
    """The inverse permutation: rank[i] = when raster patch i is visited (N,)."""
    return torch.argsort(order)
