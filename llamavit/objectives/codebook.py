"""A k-means codebook of image patches: the discrete-token target of AIM's Table 3 ablation.

The paper predicts dVAE tokens; no dVAE can be had offline, so the tokens here are the nearest of K
centroids learned by k-means (scikit-learn's MiniBatchKMeans) on patches of training images, in the pixel
space the trunk sees (after the dataset's normalisation). The objective then classifies the next patch's
code with cross-entropy.
"""
import json

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file


class PatchCodebook(nn.Module):
    """K centroids (K, D) of flattened patches (D = p * p * C), kept as a buffer (saved with the objective)."""

    def __init__(self, centroids: torch.Tensor):
        super().__init__()
        if centroids.ndim != 2:
            raise ValueError(f"centroids must be (K, D), got shape {tuple(centroids.shape)}")
        self.register_buffer("centroids", centroids.float().contiguous())

    @property
    def size(self) -> int:
        return self.centroids.shape[0]

    def encode(self, patches: torch.Tensor) -> torch.Tensor:
        """Patches (..., D) -> codes (...) int64: the index of the nearest centroid (squared distance, float32)."""
        flat = patches.reshape(-1, patches.shape[-1]).float()
        c = self.centroids.to(flat.device)
        dist = flat.square().sum(-1, keepdim=True) - 2 * flat @ c.T + c.square().sum(-1)[None]
        return dist.argmin(dim=-1).reshape(patches.shape[:-1])

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (...) -> the centroids' patches (..., D)."""
        return self.centroids.to(codes.device)[codes]


def fit_codebook(patches: torch.Tensor, size: int, seed: int = 0) -> PatchCodebook:
    """k-means with `size` centroids on patches (M, D) (scikit-learn MiniBatchKMeans, k-means++ init)."""
    from sklearn.cluster import MiniBatchKMeans

    if patches.ndim != 2 or patches.shape[0] < size:
        raise ValueError(f"a codebook of {size} codes needs at least {size} patches (M, D); got shape "
                         f"{tuple(patches.shape)}")
    kmeans = MiniBatchKMeans(n_clusters=size, random_state=seed, batch_size=4096, n_init=3, max_iter=100)
    kmeans.fit(patches.double().numpy())
    return PatchCodebook(torch.from_numpy(kmeans.cluster_centers_).float())


def save_codebook(codebook: PatchCodebook, path: str, **meta) -> None:
    """Write the centroids as safetensors (with `meta` as JSON metadata)."""
    save_file({"centroids": codebook.centroids.cpu()}, path, metadata={"meta": json.dumps(meta)})


def load_codebook(path: str) -> PatchCodebook:
    """Read a codebook written by save_codebook."""
    return PatchCodebook(load_file(path)["centroids"])
