"""Inception FID / IS and improved precision/recall of generated images against a reference set (ImageNet scale).

Generated latents are decoded to images in ``[-1, 1]`` and quantised to ``uint8`` exactly like the ADM ``.npz``
written by :class:`~lightning_ar.callbacks.AdmNpzWriter` (``round((x + 1) * 127.5)``), so scoring in memory and scoring
the written ``.npz`` with :func:`evaluate_npz` give the same numbers. One network pass per image yields both the pool
features (FID, precision/recall, as in ADM's evaluator) and the unbiased logits (Inception score).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.utilities.distributed import gather_all_tensors

from lightning_ar.io import atomic_write_text
from lightning_ar.metrics.base import SampleEvaluator
from lightning_ar.metrics.image_io import iter_npz_images, iter_reference_batches, to_uint8_rgb
from lightning_ar.metrics.precision_recall import ImprovedPrecisionRecall, precision_recall

INCEPTION_FEATURES = (64, 192, 768, 2048)


class InceptionFeatures(nn.Module):
    """torch-fidelity's InceptionV3 (the TF FID network, ``inception-v3-compat``), always in eval mode.

    Maps ``uint8`` images ``[B, 3, H, W]`` (resized to 299 inside) to ``(features [B, num_features],
    logits_unbiased [B, 1008])``.

    Args:
        num_features: Pool layer of the features: 64, 192, 768 or 2048 (FID standard).
        weights_path: Local weights file (``pt_inception-2015-12-05-6726825d.pth``) for offline machines; ``None``
            downloads them on first use.
    """

    def __init__(self, num_features: int = 2048, weights_path: str | Path | None = None) -> None:
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        if num_features not in INCEPTION_FEATURES:
            raise ValueError(f"num_features must be one of {INCEPTION_FEATURES}, got {num_features}")
        if weights_path is not None and not Path(weights_path).is_file():
            raise FileNotFoundError(f"inception_weights: no Inception weights file at {weights_path}")
        self.num_features = num_features
        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat", [str(num_features), "logits_unbiased"],
            feature_extractor_weights_path=None if weights_path is None else str(weights_path),
        )
        self.train(False)

    def train(self, mode: bool = True) -> InceptionFeatures:
        """Stay in eval mode (batch-norm statistics are part of the metric's definition)."""
        return super().train(False)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``uint8`` ``[B, 3, H, W]`` -> ``(features [B, F], logits [B, 1008])``."""
        features, logits = self.net(images)
        return features, logits


class _Precomputed(nn.Module):
    """Identity "feature extractor": lets torchmetrics' FID/IS take features computed once by the evaluator."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def _split_output(output: Tensor | tuple[Tensor, ...]) -> tuple[Tensor, Tensor | None]:
    """A feature extractor's output -> ``(features [B, F], logits [B, K] or None)``."""
    if isinstance(output, Tensor):
        return output, None
    if isinstance(output, (tuple, list)) and len(output) in (1, 2) and all(isinstance(t, Tensor) for t in output):
        return output[0], (output[1] if len(output) == 2 else None)
    raise TypeError("feature_extractor must return features [B, F] or a tuple (features [B, F], logits [B, K])")


def _dist_active(enabled: bool) -> bool:
    return enabled and dist.is_available() and dist.is_initialized()


def _gather_shards(tensor: Tensor, enabled: bool) -> Tensor:
    """Reassemble rows sharded ``rank::world_size`` (this process holds ``tensor`` ``[n_r, ...]``) in their order.

    NCCL gathers CUDA tensors only, so CPU tensors travel via the current CUDA device there.
    """
    if not _dist_active(enabled):
        return tensor
    device = tensor.device
    if dist.get_backend() == "nccl" and device.type != "cuda":
        tensor = tensor.to(torch.device("cuda", torch.cuda.current_device()))
    shards = [t.to(device) for t in gather_all_tensors(tensor.contiguous())]
    out = shards[0].new_empty((sum(len(t) for t in shards), *shards[0].shape[1:]))
    for rank, shard in enumerate(shards):
        out[rank::len(shards)] = shard
    return out


def _seeded_inception_score(metric: InceptionScore, seed: int) -> tuple[float, float]:
    """torchmetrics' IS permutes with the global CPU RNG: fix it to ``seed`` for this call only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def _fid_between(a: Tensor, b: Tensor) -> float:
    """Frechet distance between feature sets ``a`` ``[N, F]`` and ``b`` ``[M, F]`` (this process only)."""
    fid = FrechetInceptionDistance(feature=_Precomputed(a.shape[1]), sync_on_compute=False).to(a.device)
    fid.update(a, real=True)
    fid.update(b, real=False)
    return max(float(fid.compute()), 0.0)


class ImageQualityEvaluator(SampleEvaluator):
    """FID, Inception score and improved precision/recall of generated images against reference images.

    Metrics (:meth:`compute`): ``fid``; ``is`` and ``is_std`` (10 splits; only when the feature extractor gives
    logits); ``precision`` and ``recall`` (k-NN balls with ``k = pr_k`` in the same pool features as FID, as ADM's
    evaluator does). Floors (:meth:`reference`), from a fixed random half/half split of the reference:
    ``fid_floor`` (half vs half), ``precision_floor``/``recall_floor`` (half vs half) and ``is_floor``, the Inception
    score of all reference images (for IS the real-data value is the point of reference, not a lower bound). FID is
    biased upwards at small counts: read ``fid`` against ``fid_floor`` only at similar sample counts.

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
        reference: ADM reference batch ``.npz`` (``arr_0`` uint8 ``[N, H, W, 3]``) or a folder of images of one size.
        inception_weights: Local Inception weights file for offline clusters (default: download on first use).
        feature_extractor: Module mapping ``uint8`` ``[B, 3, H, W]`` to features ``[B, F]`` or ``(features, logits)``,
            used instead of Inception (tests, other feature spaces).
        num_features: Inception pool layer for FID and precision/recall (64, 192, 768 or 2048).
        pr_k: Neighbourhood size of precision/recall.
        batch_size: Images per network pass over the reference.
        is_splits: Splits of the Inception score.
        seed: Seed of the reference half/half split and of the IS permutation.
        distributed: Shard the reference and reduce across processes when ``torch.distributed`` is initialised.
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
    ) -> None:
        super().__init__()
        if reference is None:
            raise ValueError("ImageQualityEvaluator.reference is required: an ADM reference .npz or an image folder")
        if not Path(reference).exists():
            raise FileNotFoundError(f"ImageQualityEvaluator.reference: {reference} does not exist")
        for name, value in (("num_classes", num_classes), ("pr_k", pr_k), ("batch_size", batch_size),
                            ("is_splits", is_splits)):
            if value < 1:
                raise ValueError(f"ImageQualityEvaluator.{name} must be >= 1, got {value}")
        self._fns: dict[str, Any] = {"decode": decode, "extractor": feature_extractor}  # outside the module tree
        self.num_classes, self.reference_path, self.inception_weights = num_classes, Path(reference), inception_weights
        self.num_features, self.pr_k, self.batch_size = num_features, pr_k, batch_size
        self.is_splits, self.seed, self.distributed = is_splits, seed, distributed
        self._parts: dict[str, nn.Module] = {}  # "extractor", "fid", "pr", optionally "is": built by prepare
        self._floors: dict[str, float] = {}

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
            features, logits = self._reference_features(extractor, torch.device(device))
            self._build_metrics(extractor, features, logits)
            self._floors = self._compute_floors(_gather_shards(features, self.distributed),
                                                None if logits is None else _gather_shards(logits, self.distributed))
        self.to(device)

    @torch.no_grad()
    def _reference_features(self, extractor: nn.Module, device: torch.device) -> tuple[Tensor, Tensor | None]:
        """Features ``[n, F]`` (and logits ``[n, K]``) of this process's share of the reference images."""
        rank, world = (dist.get_rank(), dist.get_world_size()) if _dist_active(self.distributed) else (0, 1)
        features, logits = [], []
        for images in iter_reference_batches(self.reference_path, self.batch_size, rank, world):
            f, lg = _split_output(extractor(images.to(device)))
            features.append(f.float())
            if lg is not None:
                logits.append(lg.float())
        if not features:
            raise ValueError(f"reference {self.reference_path} has fewer images than processes ({world})")
        return torch.cat(features), (torch.cat(logits) if logits else None)

    def _build_metrics(self, extractor: nn.Module, features: Tensor, logits: Tensor | None) -> None:
        sync = {"sync_on_compute": self.distributed}
        fid = FrechetInceptionDistance(feature=_Precomputed(features.shape[1]), reset_real_features=False, **sync)
        pr = ImprovedPrecisionRecall(k=self.pr_k, reset_real_features=False, **sync)
        fid, pr = fid.to(features.device), pr.to(features.device)
        fid.update(features, real=True)
        pr.update(features, real=True)
        self._parts = {"extractor": extractor, "fid": fid, "pr": pr}
        if logits is not None:
            self._parts["is"] = InceptionScore(feature=_Precomputed(logits.shape[1]), splits=self.is_splits, **sync)

    def _compute_floors(self, features: Tensor, logits: Tensor | None) -> dict[str, float]:
        """Real-vs-real values on a fixed random half/half split of all reference features ``[N, F]``."""
        n = features.shape[0]
        if n < 2 * (self.pr_k + 1):
            raise ValueError(f"reference {self.reference_path} has {n} images; at least {2 * (self.pr_k + 1)} needed")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed)).to(features.device)
        a, b = features[perm[: n // 2]], features[perm[n // 2:]]
        precision, recall = precision_recall(a, b, self.pr_k)
        floors = {"fid_floor": _fid_between(a, b), "precision_floor": precision, "recall_floor": recall}
        if logits is not None:
            metric = InceptionScore(feature=_Precomputed(logits.shape[1]), splits=self.is_splits,
                                    sync_on_compute=False)
            metric.update(logits)
            floors["is_floor"] = _seeded_inception_score(metric, self.seed)[0]
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
        device = parts["fid"].real_features_sum.device
        features, logits = _split_output(parts["extractor"](images.to(device)))
        parts["fid"].update(features.float(), real=False)
        parts["pr"].update(features.float(), real=False)
        if "is" in parts and logits is not None:
            parts["is"].update(logits.float())

    # ------------------------------------------------------------------------------------------------ compute
    def compute(self) -> dict[str, float]:
        """``fid``, ``is``, ``is_std``, ``precision``, ``recall`` of all images added since :meth:`reset`."""
        parts = self._prepared()
        count = int(parts["fid"].fake_features_num_samples)
        if count < max(2, self.pr_k + 1):
            raise RuntimeError(f"ImageQualityEvaluator needs at least {max(2, self.pr_k + 1)} images, got {count}")
        pr = parts["pr"].compute()
        out = {"fid": max(float(parts["fid"].compute()), 0.0)}
        if "is" in parts:
            out["is"], out["is_std"] = _seeded_inception_score(parts["is"], self.seed)
        out.update(precision=float(pr["precision"]), recall=float(pr["recall"]))
        return out

    def reference(self) -> dict[str, float]:
        """``fid_floor``, ``precision_floor``, ``recall_floor`` and (with logits) ``is_floor``."""
        self._prepared()
        return dict(self._floors)

    def reset(self) -> None:
        """Forget the generated images; the reference statistics are kept."""
        for name in ("fid", "pr", "is"):
            if name in self._parts:
                self._parts[name].reset()


def evaluate_npz(
    samples_npz: str | Path,
    reference: str | Path,
    inception_weights: str | Path | None = None,
    feature_extractor: nn.Module | None = None,
    batch_size: int = 100,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Score an ADM-format samples ``.npz`` (``arr_0`` uint8 ``[N, H, W, 3]``) against ``reference``.

    Returns:
        The metrics of :class:`ImageQualityEvaluator` and their floors, plus ``num_samples``.
    """
    if not Path(samples_npz).is_file():
        raise FileNotFoundError(f"samples: no file at {samples_npz}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    evaluator = ImageQualityEvaluator(None, 1, reference, inception_weights, feature_extractor,
                                      batch_size=batch_size, distributed=False)
    evaluator.prepare(device)
    count = 0
    for batch in iter_npz_images(samples_npz, batch_size, "samples"):  # (B, H, W, 3), streamed
        evaluator.update_images(torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2))
        count += len(batch)
    return {**evaluator.compute(), **evaluator.reference(), "num_samples": float(count)}


def evaluate_main(argv: list[str] | None = None) -> None:
    """``lightning-ar evaluate SAMPLES.npz --reference REF [--inception-weights W] [--output results.json]``."""
    parser = argparse.ArgumentParser(prog="lightning-ar evaluate", description=evaluate_npz.__doc__.splitlines()[0])
    parser.add_argument("samples", help="ADM samples .npz (arr_0 uint8 [N, H, W, 3])")
    parser.add_argument("--reference", required=True, help="ADM reference batch .npz or image folder")
    parser.add_argument("--inception-weights", default=None, help="local Inception weights (offline machines)")
    parser.add_argument("--batch-size", type=int, default=100, help="images per network pass")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--output", default=None, help="write the results as JSON to this file")
    args = parser.parse_args(argv)
    results = evaluate_npz(args.samples, args.reference, args.inception_weights, batch_size=args.batch_size,
                           device=args.device)
    text = json.dumps(results, indent=2, sort_keys=True)
    if args.output:
        atomic_write_text(args.output, text + "\n")
    print(text)
