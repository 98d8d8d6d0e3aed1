"""Evaluator of generated 8x8 digits: FID and KID in the features of a small digits classifier against the unseen
test split, and conditional accuracy."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from lightning_ar.data.sources import DigitsSource
from lightning_ar.metrics.base import SampleEvaluator
from lightning_ar.metrics.conditional_accuracy import ConditionalAccuracy
from lightning_ar.metrics.digits_classifier import (
    DigitsClassifier,
    classifier_accuracy,
    load_or_train_digits_classifier,
)


class ClassifierFeatures(nn.Module):
    """FID/KID feature extractor: the penultimate features ``[B, F]`` of a :class:`DigitsClassifier`, divided by
    ``scale``."""

    def __init__(self, classifier: DigitsClassifier, scale: float = 1.0) -> None:
        super().__init__()
        self.classifier, self.scale = classifier, float(scale)
        self.num_features = classifier.num_features

    def forward(self, images: Tensor) -> Tensor:
        """Features ``[B, F]`` of images ``[B, 1, 8, 8]`` in ``[-1, 1]``."""
        return self.classifier.features(images) / self.scale


@torch.no_grad()
def feature_scale(classifier: DigitsClassifier, images: Tensor) -> float:
    """RMS feature value of ``images`` ``[N, 1, 8, 8]``: ``sqrt(mean ||f||^2 / F)``.

    KID's cubic kernel ``(f.g / F + 1)^3`` expects features of about unit size per dimension (as Inception's are);
    this classifier's have norms about 44 over 64 dimensions, which would make the kernel ~3e4 and KID mostly noise.
    """
    feats = classifier.features(images.to(classifier.head.weight.device))  # (N, F)
    return float(feats.pow(2).sum(1).mean().div(feats.shape[1]).sqrt())


def _digits_fid(classifier: DigitsClassifier, real: Tensor) -> FrechetInceptionDistance:
    """An FID metric in ``classifier`` features, holding the statistics of ``real`` images ``[N, 1, 8, 8]``."""
    fid = FrechetInceptionDistance(feature=ClassifierFeatures(classifier), reset_real_features=False)
    fid.update(real, real=True)
    return fid


def _digits_kid(classifier: DigitsClassifier, real: Tensor) -> KernelInceptionDistance:
    """A KID metric in ``classifier`` features (divided by :func:`feature_scale` of ``real``) holding the features of
    ``real`` images ``[N, 1, 8, 8]``.

    One subset (``subsets=1``); :func:`kid_value` sets its size to the smaller of the two sets at compute time.
    """
    features = ClassifierFeatures(classifier, feature_scale(classifier, real))
    kid = KernelInceptionDistance(feature=features, subsets=1, subset_size=len(real), reset_real_features=False)
    kid.update(real, real=True)
    return kid


def kid_value(kid: KernelInceptionDistance, seed: int = 0) -> float:
    """Unbiased squared MMD (cubic polynomial kernel, torchmetrics' KID) between the real and generated features.

    Both sets are cut to the smaller one's size ``m`` (torchmetrics' estimator needs equal sizes): with equal counts
    every feature is used and the value does not depend on any random draw; otherwise the random subset comes from a
    forked RNG seeded by ``seed`` (the global RNG is left untouched).
    """
    n_real = sum(len(f) for f in kid.real_features)
    n_fake = sum(len(f) for f in kid.fake_features)
    kid.subset_size = min(n_real, n_fake)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, _ = kid.compute()
    return float(mean)


class DigitsEvaluator(SampleEvaluator):
    """Scores generated ``1x8x8`` digits against real ones the classifier and the generators never saw.

    Metrics (:meth:`compute`), all in the 64 penultimate features of a small CNN classifier trained on the ``train``
    split (cached on disk):

    - ``fid``: Frechet distance between the generated images and the ``test`` split (180 images);
    - ``kid``: kernel inception distance (torchmetrics' unbiased cubic-kernel MMD^2) against the ``test`` split, in
      the same features divided by their RMS value on the test split (:func:`feature_scale`);
    - ``cond_acc``: fraction of generated images the classifier assigns to their conditioning label.

    The real reference is the test split, not the training split: in the features of a classifier trained on the
    training split, distances to that split reward copying it. Floors (:meth:`reference`), at equal counts: the FID
    and KID of the real ``val`` split (180 images, unseen by the classifier) against the test split, and the
    classifier's accuracy on the test split. Both distances depend on the number of generated samples (small sets are
    biased upwards, FID more than KID), so compare them with the floors at the floors' count (180).

    The classifier and the metrics, created by :meth:`prepare`, are held outside the module tree: they are not in
    ``state_dict()``/``parameters()`` of a module that holds this evaluator (checkpoints load whether or not
    ``prepare`` ran), but follow it in ``.to(device)``.

    Args:
        source: The digits source (default ``DigitsSource()``).
        cache_dir: Where the classifier is cached (default ``$LIGHTNING_AR_CACHE`` or ``~/.cache/lightning_ar``).
    """

    REFERENCE_SPLIT = "test"
    FLOOR_SPLIT = "val"

    def __init__(self, source: DigitsSource | None = None, cache_dir: str | Path | None = None) -> None:
        super().__init__()
        self.source = source if source is not None else DigitsSource()
        self.cache_dir = cache_dir
        self.cond_acc = ConditionalAccuracy()
        self._parts: dict[str, nn.Module] = {}  # "classifier", "fid", "kid": built by prepare, kept out of state_dict
        self._floors: dict[str, float] = {}

    def _apply(self, fn: Callable, recurse: bool = True) -> DigitsEvaluator:
        """Apply ``fn`` (device moves) to the prepared parts too."""
        super()._apply(fn, recurse)
        for part in self._parts.values():
            part._apply(fn)  # torchmetrics overrides _apply(fn, exclude_state), so no recurse argument
        return self

    def prepare(self, device: torch.device | str) -> None:
        """Load or train the classifier, store the test split's features and the floors; move to ``device``."""
        if not self._parts:
            classifier = load_or_train_digits_classifier(self.cache_dir, self.source)
            real, real_labels = self.source.split(self.REFERENCE_SPLIT)  # (180, 1, 8, 8)
            other, _ = self.source.split(self.FLOOR_SPLIT)  # (180, 1, 8, 8)
            floor_fid, floor_kid = _digits_fid(classifier, real), _digits_kid(classifier, real)
            floor_fid.update(other, real=False)
            floor_kid.update(other, real=False)
            self._floors = {
                "fid_floor": float(floor_fid.compute()),
                "kid_floor": kid_value(floor_kid),
                "cond_acc_floor": classifier_accuracy(classifier, real, real_labels),
            }
            self._parts = {"classifier": classifier, "fid": _digits_fid(classifier, real),
                           "kid": _digits_kid(classifier, real)}
        self.to(device)

    def _prepared(self) -> tuple[DigitsClassifier, FrechetInceptionDistance, KernelInceptionDistance]:
        if not self._parts:
            raise RuntimeError("DigitsEvaluator is not prepared: call prepare(device) before update/compute/reference")
        return self._parts["classifier"], self._parts["fid"], self._parts["kid"]

    @staticmethod
    def _check_inputs(latents: Tensor, labels: Tensor) -> None:
        if latents.ndim != 4 or tuple(latents.shape[1:]) != (1, 8, 8):
            raise ValueError(f"DigitsEvaluator expects latents [B, 1, 8, 8], got {tuple(latents.shape)}")
        if labels.shape != latents.shape[:1]:
            raise ValueError(f"DigitsEvaluator expects labels [B] with B={latents.shape[0]}, got {tuple(labels.shape)}")

    @torch.no_grad()
    def update(self, latents: Tensor, labels: Tensor) -> None:
        """Add generated images ``[B, 1, 8, 8]`` (clamped to ``[-1, 1]``) conditioned on ``labels`` ``[B]``."""
        classifier, fid, kid = self._prepared()
        self._check_inputs(latents, labels)
        device = classifier.head.weight.device
        images = latents.to(device, torch.float32).clamp(-1.0, 1.0)  # (B, 1, 8, 8)
        fid.update(images, real=False)
        kid.update(images, real=False)
        self.cond_acc.update(classifier(images), labels.to(device))

    def compute(self) -> dict[str, float]:
        """``fid``, ``kid`` and ``cond_acc`` of the images added since the last :meth:`reset` (at least 2 needed)."""
        _, fid, kid = self._prepared()
        count = int(fid.fake_features_num_samples)
        if count < 2:
            raise RuntimeError(f"DigitsEvaluator needs at least 2 generated images for FID and KID, got {count}")
        # identical statistics can give a tiny negative number (round-off of the matrix square root)
        return {"fid": max(float(fid.compute()), 0.0), "kid": kid_value(kid),
                "cond_acc": float(self.cond_acc.compute())}

    def reference(self) -> dict[str, float]:
        """``fid_floor`` and ``kid_floor`` (real val split vs test split, 180 vs 180) and ``cond_acc_floor``
        (classifier accuracy on the test split)."""
        self._prepared()
        return dict(self._floors)

    def reset(self) -> None:
        """Forget the generated images; the test split's features are kept."""
        if self._parts:
            self._parts["fid"].reset()
            self._parts["kid"].reset()
        self.cond_acc.reset()
