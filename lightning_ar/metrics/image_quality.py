"""Inception FID / IS and improved precision/recall of generated images against a reference set (ImageNet scale).

Generated latents are decoded to images in ``[-1, 1]`` and quantised to ``uint8`` exactly like the ADM ``.npz``
written by :class:`~lightning_ar.callbacks.AdmNpzWriter` (``round((x + 1) * 127.5)``), so scoring in memory and scoring
the written ``.npz`` with :func:`evaluate_npz` give the same numbers. One network pass per image yields both the pool
features (FID, precision/recall, as in ADM's evaluator) and the unbiased logits (Inception score).

FID protocol: when the reference ``.npz`` holds ``mu`` and ``sigma`` (ADM's reference batches do) or a stats-only
``.npz`` is given as ``reference_stats``, FID is computed against those stored statistics, as ADM's evaluator and MAR's
table do (:mod:`~lightning_ar.metrics.fid_stats`); otherwise against the features of the reference images, which is
not comparable with published numbers. Precision/recall and the floors always use the reference images (``arr_0``).
The network is torch-fidelity's ``inception-v3-compat``: the TF Inception graph of 2015-12-05 that ADM's evaluator
runs, with TF1's bilinear resize to 299; its ``2048`` feature is that graph's pool_3, the feature of ADM's ``mu``.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance

from lightning_ar.metrics.base import SampleEvaluator
from lightning_ar.metrics.fid_stats import ReferenceStatsFID, has_reference_stats, load_reference_stats, npz_members
from lightning_ar.metrics.image_io import iter_reference_batches, reference_image_count, to_uint8_rgb
from lightning_ar.metrics.inception import (
    InceptionFeatures,
    Precomputed,
    StableInceptionScore,
    dist_active,
    fid_between,
    gather_shards,
    seeded_inception_score,
    split_output,
)
from lightning_ar.metrics.precision_recall import ImprovedPrecisionRecall, precision_recall
from lightning_ar.progress import progress_bar
from lightning_ar.seeding import seeded_generator


def resolve_reference(reference: str | Path | None, reference_stats: str | Path | None) -> tuple[Path | None,
                                                                                              Path | None]:
    """``(images, stats)``: where the reference images (``arr_0`` or a folder) and the FID statistics come from.

    ``stats`` is ``reference_stats`` if given, else ``reference`` when that ``.npz`` holds ``mu`` and ``sigma``, else
    ``None`` (FID against the images' own features). ``images`` is ``None`` for a stats-only ``.npz``.

    Raises:
        FileNotFoundError: a given path does not exist (named by its option).
        ValueError: neither given, or a reference that holds neither images nor statistics.
    """
    if reference is None and reference_stats is None:
        raise ValueError("ImageQualityEvaluator needs reference (an ADM reference .npz or an image folder) and/or "
                         "reference_stats (an .npz with mu and sigma)")
    for name, path in (("reference", reference), ("reference_stats", reference_stats)):
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"ImageQualityEvaluator.{name}: {path} does not exist")
    stats = None if reference_stats is None else Path(reference_stats)
    if reference is None or Path(reference).is_dir():
        return (None if reference is None else Path(reference)), stats
    reference = Path(reference)
    if not zipfile.is_zipfile(reference):
        raise ValueError(f"ImageQualityEvaluator.reference {reference}: expected an ADM .npz or an image folder")
    if stats is None and has_reference_stats(reference):
        stats = reference
    images = reference if "arr_0" in npz_members(reference) else None
    if images is None and stats is None:
        raise ValueError(f"ImageQualityEvaluator.reference {reference}: holds neither arr_0 images nor mu/sigma")
    return images, stats


class ImageQualityEvaluator(SampleEvaluator):
    """FID, Inception score and improved precision/recall of generated images against a reference.

    Metrics (:meth:`compute`): ``fid``; ``is`` and ``is_std`` (10 splits; only when the feature extractor gives
    logits); ``precision`` and ``recall`` (k-NN balls with ``k = pr_k`` in the same pool features as FID, as ADM's
    evaluator does; only with reference images). FID follows the published protocol when reference statistics exist
    (see :func:`resolve_reference` and :attr:`fid_reference`): against the stored ``mu``/``sigma``, the real side
    never recomputed. Floors (:meth:`reference`, only with reference images), from a fixed random half/half split of
    the reference images: ``fid_floor`` (half vs half, in the images' own statistics), ``precision_floor``/
    ``recall_floor`` (half vs half) and ``is_floor``, the Inception score of all reference images (for IS the
    real-data value is the point of reference, not a lower bound). FID is biased upwards at small counts: read
    ``fid`` against ``fid_floor`` only at similar sample counts, and against a published table only at 50,000.

    Distributed: each process computes the features of its share (``rank::world_size``) of the reference in
    :meth:`prepare` and of its own generated images; :meth:`compute` reduces FID sums and gathers IS logits and
    precision/recall features across processes (torchmetrics), so every process must call :meth:`prepare` and
    :meth:`compute`. The floors gather the reference features once. Set ``distributed=False`` when a single process
    of a distributed job uses the evaluator.

    The feature extractor and metrics, built by :meth:`prepare`, are kept out of ``state_dict()``; they follow
    ``.to(device)``. ``prepare`` runs the network over the whole reference share: call it on the accelerator.

    Args:
        decode: Latents ``[B, C, h, w]`` -> images ``[B, 1 or 3, H, W]`` in ``[-1, 1]`` (e.g. a VAE decode);
            ``None`` when the "latents" already are images.
        num_classes: Number of class labels (labels given to :meth:`update` are checked against it).
        reference: ADM reference batch ``.npz`` (``arr_0`` uint8 ``[N, H, W, 3]``, and ``mu``/``sigma`` if it has
            them) or a folder of images of one size.
        inception_weights: Local Inception weights file for offline clusters (default: download on first use).
        feature_extractor: Module mapping ``uint8`` ``[B, 3, H, W]`` to features ``[B, F]`` or ``(features, logits)``,
            used instead of Inception (tests, other feature spaces).
        num_features: Inception pool layer for FID and precision/recall (64, 192, 768 or 2048).
        pr_k: Neighbourhood size of precision/recall.
        batch_size: Images per network pass over the reference.
        is_splits: Splits of the Inception score.
        seed: Seed of the reference half/half split and of the IS permutation.
        distributed: Shard the reference and reduce across processes when ``torch.distributed`` is initialised.
        reference_stats: ``.npz`` with ``mu`` ``[F]`` and ``sigma`` ``[F, F]`` for FID (an ADM reference batch or a
            stats-only file); overrides the statistics of ``reference``.
        progress: Show a progress bar over the reference images in :meth:`prepare` (process 0).
    """

    def __init__(
        self,
        decode: Callable[[Tensor], Tensor] | None,
        num_classes: int,
        reference: str | Path | None = None,
        inception_weights: str | Path | None = None,
        feature_extractor: nn.Module | None = None,
        num_features: int = 2048,
        pr_k: int = 3,
        batch_size: int = 100,
        is_splits: int = 10,
        seed: int = 0,
        distributed: bool = True,
        reference_stats: str | Path | None = None,
        progress: bool = False,
    ) -> None:
        super().__init__()
        self.reference_path, self.stats_path = resolve_reference(reference, reference_stats)
        for name, value in (("num_classes", num_classes), ("pr_k", pr_k), ("batch_size", batch_size),
                            ("is_splits", is_splits)):
            if value < 1:
                raise ValueError(f"ImageQualityEvaluator.{name} must be >= 1, got {value}")
        self._fns: dict[str, Any] = {"decode": decode, "extractor": feature_extractor}  # outside the module tree
        self.num_classes, self.inception_weights = num_classes, inception_weights
        self.num_features, self.pr_k, self.batch_size = num_features, pr_k, batch_size
        self.is_splits, self.seed, self.distributed, self.progress = is_splits, seed, distributed, progress
        self._parts: dict[str, nn.Module] = {}  # "extractor", "fid", optionally "pr", "is": built by prepare
        self._floors: dict[str, float] = {}

    @property
    def fid_reference(self) -> str:
        """Which reference statistics FID uses: the stored ``mu``/``sigma`` of a file, or the reference images'."""
        if self.stats_path is not None:
            return f"mu/sigma of {self.stats_path}"
        return f"features of the {reference_image_count(self.reference_path)} images of {self.reference_path}"

    def _apply(self, fn: Callable, recurse: bool = True) -> ImageQualityEvaluator:
        """Apply ``fn`` (device moves) to the prepared parts too."""
        super()._apply(fn, recurse)
        for part in self._parts.values():
            part._apply(fn)
        return self

    # ------------------------------------------------------------------------------------------------ prepare
    def prepare(self, device: torch.device | str) -> None:
        """Build the extractor, compute this process's reference features and the floors; move to ``device``."""
        if not self._parts:
            extractor = self._fns["extractor"]
            if extractor is None:
                extractor = InceptionFeatures(self.num_features, self.inception_weights)
            extractor = extractor.to(device).eval()
            images = self.reference_path is not None
            features, logits = (self._reference_features if images else self._probe)(extractor, torch.device(device))
            self._build_metrics(extractor, features, logits, images)
            if images:
                self._floors = self._compute_floors(gather_shards(features, self.distributed),
                                                    None if logits is None else gather_shards(logits, self.distributed))
        self.to(device)

    @torch.no_grad()
    def _reference_features(self, extractor: nn.Module, device: torch.device) -> tuple[Tensor, Tensor | None]:
        """Features ``[n, F]`` (and logits ``[n, K]``) of this process's share of the reference images."""
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist_active(self.distributed) else (0, 1)
        total = math.ceil(math.ceil(reference_image_count(self.reference_path) / world) / self.batch_size)
        batches = progress_bar(iter_reference_batches(self.reference_path, self.batch_size, rank, world),
                               total=total, desc="reference features", unit="batch",
                               disable=not self.progress or rank != 0)
        features, logits = [], []
        for images in batches:
            f, lg = split_output(extractor(images.to(device)))
            features.append(f.float())
            if lg is not None:
                logits.append(lg.float())
        if not features:
            raise ValueError(f"reference {self.reference_path} has fewer images than processes ({world})")
        return torch.cat(features), (torch.cat(logits) if logits else None)

    @torch.no_grad()
    def _probe(self, extractor: nn.Module, device: torch.device) -> tuple[Tensor, Tensor | None]:
        """Without reference images: the extractor's output on one blank image, for its dimensions only."""
        f, lg = split_output(extractor(torch.zeros(1, 3, 32, 32, dtype=torch.uint8, device=device)))
        return f[:0].float(), (None if lg is None else lg[:0].float())

    def _fid_metric(self, features: Tensor, images: bool) -> nn.Module:
        """FID against the stored statistics, else against the reference features ``[n, F]``."""
        sync = {"sync_on_compute": self.distributed}
        if self.stats_path is not None:
            mu, sigma = load_reference_stats(self.stats_path, "reference_stats")
            if mu.shape[0] != features.shape[1]:
                raise ValueError(f"reference_stats {self.stats_path}: mu has {mu.shape[0]} features but the feature "
                                 f"extractor gives {features.shape[1]} (num_features must match the statistics)")
            return ReferenceStatsFID(mu, sigma, **sync).to(features.device)
        fid = FrechetInceptionDistance(feature=Precomputed(features.shape[1]), reset_real_features=False, **sync)
        fid = fid.to(features.device)
        fid.update(features, real=True)
        return fid

    def _build_metrics(self, extractor: nn.Module, features: Tensor, logits: Tensor | None, images: bool) -> None:
        sync = {"sync_on_compute": self.distributed}
        self._parts = {"extractor": extractor, "fid": self._fid_metric(features, images)}
        if images:
            pr = ImprovedPrecisionRecall(k=self.pr_k, reset_real_features=False, **sync).to(features.device)
            pr.update(features, real=True)
            self._parts["pr"] = pr
        if logits is not None:
            self._parts["is"] = StableInceptionScore(feature=Precomputed(logits.shape[1]), splits=self.is_splits,
                                                     **sync)

    def _compute_floors(self, features: Tensor, logits: Tensor | None) -> dict[str, float]:
        """Real-vs-real values on a fixed random half/half split of all reference features ``[N, F]``."""
        n = features.shape[0]
        if n < 2 * (self.pr_k + 1):
            raise ValueError(f"reference {self.reference_path} has {n} images; at least {2 * (self.pr_k + 1)} needed")
        perm = torch.randperm(n, generator=seeded_generator(self.seed)).to(features.device)
        a, b = features[perm[: n // 2]], features[perm[n // 2:]]
        precision, recall = precision_recall(a, b, self.pr_k)
        floors = {"fid_floor": fid_between(a, b), "precision_floor": precision, "recall_floor": recall}
        if logits is not None:
            metric = StableInceptionScore(feature=Precomputed(logits.shape[1]), splits=self.is_splits,
                                    sync_on_compute=False)
            metric.update(logits)
            floors["is_floor"] = seeded_inception_score(metric, self.seed)[0]
        return floors

    # ------------------------------------------------------------------------------------------------- update
    def _prepared(self) -> dict[str, nn.Module]:
        if not self._parts:
            raise RuntimeError("ImageQualityEvaluator is not prepared: call prepare(device) first")
        return self._parts

    @torch.no_grad()
    def update(self, latents: Tensor, labels: Tensor) -> None:
        """Decode latents ``[B, C, h, w]`` (labels ``[B]``), quantise to ``uint8`` RGB and add them."""
        if labels.shape != latents.shape[:1]:
            raise ValueError(f"labels must have shape [{latents.shape[0]}], got {tuple(labels.shape)}")
        if labels.numel() and not 0 <= int(labels.min()) <= int(labels.max()) < self.num_classes:
            raise ValueError(f"labels must be in [0, {self.num_classes}), got [{labels.min()}, {labels.max()}]")
        decode = self._fns["decode"]
        images = decode(latents) if decode is not None else latents  # (B, C, H, W) in [-1, 1]
        self.update_images(to_uint8_rgb(images))

    @torch.no_grad()
    def update_images(self, images: Tensor) -> None:
        """Add generated ``uint8`` images ``[B, 3, H, W]``."""
        parts = self._prepared()
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise TypeError(f"update_images expects uint8 [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        device = parts["fid"].fake_features_sum.device
        features, logits = split_output(parts["extractor"](images.to(device)))
        features = features.float()
        if isinstance(parts["fid"], ReferenceStatsFID):
            parts["fid"].update(features)
        else:
            parts["fid"].update(features, real=False)
        if "pr" in parts:
            parts["pr"].update(features, real=False)
        if "is" in parts and logits is not None:
            parts["is"].update(logits.float())

    # ------------------------------------------------------------------------------------------------ compute
    def compute(self) -> dict[str, float]:
        """``fid``, ``is``, ``is_std``, ``precision``, ``recall`` of all images added since :meth:`reset`."""
        parts = self._prepared()
        count, needed = int(parts["fid"].fake_features_num_samples), max(2, self.pr_k + 1) if "pr" in parts else 2
        if count < needed:
            raise RuntimeError(f"ImageQualityEvaluator needs at least {needed} images, got {count}")
        out = {"fid": max(float(parts["fid"].compute()), 0.0)}
        if "is" in parts:
            out["is"], out["is_std"] = seeded_inception_score(parts["is"], self.seed)
        if "pr" in parts:
            pr = parts["pr"].compute()
            out.update(precision=float(pr["precision"]), recall=float(pr["recall"]))
        return out

    def reference(self) -> dict[str, float]:
        """``fid_floor``, ``precision_floor``, ``recall_floor`` and (with logits) ``is_floor``; empty without
        reference images."""
        self._prepared()
        return dict(self._floors)

    def reset(self) -> None:
        """Forget the generated images; the reference statistics are kept."""
        for name in ("fid", "pr", "is"):
            if name in self._parts:
                self._parts[name].reset()
