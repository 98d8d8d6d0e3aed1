"""Class-wise sliced Wasserstein-2 distance between generated and reference samples, on bootstrap replicates.

The sequence-level companion of the per-step ground-truth errors: for every class, both sample sets are projected on
``P`` fixed random unit directions; on each direction the 1-D W2 between the quantile functions is exact (sorted
values, evaluated at the midpoints ``(i + 0.5) / n`` of the reference's ``n`` quantiles); the class's sliced W2 is the
root of the mean squared 1-D distance, and the result is its mean over classes and seeds. On a bootstrap replicate
(:class:`~lightning_ar.theory.bootstrap.Replicates`) the generated samples carry the replicate's multinomial weights
(the same weights as every other statistic of the comparison, so differences between arms are paired) and the
reference stays fixed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_ar.seeding import seeded_generator
from lightning_ar.theory.bootstrap import Replicates


def random_directions(dim: int, count: int, seed: int = 0) -> Tensor:
    """``[dim, count]`` unit directions (float64), the same for the same seed."""
    d = torch.randn(dim, count, generator=seeded_generator(seed), dtype=torch.float64)
    return d / d.norm(dim=0, keepdim=True)


def sliced_w2(generated: Tensor, reference: Tensor, labels: Tensor, reps: Replicates, num_directions: int = 64,
              seed: int = 0) -> Tensor:
    """``[R]`` class-averaged sliced W2 of ``generated`` to ``reference`` on each replicate of ``reps``.

    Args:
        generated: ``[S, N, F]`` generated samples of ``S`` seeds (flattened sequences).
        reference: ``[S, N, F]`` reference samples (e.g. exact draws) with the same ``labels`` per seed.
        labels: ``[N]`` class of each sample index (the same in every seed and in both sets).
        reps: Replicates over ``S`` seeds and ``N`` samples (:meth:`Replicates.identity` for the point value).
        num_directions: Projections ``P``.
        seed: Seed of the directions.

    Returns:
        ``[R]`` the mean over classes and replicate slots of each class's sliced W2.
    """
    if generated.shape != reference.shape or generated.dim() != 3 or generated.shape[1] != labels.shape[0]:
        raise ValueError(f"sliced_w2 needs generated and reference [S, N, F] and labels [N], got "
                         f"{tuple(generated.shape)}, {tuple(reference.shape)}, {tuple(labels.shape)}")
    dirs = random_directions(generated.shape[-1], num_directions, seed)
    per_class = [_class_sw2(generated[:, idx].double() @ dirs, reference[:, idx].double() @ dirs, idx, reps)
                 for idx in (torch.nonzero(labels == c).flatten() for c in torch.unique(labels))]
    return torch.stack(per_class).mean(dim=0)


def _class_sw2(x: Tensor, y: Tensor, idx: Tensor, reps: Replicates) -> Tensor:
    """``[R]`` sliced W2 of one class from projections ``x``, ``y`` ``[S, n, P]`` (samples ``idx`` of ``N``)."""
    n = x.shape[1]
    x_sorted, order = x.sort(dim=1)  # (S, n, P)
    y_sorted = y.sort(dim=1).values
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    out = []
    for j in range(reps.seeds.shape[1]):
        s = reps.seeds[:, j]  # (R,)
        w = reps.weights[:, j][:, idx]  # (R, n)
        w_sorted = torch.gather(w[:, :, None].expand(-1, -1, x.shape[2]), 1, order[s])  # (R, n, P)
        cum = (w_sorted.cumsum(dim=1) / w.sum(dim=1)[:, None, None]).transpose(1, 2).contiguous()  # (R, P, n)
        k = torch.searchsorted(cum, u.expand(*cum.shape).contiguous()).clamp_max(n - 1)  # (R, P, n)
        quantiles = torch.gather(x_sorted[s].transpose(1, 2), 2, k)  # (R, P, n)
        d2 = (quantiles - y_sorted[s].transpose(1, 2)).square().mean(dim=2)  # (R, P)
        out.append(d2.mean(dim=1).sqrt())
    return torch.stack(out, dim=1).mean(dim=1)
