"""Evaluator of generated GMM sequences: exact likelihood, Bayes-classifier accuracy and sliced Wasserstein distance."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_ar.data.sources import GMMSource
from lightning_ar.metrics.base import SampleEvaluator
from lightning_ar.seeding import seeded_generator


class SampleStore(Metric):
    """Keeps every added latent ``[B, D, g, g]`` and label ``[B]``; gathered across processes by ``compute``."""

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("latents", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, latents: Tensor, labels: Tensor) -> None:
        """Add latents ``[B, D, g, g]`` and labels ``[B]``."""
        self.latents.append(latents)
        self.labels.append(labels)

    def compute(self) -> tuple[Tensor, Tensor]:
        """All latents ``[N, D, g, g]`` and labels ``[N]`` added since the last reset."""
        if isinstance(self.latents, list) and not self.latents:
            raise RuntimeError("GMMEvaluator has no generated samples: call update before compute")
        return dim_zero_cat(self.latents), dim_zero_cat(self.labels)


def _quantiles(values: Tensor, count: int) -> Tensor:
    """``count`` quantiles ``[count, P]`` of each column of ``values`` ``[N, P]`` at levels ``(i + 0.5) / count``.

    With ``N == count`` these are the sorted values (the exact empirical quantiles); otherwise linear interpolation.
    """
    if values.shape[0] == count:
        return values.sort(dim=0).values
    levels = (torch.arange(count, dtype=values.dtype, device=values.device) + 0.5) / count  # (count,)
    return torch.quantile(values, levels, dim=0)  # (count, P)


def sliced_wasserstein(x: Tensor, y: Tensor, projections: Tensor) -> Tensor:
    """Sliced Wasserstein-2 distance between samples ``x`` ``[N, F]`` and ``y`` ``[M, F]``.

    Both sets are projected on unit directions ``projections`` ``[P, F]``; the 1-D W2 distances are compared at
    ``max(N, M)`` matched quantile levels, so that the set sizes may differ. Returns a scalar:
    ``sqrt(mean over projections of W2^2)``.
    """
    count = max(x.shape[0], y.shape[0])
    qx = _quantiles(x @ projections.T, count)  # (Q, P)
    qy = _quantiles(y @ projections.T, count)  # (Q, P)
    return (qx - qy).square().mean().sqrt()


class GMMEvaluator(SampleEvaluator):
    """Scores generated GMM latents ``[B, D, g, g]`` with the source's known distribution.

    Metrics: ``nll``, the mean exact negative log-likelihood under the true class-conditional Gaussian in nats per
    dimension (``L * D`` dimensions; the floor is the entropy per dimension); ``cond_acc``, the fraction that the
    Bayes classifier (argmax of the class log-densities) assigns to their conditioning label; ``swd``, the sliced
    Wasserstein-2 distance to the ``test`` split in data space (flattened sequences), per class and averaged over the
    classes that were generated. :meth:`reference` gives the same metrics for fresh exact samples with the test
    split's class counts. ``swd`` shrinks with more samples; compare it with the floor at a similar count.

    Args:
        source: The GMM source (default ``GMMSource()``).
        num_projections: Random directions of the sliced Wasserstein distance.
        seed: Seed of the directions and of the reference's exact samples.
    """

    def __init__(self, source: GMMSource | None = None, num_projections: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.source = source if source is not None else GMMSource()
        self.samples = SampleStore()
        dim = self.source.grid**2 * self.source.token_dim
        gen = seeded_generator(seed)
        directions = torch.randn(num_projections, dim, generator=gen, dtype=torch.float64)
        self._projections = directions / directions.norm(dim=1, keepdim=True)  # (P, L*D)
        self._seed = seed
        self._floors: dict[str, float] = {}

    def prepare(self, device: torch.device | str) -> None:
        """Compute the floors once (exact samples vs the test split) and move the sample store to ``device``."""
        if not self._floors:
            test, test_labels = self.source.split("test")
            gen = seeded_generator(self._seed, 1)
            exact = self.source.sample(test_labels, generator=gen)  # (N, D, g, g)
            self._floors = {f"{k}_floor": v for k, v in self._scores(exact, test_labels).items()}
        self.to(device)

    def _scores(self, latents: Tensor, labels: Tensor) -> dict[str, float]:
        """``nll`` (nats/dim), ``cond_acc`` and ``swd`` of latents ``[N, D, g, g]`` generated for ``labels`` ``[N]``."""
        dim = latents[0].numel()
        nll = -self.source.log_prob(latents, labels).mean() / dim
        acc = (self.source.class_log_probs(latents).argmax(-1) == labels.to(latents.device)).double().mean()
        return {"nll": float(nll), "cond_acc": float(acc), "swd": self._class_swd(latents, labels)}

    def _class_swd(self, latents: Tensor, labels: Tensor) -> float:
        """Sliced W2 to the test split, per class present in ``labels`` ``[N]``, averaged over those classes."""
        test, test_labels = self.source.split("test")
        gen = self.source.to_tokens(latents.double()).flatten(1).cpu()  # (N, L*D); small, so on the CPU
        real = self.source.to_tokens(test.double()).flatten(1)  # (M, L*D)
        labels = labels.cpu()
        dists = [
            sliced_wasserstein(gen[labels == c], real[test_labels == c], self._projections)
            for c in labels.unique().tolist()
        ]
        return float(torch.stack(dists).mean())

    def _check_inputs(self, latents: Tensor, labels: Tensor) -> None:
        shape = self.source.latent_shape
        if latents.ndim != 4 or tuple(latents.shape[1:]) != shape:
            raise ValueError(
                f"GMMEvaluator expects latents [B, {', '.join(map(str, shape))}], got {tuple(latents.shape)}"
            )
        if labels.shape != latents.shape[:1]:
            raise ValueError(f"GMMEvaluator expects labels [B] with B={latents.shape[0]}, got {tuple(labels.shape)}")

    @torch.no_grad()
    def update(self, latents: Tensor, labels: Tensor) -> None:
        """Add generated latents ``[B, D, g, g]`` conditioned on ``labels`` ``[B]``."""
        if not self._floors:
            raise RuntimeError("GMMEvaluator is not prepared: call prepare(device) before update/compute/reference")
        self._check_inputs(latents, labels)
        device = self.samples.device
        self.samples.update(latents.detach().to(device, torch.float32), labels.to(device, torch.long))

    @torch.no_grad()
    def compute(self) -> dict[str, float]:
        """``nll``, ``cond_acc`` and ``swd`` of the samples added since the last :meth:`reset`."""
        latents, labels = self.samples.compute()
        return self._scores(latents, labels)

    def reference(self) -> dict[str, float]:
        """``nll_floor``, ``cond_acc_floor`` and ``swd_floor`` of exact samples against the test split."""
        if not self._floors:
            raise RuntimeError("GMMEvaluator is not prepared: call prepare(device) before update/compute/reference")
        return dict(self._floors)

    def reset(self) -> None:
        """Forget the generated samples."""
        self.samples.reset()
