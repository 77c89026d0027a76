"""Fixed 2D sine-cosine position embeddings (MAE / AIM), computed for any grid at run time."""
import torch


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim): [sin(pos * w_i) for i < dim/2, then cos(pos * w_i)], w_i = 10000^(-i/(dim/2))."""
    if dim % 2:
        raise ValueError(f"1D sin-cos embedding needs an even dim, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float32, device=positions.device) / (dim / 2.0))
    angles = positions.float().reshape(-1, 1) * omega[None]
    return torch.cat((angles.sin(), angles.cos()), dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int, device=None) -> torch.Tensor:
    """(grid_h * grid_w, dim) float32 table for patches in raster order (row-major).

    The first dim/2 channels encode the column index, the last dim/2 the row index (the channel order
    of the official AIM and MAE code). Works for non-square grids.
    """
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding needs dim divisible by 4, got {dim}")
    rows = torch.arange(grid_h, dtype=torch.float32, device=device).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, dtype=torch.float32, device=device).repeat(grid_h)
    return torch.cat((sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)), dim=1)
