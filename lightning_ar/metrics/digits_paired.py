"""Paired, label-matched comparisons of digits generators from their saved samples, with bootstrap CIs.

Two generators evaluated on the same test labels (in the same order, one sample per label, ``GenerationMetrics``
with ``save_samples``) and the same seeds are compared per seed, then averaged over seeds. The CI of the difference
comes from a two-level bootstrap: resample the seeds, then within each drawn seed the sample indices, the **same**
indices for both generators (paired by label), and recompute each set-level metric on the resample.

Per-sample quantities (:class:`DigitsSamples`): the classifier's features (for FID and KID against the test split,
as :class:`~lightning_ar.metrics.DigitsEvaluator` computes them), whether the classifier assigns the conditioning
label, and the distance to the nearest training image (memorisation figures).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lightning_ar.data.sources import DigitsSource
from lightning_ar.metrics.digits import feature_scale
from lightning_ar.metrics.digits_classifier import DigitsClassifier
from lightning_ar.metrics.memorisation import COPY_QUANTILE, nearest_distances
from lightning_ar.theory.stats import DEFAULT_REPS, PairedComparison, basic_ci, verdict

METRICS = ("fid", "kid", "cond_acc", "copy_fraction", "nn_ratio")
LOWER_IS_BETTER = {"fid": True, "kid": True, "cond_acc": False}


def _lower_median(x: np.ndarray) -> float:
    """``torch.median``'s convention (the lower of the two middle values)."""
    return float(np.sort(x)[(x.size - 1) // 2])


@dataclass
class DigitsReference:
    """What the set-level metrics compare against: the test split's features, the training images.

    Attributes:
        mu: ``[F]`` mean classifier feature of the test split.
        sigma_sqrt: ``[F, F]`` symmetric square root of its covariance (``ddof=1``).
        sigma_trace: Trace of that covariance.
        kid_real: ``[T, F]`` test features divided by the KID feature scale.
        kid_scale: The scale (:func:`~lightning_ar.metrics.digits.feature_scale` of the test split).
        nn_threshold: Distance below which a sample counts as a copy (5% quantile of test-to-train distances).
        nn_median_test: Median test-to-train distance.
        train: ``[M, 1, 8, 8]`` training images.
    """

    mu: np.ndarray
    sigma_sqrt: np.ndarray
    sigma_trace: float
    kid_real: np.ndarray
    kid_scale: float
    nn_threshold: float
    nn_median_test: float
    train: Tensor

    @classmethod
    @torch.no_grad()
    def build(cls, classifier: DigitsClassifier, source: DigitsSource | None = None) -> DigitsReference:
        """Reference statistics of ``source``'s test split in ``classifier``'s features."""
        source = source or DigitsSource()
        test, _ = source.split("test")
        train, _ = source.split("train")
        feats = classifier.features(test).double().numpy()  # (T, F)
        evals, evecs = np.linalg.eigh(np.cov(feats, rowvar=False))
        sqrt = (evecs * np.sqrt(np.clip(evals, 0, None))) @ evecs.T
        scale = feature_scale(classifier, test)
        d_test = nearest_distances(test, train).numpy()
        return cls(feats.mean(0), sqrt, float(np.trace(np.cov(feats, rowvar=False))), feats / scale, scale,
                   float(np.quantile(d_test, COPY_QUANTILE)), _lower_median(d_test), train)


@dataclass
class DigitsSamples:
    """Per-sample quantities of one generator's samples (one seed).

    Attributes:
        labels: ``[N]`` conditioning labels.
        features: ``[N, F]`` classifier features (float64).
        correct: ``[N]`` 1.0 where the classifier assigns the conditioning label.
        nn_dist: ``[N]`` distance to the nearest training image.
    """

    labels: np.ndarray
    features: np.ndarray
    correct: np.ndarray
    nn_dist: np.ndarray

    @classmethod
    @torch.no_grad()
    def build(cls, latents: Tensor, labels: Tensor, classifier: DigitsClassifier,
              reference: DigitsReference) -> DigitsSamples:
        """From generated latents ``[N, 1, 8, 8]`` (clamped to ``[-1, 1]``) and their labels ``[N]``."""
        images = latents.float().clamp(-1, 1)
        feats = classifier.features(images)
        correct = (classifier.head(feats).argmax(1) == labels).double().numpy()
        return cls(labels.numpy(), feats.double().numpy(), correct,
                   nearest_distances(images, reference.train).numpy())

    def metric(self, name: str, ref: DigitsReference, idx: np.ndarray | None = None) -> float:
        """Set-level metric ``name`` (one of :data:`METRICS`) of the samples ``idx`` (all when ``None``)."""
        idx = np.arange(self.labels.size) if idx is None else idx
        if name == "fid":
            return _fid(self.features[idx], ref)
        if name == "kid":
            return _kid(self.features[idx] / ref.kid_scale, ref.kid_real)
        if name == "cond_acc":
            return float(self.correct[idx].mean())
        if name == "copy_fraction":
            return float((self.nn_dist[idx] < ref.nn_threshold).mean())
        if name == "nn_ratio":
            return _lower_median(self.nn_dist[idx]) / ref.nn_median_test
        raise ValueError(f"unknown metric {name!r}; expected one of {METRICS}")


def _fid(feats: np.ndarray, ref: DigitsReference) -> float:
    """Frechet distance of ``feats`` ``[n, F]`` to the reference Gaussian (torchmetrics' formula, ``ddof=1``)."""
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    cross = ref.sigma_sqrt @ sigma @ ref.sigma_sqrt  # eigenvalues of sigma_r sigma_g, symmetric form
    root = np.sqrt(np.clip(np.linalg.eigvalsh(cross), 0, None)).sum()
    return float(((mu - ref.mu) ** 2).sum() + ref.sigma_trace + np.trace(sigma) - 2 * root)


def _kid(fake: np.ndarray, real: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic kernel ``(x.y / F + 1)^3``; equals torchmetrics' KID for equal set sizes."""
    dim = real.shape[1]

    def kern(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (x @ y.T / dim + 1.0) ** 3

    def offdiag_mean(k: np.ndarray) -> float:
        n = k.shape[0]
        return float((k.sum() - np.trace(k)) / (n * (n - 1)))

    return offdiag_mean(kern(real, real)) + offdiag_mean(kern(fake, fake)) - 2 * float(kern(real, fake).mean())


def paired_seed_differences(a: Sequence[DigitsSamples], b: Sequence[DigitsSamples], name: str,
                            ref: DigitsReference) -> np.ndarray:
    """``[S]`` per-seed differences ``metric(a_s) - metric(b_s)`` on the full sample sets."""
    return np.array([x.metric(name, ref) - y.metric(name, ref) for x, y in zip(a, b, strict=True)])


def compare(a: Sequence[DigitsSamples], b: Sequence[DigitsSamples], name: str, ref: DigitsReference,
            claim: str = "negative", reps: int = DEFAULT_REPS, seed: int = 0) -> PairedComparison:
    """Mean over seeds of ``metric(a) - metric(b)`` with a two-level paired bootstrap CI and the claim's verdict.

    Args:
        a: One :class:`DigitsSamples` per seed of the first generator.
        b: The same seeds of the second; each pair must have the same labels in the same order.
        name: Metric (:data:`METRICS`).
        ref: The reference statistics.
        claim: ``"negative"``: the claim is ``metric(a) < metric(b)``; ``"positive"``: ``>``.
        reps: Bootstrap replicates.
        seed: Resampling seed.
    """
    for x, y in zip(a, b, strict=True):
        if not np.array_equal(x.labels, y.labels):
            raise ValueError("paired comparison needs the same labels in the same order for both generators")
    rng = np.random.default_rng(seed)
    n_seeds = len(a)

    def replicate(seed_idx: np.ndarray) -> float:
        diffs = []
        for s in seed_idx:
            idx = rng.integers(0, a[s].labels.size, a[s].labels.size)
            diffs.append(a[s].metric(name, ref, idx) - b[s].metric(name, ref, idx))
        return float(np.mean(diffs))

    estimate = float(paired_seed_differences(a, b, name, ref).mean())
    # one seed: resample its samples only (the seed level has nothing to resample)
    draws = [rng.integers(0, n_seeds, n_seeds) if n_seeds > 1 else np.zeros(1, dtype=int) for _ in range(reps)]
    low, high = basic_ci(estimate, [replicate(d) for d in draws])
    return PairedComparison(estimate, low, high, n_seeds, verdict(low, high, claim))
