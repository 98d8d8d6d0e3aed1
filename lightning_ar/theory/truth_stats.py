"""Ground-truth errors of several runs (seeds) stacked per AR step, their bootstrap statistics, and storage.

An *arm* is one way of producing the tokens of every AR step (generated context, teacher-forced context, oracle
conditions, exact samples, an injected control), scored by :func:`~lightning_ar.theory.ground_truth.trace_truth`: a
list of :class:`~lightning_ar.theory.ground_truth.StepTruth` per run. Stacking the runs of the seeds gives
``[S, N]`` arrays per step; every statistic below is evaluated on :class:`~lightning_ar.theory.bootstrap.Replicates`,
so comparisons between arms of the same seeds and samples are paired.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lightning_ar.theory.bootstrap import Replicates
from lightning_ar.theory.ground_truth import StepTruth, gaussian_kl

PER_SAMPLE = ("excess_joint", "excess_token", "parallel", "parallel_floor")
POOLED = ("kl", "kl_mean", "kl_cov", "dispersion", "min_eig", "max_eig")
METRICS = PER_SAMPLE + POOLED


@dataclass
class StackedStep(StepTruth):
    """One AR step of one arm over ``S`` seeds of ``N`` samples (the fields of ``StepTruth``, each with a leading seed
    axis: ``[S, N, ...]``)."""

    def subset(self, count: int) -> StackedStep:
        """The first ``count`` samples of every seed."""
        return StackedStep(self.num_tokens, *(getattr(self, f.name)[:, :count] for f in fields(self)[1:]))


def stack(runs: Sequence[Sequence[StepTruth]]) -> list[StackedStep]:
    """Per-seed lists of steps (same steps, same sample count) -> one :class:`StackedStep` per step."""
    out = []
    for steps in zip(*runs):
        out.append(StackedStep(steps[0].num_tokens, *(torch.stack([getattr(s, f.name).cpu().double() for s in steps])
                                                      for f in fields(StackedStep)[1:])))
    return out


def step_metric(step: StackedStep, name: str, reps: Replicates) -> Tensor:
    """``[R]`` one metric of one step: a per-sample mean (``PER_SAMPLE``) or of the pooled whitened residuals."""
    if name in PER_SAMPLE:
        return reps.mean(getattr(step, name))
    if name not in POOLED:
        raise ValueError(f"metric must be one of {METRICS}, got {name!r}")
    count = step.res_sum.shape[1] * step.num_tokens
    kl = gaussian_kl(reps.sums(step.res_sum), reps.sums(step.res_outer), count)  # (R, S) each
    return kl[name].mean(dim=1)


def arm_metric(arm: Sequence[StackedStep], name: str, reps: Replicates, steps: Sequence[int] | None = None) -> Tensor:
    """``[R]`` a metric averaged over ``steps`` (default all) of an arm."""
    chosen = range(len(arm)) if steps is None else steps
    return torch.stack([step_metric(arm[k], name, reps) for k in chosen]).mean(dim=0)


def sequence_excess(arm: Sequence[StackedStep], reps: Replicates) -> Tensor:
    """``[R]`` sequence excess NLL per dimension: the chain-rule sum of the steps' joint excesses, each weighted by its
    share of the tokens."""
    seq_len = sum(s.num_tokens for s in arm)
    return sum(reps.mean(s.excess_joint) * s.num_tokens for s in arm) / seq_len


def save_arms(path: str | Path, arms: dict[str, Sequence[StepTruth]]) -> None:
    """Write the per-sample arrays of named arms (one run) to an ``.npz`` (atomically)."""
    arrays = {}
    for name, steps in arms.items():
        for k, s in enumerate(steps):
            arrays[f"{name}/{k}/num_tokens"] = np.asarray(s.num_tokens)
            for f in fields(StepTruth)[1:]:
                arrays[f"{name}/{k}/{f.name}"] = getattr(s, f.name).cpu().double().numpy()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


def load_arms(path: str | Path) -> dict[str, list[StepTruth]]:
    """Read :func:`save_arms`' file back."""
    data = np.load(path)
    arms: dict[str, dict[int, dict]] = {}
    for key in data.files:
        name, k, field = key.rsplit("/", 2)
        arms.setdefault(name, {}).setdefault(int(k), {})[field] = data[key]
    out = {}
    for name, steps in arms.items():
        out[name] = [StepTruth(int(v["num_tokens"]), *(torch.from_numpy(v[f.name]) for f in fields(StepTruth)[1:]))
                     for _, v in sorted(steps.items())]
    return out
