"""Pooled condition statistics per AR step: divergence to held-out ideal conditions beside the dispersion ratio, and
the verdict on a refinement, which can fail.

What the divergence measures: the class- and position-aware Sinkhorn divergence of the produced conditions of an AR
step (pooled over several generation batches) to held-out ideal (teacher-forced, real-context) conditions, at a blur
of :data:`BLUR_FRACTION` times the within-group spread of the ideal conditions. With a few conditions per (class,
position) group, even error-free conditions stay far from zero (each group's finite samples must be matched), and
shrinking every condition toward its group mean *lowers* it: the divergence alone rewards collapse. Hence the pooled
within-group dispersion ratio (:mod:`lightning_ar.theory.dispersion`) beside it, and the pre-registered rule of
:func:`refinement_verdict`: a lower divergence counts as an improvement only when its paired bootstrap CI excludes zero
**and** the refined conditions' dispersion ratio stays within ``[0.9, 1.1]``; a lower divergence with a ratio below
0.9 is collapse.

Plain torch/NumPy; no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor

from lightning_ar.nn.trace import GenerationTrace
from lightning_ar.seeding import seeded_generator
from lightning_ar.theory.dispersion import DispersionRatio, dispersion_ratio, pooled_dispersion, ratio_state
from lightning_ar.theory.grouped_sinkhorn import group_clouds, grouped_divergence
from lightning_ar.theory.stats import HOLDS, UNMEASURABLE, UNRESOLVED, PairedComparison, half_sample_ci, verdict

BLUR_FRACTION = 0.25  # measurement blur / within-group spread of the ideal conditions (below the spread)
SCALING = 0.5


@dataclass
class StepPool:
    """Conditions of one AR step pooled over generation batches (``N`` = images x tokens of the step).

    Attributes:
        raw: ``[N, D]`` conditions before refinement (equal to ``refined`` without a refiner).
        refined: ``[N, D]`` conditions given to the head.
        labels: ``[N]`` class labels.
        positions: ``[N]`` token positions.
        clusters: ``[N]`` index of the generated image each condition belongs to (over all batches).
    """

    raw: Tensor
    refined: Tensor
    labels: Tensor
    positions: Tensor
    clusters: Tensor


def pool_steps(traces: Sequence[GenerationTrace]) -> list[StepPool]:
    """Pool the conditions of every AR step over ``traces`` (one per generation batch, same step count)."""
    pools, offset = [[] for _ in traces[0].steps], 0
    for trace in traces:
        for k, rec in enumerate(trace.steps):
            z, labels, positions = trace.conditions_at(k)
            raw = rec.raw_conditions.reshape(z.shape) if rec.raw_conditions is not None else z
            images = offset + torch.arange(rec.positions.shape[0])[:, None].expand(rec.positions.shape).reshape(-1)
            pools[k].append((raw, z, labels, positions, images))
        offset += int(trace.steps[0].positions.shape[0])
    return [StepPool(*(torch.cat([p[i].cpu() for p in parts]) for i in range(5))) for parts in pools]


def measurement_blur(ref: Tensor, ref_groups: Tensor, fraction: float = BLUR_FRACTION) -> float:
    """``fraction`` times the within-group spread (``sqrt`` of the pooled dispersion) of ideal conditions
    ``ref`` ``[M, D]``; without within-group variation (AR step 0) ``1e-3`` times their RMS norm."""
    spread = pooled_dispersion(ref, ref_groups).value
    if math.isfinite(spread) and spread > 1e-10 * float(ref.double().pow(2).sum(1).mean()):
        return fraction * math.sqrt(spread)
    return 1e-3 * max(float(ref.double().pow(2).sum(1).mean().sqrt()), 1e-12)


@dataclass
class StepStatistics:
    """Statistics of one AR step (see the module docstring).

    Attributes:
        step: AR step.
        num_conditions: Produced conditions pooled.
        trivial: The ideal conditions have no within-group variation (e.g. step 0: nothing revealed); no divergence
            or ratio is measured.
        blur: Measurement blur.
        divergence_before: Divergence of the raw conditions to the held-out ideal ones.
        divergence_after: The same for the refined conditions.
        ratio_before: :class:`DispersionRatio` of the raw conditions (dict).
        ratio_after: Of the refined conditions (dict).
    """

    step: int
    num_conditions: int
    trivial: bool
    blur: float = math.nan
    divergence_before: float = math.nan
    divergence_after: float = math.nan
    ratio_before: dict = field(default_factory=dict)
    ratio_after: dict = field(default_factory=dict)


def refinement_verdict(reduction: PairedComparison | None, ratio_after: float) -> str:
    """Pre-registered verdict on "the refinement lowers the divergence to held-out ideal conditions".

    ``holds`` only when the CI of ``after - before`` lies below zero **and** the refined conditions' dispersion ratio
    is within ``[0.9, 1.1]``; ``collapse`` when it lies below zero with the ratio below 0.9; ``over-dispersion``
    above 1.1; ``does not hold`` when the CI lies above zero; ``not resolved`` when it covers zero; ``not measurable``
    without a comparison.
    """
    if reduction is None or reduction.verdict == UNMEASURABLE:
        return UNMEASURABLE
    if reduction.verdict != HOLDS:
        return reduction.verdict
    return {"consistent": HOLDS, "collapsed": "collapse", "over-dispersed": "over-dispersion"}.get(
        ratio_state(ratio_after), UNRESOLVED)


def _step(pool: StepPool, ref: tuple[Tensor, Tensor, Tensor], seq_len: int, counts: Tensor | None,
          blur_fraction: float) -> tuple[StepStatistics, Tensor | None]:
    """Point statistics of one step and, with half-sample weights ``counts`` ``[R, images]``, the ``[2, R]``
    replicate divergences (before, after)."""
    ref_z, ref_labels, ref_positions = ref
    groups, ref_groups = pool.labels * seq_len + pool.positions, ref_labels * seq_len + ref_positions
    spread = pooled_dispersion(ref_z, ref_groups)
    scale = float(ref_z.double().pow(2).sum(1).mean())
    if not (math.isfinite(spread.value) and spread.value > 1e-10 * max(scale, 1e-300)):
        return StepStatistics(0, len(pool.raw), True), None
    blur = blur_fraction * math.sqrt(spread.value)
    ratios: list[DispersionRatio] = [dispersion_ratio(z, groups, ref_z, ref_groups, pool.clusters)
                                     for z in (pool.raw, pool.refined)]
    weights = torch.ones(1, len(pool.raw)) if counts is None else torch.cat([torch.ones(1, len(pool.raw)),
                                                                             counts[:, pool.clusters]])  # (1+R, N)
    values = []
    for z in (pool.raw, pool.refined):
        clouds = group_clouds(z, groups, ref_z, ref_groups)
        values.append(torch.cat([grouped_divergence(clouds, w, blur, SCALING) for w in weights.split(64)]))  # (1+R,)
    stats = StepStatistics(0, len(pool.raw), False, blur, float(values[0][0]), float(values[1][0]),
                           ratios[0].to_dict(), ratios[1].to_dict())
    return stats, None if counts is None else torch.stack([v[1:] for v in values])


def half_sample_weights(num_images: int, reps: int, seed: int = 0) -> Tensor:
    """``[R, num_images]`` 0/1 weights: each row keeps a random half of the images (without replacement, seeded).

    The resampling of the divergence statistics (:func:`~lightning_ar.theory.stats.half_sample_ci`): a divergence of
    a few conditions per group depends on each group's count, which with-replacement duplicates would change.
    """
    gen = seeded_generator(seed)
    rows = torch.zeros(reps, num_images, dtype=torch.float64)
    for r in range(reps):
        rows[r, torch.randperm(num_images, generator=gen)[: max(num_images // 2, 1)]] = 1.0
    return rows


def divergence_replicates(pool: StepPool, ref: tuple[Tensor, Tensor, Tensor], seq_len: int, counts: Tensor,
                          which: str = "refined", blur_fraction: float = BLUR_FRACTION) -> np.ndarray:
    """``[1 + R]`` divergence of ``pool``'s ``which`` conditions to ``ref`` (all images first, then one value per
    row of image weights ``counts`` ``[R, images]``, e.g. :func:`half_sample_weights`), at the measurement blur of
    the ideal conditions."""
    ref_z, ref_labels, ref_positions = ref
    ref_groups = ref_labels * seq_len + ref_positions
    blur = measurement_blur(ref_z, ref_groups, blur_fraction)
    clouds = group_clouds(getattr(pool, which), pool.labels * seq_len + pool.positions, ref_z, ref_groups)
    weights = torch.cat([torch.ones(1, len(pool.raw)), counts[:, pool.clusters]])
    return torch.cat([grouped_divergence(clouds, w, blur, SCALING) for w in weights.split(64)]).numpy()


def _pooled_ratio(pools: list[StepPool], refs: list, seq_len: int, steps: list[int], which: str) -> dict:
    """Dispersion ratio pooled over ``steps`` (step-specific groups)."""
    if not steps:
        return DispersionRatio(math.nan, math.nan, {}, {}, UNMEASURABLE).to_dict()
    g = [pools[k].labels * seq_len + pools[k].positions + k * 10**9 for k in steps]
    rg = [refs[k][1] * seq_len + refs[k][2] + k * 10**9 for k in steps]
    z = torch.cat([getattr(pools[k], which) for k in steps])
    return dispersion_ratio(z, torch.cat(g), torch.cat([refs[k][0] for k in steps]), torch.cat(rg),
                            torch.cat([pools[k].clusters for k in steps])).to_dict()


def condition_statistics(pools: list[StepPool], refs: list[tuple[Tensor, Tensor, Tensor]], seq_len: int,
                         refined: bool, reps: int = 200, seed: int = 0,
                         blur_fraction: float = BLUR_FRACTION) -> dict:
    """Per-step divergences and dispersion ratios, the paired reduction and the verdict of one refinement mode.

    Args:
        pools: Per AR step the pooled produced conditions (:func:`pool_steps`).
        refs: Per AR step the held-out ideal conditions ``(z [M, D], labels [M], positions [M])``.
        seq_len: Token positions (group ids are ``label * seq_len + position``).
        refined: Whether the mode refines (else ``before == after`` and no reduction is tested).
        reps: Half-sample replicates (random halves of the generated images, paired: the same half before and after;
            :func:`~lightning_ar.theory.stats.half_sample_ci`).
        seed: Bootstrap seed.
        blur_fraction: Measurement blur over the ideal conditions' within-group spread, per step.

    Returns:
        ``steps`` (:class:`StepStatistics` dicts), ``reduction`` (``sum_k after_k - sum_k before_k`` with its
        half-sample bootstrap CI,
        a :class:`PairedComparison` dict, or ``None``), ``ratio_before``/``ratio_after`` pooled over the non-trivial
        steps, and ``verdict`` (:func:`refinement_verdict`).
    """
    num_images = int(max(int(p.clusters.max()) for p in pools)) + 1
    counts = half_sample_weights(num_images, reps, seed) if refined else None
    results = [_step(pool, ref, seq_len, counts, blur_fraction) for pool, ref in zip(pools, refs, strict=True)]
    for k, (st, _) in enumerate(results):
        st.step = k
    steps = [k for k, (st, _) in enumerate(results) if not st.trivial]
    out = {"steps": [asdict(st) for st, _ in results], "reduction": None,
           "ratio_before": _pooled_ratio(pools, refs, seq_len, steps, "raw"),
           "ratio_after": _pooled_ratio(pools, refs, seq_len, steps, "refined"), "blur_fraction": blur_fraction}
    if refined and steps:
        before = sum(results[k][0].divergence_before for k in steps)
        after = sum(results[k][0].divergence_after for k in steps)
        reps_diff = sum(results[k][1][1] - results[k][1][0] for k in steps).numpy()  # (R,)
        low, high = half_sample_ci(after - before, reps_diff)
        out["reduction"] = PairedComparison(after - before, low, high, num_images,
                                            verdict(low, high, "negative")).to_dict()
        out["relative_reduction"] = 1.0 - after / before if before > 0 else math.nan
    reduction = PairedComparison(**out["reduction"]) if out["reduction"] else None
    out["verdict"] = refinement_verdict(reduction, out["ratio_after"]["ratio"]) if refined else "no refinement"
    return out


def summary_numbers(stats: dict) -> dict[str, float]:
    """Scalar summary for logging: mean divergences, pooled ratios, reduction and its CI."""
    steps = [s for s in stats["steps"] if not s["trivial"]]
    red = stats.get("reduction") or {}
    return {"before_mean": float(np.mean([s["divergence_before"] for s in steps])) if steps else math.nan,
            "after_mean": float(np.mean([s["divergence_after"] for s in steps])) if steps else math.nan,
            "ratio_before": stats["ratio_before"]["ratio"], "ratio_after": stats["ratio_after"]["ratio"],
            "reduction": stats.get("relative_reduction", math.nan), "reduction_low": red.get("low", math.nan),
            "reduction_high": red.get("high", math.nan)}
