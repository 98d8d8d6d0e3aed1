"""The class-wise sliced W2 on bootstrap replicates: exact value, floor on exact samples, injected errors."""

from __future__ import annotations

import pytest
import torch

from lightning_ar.theory.bootstrap import Replicates
from lightning_ar.theory.sliced_w2 import random_directions, sliced_w2


def _draw(seed: int, s: int = 2, n: int = 400, f: int = 6) -> torch.Tensor:
    return torch.randn(s, n, f, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_point_value_is_the_sorted_quantile_distance() -> None:
    """With the identity replicate, one class and one seed: sqrt(mean over directions of the mean squared difference
    of the sorted projections), computed by hand."""
    x, y = _draw(0, s=1), _draw(1, s=1)
    labels = torch.zeros(x.shape[1], dtype=torch.long)
    dirs = random_directions(x.shape[-1], 16, seed=3)
    px, py = (x[0] @ dirs).sort(dim=0).values, (y[0] @ dirs).sort(dim=0).values
    expected = (px - py).square().mean(dim=0).mean().sqrt()
    value = sliced_w2(x, y, labels, Replicates.identity(1, x.shape[1]), num_directions=16, seed=3)
    assert float(value[0]) == pytest.approx(float(expected), rel=1e-10)


@pytest.mark.parametrize("error", ["shift", "over", "under"])
def test_exact_samples_read_the_floor_and_injected_errors_read_more(error: str) -> None:
    labels = torch.arange(400) % 4
    reference, exact = _draw(1), _draw(2)
    bad = {"shift": exact + 0.4, "over": exact * 1.5, "under": exact * 0.5}[error]
    reps = Replicates.draw(2, 400, 200)
    floor = sliced_w2(exact, reference, labels, reps)
    worse = sliced_w2(bad, reference, labels, reps)
    assert float(floor.mean()) < 0.35  # finite-sample noise of 100 resampled samples per class
    diff = (worse - floor).numpy()  # paired: the same replicate weights on both
    assert (diff > 0).mean() > 0.99 and float(worse.mean()) > 1.5 * float(floor.mean())


def test_mismatched_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="sliced_w2 needs"):
        sliced_w2(_draw(0), _draw(1)[:, :10], torch.zeros(400, dtype=torch.long), Replicates.identity(2, 400))
