"""Sample quality of class-conditional generators, measured with a llamavit CLASSIFIER, not Inception.

- FID here is the Fréchet distance between Gaussians fitted to the pooled pre-logit features
  (`forward_head(forward_features(x), pre_logits=True)`) of a classifier trained by llamavit (e.g. on
  Fashion-MNIST) for generated images and for real test images:
      ||mu_g - mu_r||^2 + tr(S_g) + tr(S_r) - 2 tr((S_g^1/2 S_r S_g^1/2)^1/2)
  computed in float64 from symmetric eigendecompositions (no scipy). The numbers are comparable only
  between runs that use the same classifier checkpoint and sample count; they are NOT Inception-FID
  and cannot be compared with published FIDs.
- Conditional accuracy: the classifier's top-1 agreement with the label each sample was generated for.

Real and generated images go through the same tensor preprocessing: [0, 1] pixels at the native size,
resized to the classifier's input size, channels repeated to its in_chans, normalised with its mean/std.
"""
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms as T

from ..data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, build_dataset
from ..train.checkpoint import model_from_checkpoint, read_meta


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2); means (D,), covariances (D, D)."""
    mu1, mu2, sigma1, sigma2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    root1 = _sqrtm_psd(sigma1)
    cross = torch.linalg.eigvalsh(root1 @ sigma2 @ root1).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + sigma1.trace() + sigma2.trace() - 2 * cross)


def feature_stats(features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(N, D) -> mean (D,) and unbiased covariance (D, D), float64."""
    f = features.double()
    return f.mean(0), torch.cov(f.T)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size) from the centre (removes the padding added for training)."""
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[..., top:top + size, left:left + size]


def classifier_inputs(x01: torch.Tensor, img_size: int, in_chans: int, mean: Optional[Sequence[float]] = None,
                      std: Optional[Sequence[float]] = None) -> torch.Tensor:
    """[0, 1] images (B, C, H, W) -> the classifier's normalised (B, in_chans, img_size, img_size) input."""
    mean = list(mean if mean is not None else FASHION_MNIST_MEAN)
    std = list(std if std is not None else FASHION_MNIST_STD)
    x = x01.float()
    if x.shape[-1] != img_size or x.shape[-2] != img_size:
        x = F.interpolate(x, size=(img_size, img_size), mode="bicubic", align_corners=False, antialias=True)
    if x.shape[1] != in_chans:
        x = x.mean(1, keepdim=True).expand(-1, in_chans, -1, -1) if in_chans != 1 else x.mean(1, keepdim=True)
    mean_t = torch.tensor(mean * (in_chans // len(mean)) if len(mean) < in_chans else mean[:in_chans])
    std_t = torch.tensor(std * (in_chans // len(std)) if len(std) < in_chans else std[:in_chans])
    return (x - mean_t.view(1, -1, 1, 1)) / std_t.view(1, -1, 1, 1)


@torch.no_grad()
def classifier_outputs(classifier: nn.Module, x: torch.Tensor,
                       batch_size: int = 500) -> Tuple[torch.Tensor, torch.Tensor]:
    """Normalised inputs (N, C, H, W) -> (pre-logit features (N, D), logits (N, classes))."""
    was_training = classifier.training
    classifier.eval()
    device = next(classifier.parameters()).device
    feats, logits = [], []
    for start in range(0, len(x), batch_size):
        tokens = classifier.forward_features(x[start:start + batch_size].to(device))
        feats.append(classifier.forward_head(tokens, pre_logits=True).float().cpu())
        logits.append(classifier.forward_head(tokens).float().cpu())
    classifier.train(was_training)
    return torch.cat(feats), torch.cat(logits)


def evaluate_samples(samples01: torch.Tensor, labels: torch.Tensor, real01: torch.Tensor, classifier: nn.Module,
                     img_size: int, in_chans: int, mean=None, std=None) -> Dict[str, float]:
    """FID (classifier features) of [0, 1] samples against [0, 1] real images, and conditional accuracy (%)."""
    prep = dict(img_size=img_size, in_chans=in_chans, mean=mean, std=std)
    gen_feats, gen_logits = classifier_outputs(classifier, classifier_inputs(samples01, **prep))
    real_feats, _ = classifier_outputs(classifier, classifier_inputs(real01, **prep))
    correct = (gen_logits.argmax(-1) == labels.cpu()).float()
    per_class = {int(c): 100.0 * correct[labels.cpu() == c].mean().item() for c in labels.unique().tolist()}
    return {"fid": frechet_distance(*feature_stats(gen_feats), *feature_stats(real_feats)),
            "accuracy": 100.0 * correct.mean().item(), "per_class_accuracy": per_class,
            "num_samples": len(samples01), "num_real": len(real01)}


def real_test_images(num: int) -> torch.Tensor:
    """The first `num` Fashion-MNIST test images, (num, 1, 28, 28) in [0, 1]."""
    ds = build_dataset("fashion_mnist", "val", T.ToTensor())
    return torch.stack([ds[i][0] for i in range(min(num, len(ds)))])


def evaluate_generator(meta: dict, classifier_path: str, labels: torch.Tensor, samples: torch.Tensor,
                       num_real: int = 10000) -> Dict[str, float]:
    """Classifier-FID and conditional accuracy of a generator's pixel samples in [-1, 1] (the padded
    Fashion-MNIST layout of `llamavit generate train`), scored by the llamavit classifier at classifier_path.

    meta: the generator checkpoint's metadata (latent-space samples are refused: decode them first).
    """
    if not meta.get("pixels", True):
        raise ValueError("samples of a latent-space model must be decoded before they can be scored")
    classifier = model_from_checkpoint(classifier_path)
    tcfg = read_meta(classifier_path).get("transform", {})
    real = real_test_images(num_real)
    gen01 = center_crop(((samples.float() + 1) / 2).clamp(0, 1), real.shape[-1])
    return evaluate_samples(gen01, labels, real, classifier, img_size=tcfg.get("img_size", 28),
                            in_chans=tcfg.get("in_chans", 1), mean=tcfg.get("mean"), std=tcfg.get("std"))
