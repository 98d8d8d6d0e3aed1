"""Evaluator of generated 8x8 digits: FID in the features of a small digits classifier, and conditional accuracy."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from lightning_ar.data.sources import DigitsSource
from lightning_ar.metrics.base import SampleEvaluator
from lightning_ar.metrics.conditional_accuracy import ConditionalAccuracy
from lightning_ar.metrics.digits_classifier import (
    DigitsClassifier,
    classifier_accuracy,
    load_or_train_digits_classifier,
)


class ClassifierFeatures(nn.Module):
    """FID feature extractor: the penultimate features ``[B, F]`` of a :class:`DigitsClassifier`."""

    def __init__(self, classifier: DigitsClassifier) -> None:
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features

    def forward(self, images: Tensor) -> Tensor:
        """Features ``[B, F]`` of images ``[B, 1, 8, 8]`` in ``[-1, 1]``."""
        return self.classifier.features(images)


def _digits_fid(classifier: DigitsClassifier, real: Tensor) -> FrechetInceptionDistance:
    """An FID metric in ``classifier`` features, holding the statistics of ``real`` images ``[N, 1, 8, 8]``."""
    fid = FrechetInceptionDistance(feature=ClassifierFeatures(classifier), reset_real_features=False)
    fid.update(real, real=True)
    return fid


class DigitsEvaluator(SampleEvaluator):
    """Scores generated ``1x8x8`` digits against the real ones.

    Metrics: ``fid``, the Frechet distance between generated images and the ``train`` split in the 64 penultimate
    features of a small CNN classifier (trained on the train split, cached on disk), and ``cond_acc``, the fraction
    of generated images that the classifier assigns to their conditioning label. Floors (:meth:`reference`): the
    FID of the real ``test`` split against the train split, and the classifier's accuracy on the test split.

    The FID is not comparable with Inception FIDs; it depends on the number of generated samples (small sets are
    biased upwards), so compare it with the floor at a similar count (the test split has 180 images).

    The classifier and the FID metric, created by :meth:`prepare`, are held outside the module tree: they are not
    in ``state_dict()``/``parameters()`` of a module that holds this evaluator (checkpoints load whether or not
    ``prepare`` ran), but follow it in ``.to(device)``.

    Args:
        source: The digits source (default ``DigitsSource()``).
        cache_dir: Where the classifier is cached (default ``$LIGHTNING_AR_CACHE`` or ``~/.cache/lightning_ar``).
    """

    def __init__(self, source: DigitsSource | None = None, cache_dir: str | Path | None = None) -> None:
        super().__init__()
        self.source = source if source is not None else DigitsSource()
        self.cache_dir = cache_dir
        self.cond_acc = ConditionalAccuracy()
        self._parts: dict[str, nn.Module] = {}  # "classifier", "fid": built by prepare, kept out of state_dict
        self._floors: dict[str, float] = {}

    def _apply(self, fn: Callable, recurse: bool = True) -> DigitsEvaluator:
        """Apply ``fn`` (device moves) to the prepared parts too."""
        super()._apply(fn, recurse)
        for part in self._parts.values():
            part._apply(fn)  # torchmetrics overrides _apply(fn, exclude_state), so no recurse argument
        return self

    def prepare(self, device: torch.device | str) -> None:
        """Load or train the classifier, store the train split's FID statistics and the floors; move to ``device``."""
        if not self._parts:
            classifier = load_or_train_digits_classifier(self.cache_dir, self.source)
            train, _ = self.source.split("train")  # (N, 1, 8, 8)
            test, test_labels = self.source.split("test")
            floor_fid = _digits_fid(classifier, train)
            floor_fid.update(test, real=False)
            self._floors = {
                "fid_floor": float(floor_fid.compute()),
                "cond_acc_floor": classifier_accuracy(classifier, test, test_labels),
            }
            self._parts = {"classifier": classifier, "fid": _digits_fid(classifier, train)}
        self.to(device)

    def _prepared(self) -> tuple[DigitsClassifier, FrechetInceptionDistance]:
        if not self._parts:
            raise RuntimeError("DigitsEvaluator is not prepared: call prepare(device) before update/compute/reference")
        return self._parts["classifier"], self._parts["fid"]

    @staticmethod
    def _check_inputs(latents: Tensor, labels: Tensor) -> None:
        if latents.ndim != 4 or tuple(latents.shape[1:]) != (1, 8, 8):
            raise ValueError(f"DigitsEvaluator expects latents [B, 1, 8, 8], got {tuple(latents.shape)}")
        if labels.shape != latents.shape[:1]:
            raise ValueError(f"DigitsEvaluator expects labels [B] with B={latents.shape[0]}, got {tuple(labels.shape)}")

    @torch.no_grad()
    def update(self, latents: Tensor, labels: Tensor) -> None:
        """Add generated images ``[B, 1, 8, 8]`` (clamped to ``[-1, 1]``) conditioned on ``labels`` ``[B]``."""
        classifier, fid = self._prepared()
        self._check_inputs(latents, labels)
        device = classifier.head.weight.device
        images = latents.to(device, torch.float32).clamp(-1.0, 1.0)  # (B, 1, 8, 8)
        fid.update(images, real=False)
        self.cond_acc.update(classifier(images), labels.to(device))

    def compute(self) -> dict[str, float]:
        """``fid`` and ``cond_acc`` of the images added since the last :meth:`reset` (at least 2 are needed)."""
        _, fid = self._prepared()
        try:
            value = fid.compute()
        except RuntimeError as err:
            count = int(fid.fake_features_num_samples)
            if count < 2:
                raise RuntimeError(f"DigitsEvaluator needs at least 2 generated images for FID, got {count}") from err
            raise
        # identical statistics can give a tiny negative number (round-off of the matrix square root)
        return {"fid": max(float(value), 0.0), "cond_acc": float(self.cond_acc.compute())}

    def reference(self) -> dict[str, float]:
        """``fid_floor`` (real test split vs train split) and ``cond_acc_floor`` (classifier test accuracy)."""
        self._prepared()
        return dict(self._floors)

    def reset(self) -> None:
        """Forget the generated images; the train split's statistics are kept."""
        if self._parts:
            self._parts["fid"].reset()
        self.cond_acc.reset()
