"""``GenerationTrace``: the one channel through which the sampler exposes per-step internals.

Callbacks and notebooks pass a trace to ``generate``; the sampler appends one :class:`StepRecord` per AR step.
Sampling without a trace records nothing and costs nothing extra.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_ar.nn.labelled_conditions import LabelledConditions


@dataclass
class StepRecord:
    """What happened at one AR step (``n`` = tokens predicted per sample at this step).

    Attributes:
        step: AR step index ``k``.
        num_masked_after: Tokens still masked after this step.
        cfg: Guidance scale used at this step.
        positions: ``[B, n]`` token positions predicted at this step.
        conditions: ``[B, n, D]`` conditional-branch conditions given to the head (after refinement, if any).
        raw_conditions: ``[B, n, D]`` conditions before refinement (``None`` without a refiner).
        null_conditions: ``[B, n, D]`` null-class conditions (``None`` without guidance).
        tokens: ``[B, n, token_dim]`` sampled tokens.
        flow_trace: ``[K+1]`` Sinkhorn divergence to the flow's target along the inner flow (flow refinement only).
        divergence_before: Sinkhorn divergence of the produced conditions to held-out ideal ones (when measured).
        divergence_after: The same after refinement (equal to ``divergence_before`` without refinement).
        refine_seconds: Wall seconds the sampler spent in the refiner at this step (both branches; 0 without one;
            on CUDA the device is synchronised around the call, so the time is the refiner's own).
    """

    step: int
    num_masked_after: int
    cfg: float
    positions: Tensor
    conditions: Tensor
    raw_conditions: Tensor | None
    null_conditions: Tensor | None
    tokens: Tensor
    flow_trace: Tensor | None = None
    divergence_before: float | None = None
    divergence_after: float | None = None
    refine_seconds: float = 0.0


@dataclass
class GenerationTrace:
    """Per-AR-step records of one ``generate`` call.

    Attributes:
        labels: ``[B]`` class labels of the batch (set by the sampler).
        steps: One :class:`StepRecord` per AR step, in order.
        keep_on_device: Keep recorded tensors on the sampling device (default: moved to CPU).
    """

    labels: Tensor | None = None
    steps: list[StepRecord] = field(default_factory=list)
    keep_on_device: bool = False

    def _store(self, x: Tensor | None) -> Tensor | None:
        if x is None:
            return None
        x = x.detach()
        return x if self.keep_on_device else x.cpu()

    def record(self, step: int, num_masked_after: int, cfg: float, refine_seconds: float = 0.0,
               **tensors: Tensor | None) -> None:
        """Append the record of one step; ``tensors`` are the :class:`StepRecord` tensor fields."""
        stored = {name: self._store(value) for name, value in tensors.items()}
        self.steps.append(StepRecord(step=step, num_masked_after=num_masked_after, cfg=cfg,
                                     refine_seconds=refine_seconds, **stored))

    @property
    def refine_seconds(self) -> float:
        """Seconds spent in the refiner over all recorded steps."""
        return sum(rec.refine_seconds for rec in self.steps)

    @property
    def seq_len(self) -> int:
        """Tokens per sequence: the positions predicted over all recorded steps."""
        return sum(int(rec.positions.shape[1]) for rec in self.steps)

    def revealed_before(self, step: int) -> Tensor:
        """``[B, L]`` bool: the positions known when AR step ``step`` starts (predicted by the steps before it).

        With the sampler's per-step ``positions`` and ``tokens`` this is the exact context of each step, so the
        trace needs no extra record (and sampling without a trace costs nothing)."""
        rec = self.steps[0]
        revealed = torch.zeros(rec.positions.shape[0], self.seq_len, dtype=torch.bool, device=rec.positions.device)
        for earlier in self.steps[:step]:
            revealed.scatter_(1, earlier.positions, True)
        return revealed

    def sequence(self) -> Tensor:
        """``[B, L, token_dim]`` the sampled tokens of all steps in position order (the generated sequence, in the
        sampler's scaled token space); ``sequence() * revealed_before(k)`` is the context of step ``k``."""
        rec = self.steps[0]
        out = rec.tokens.new_zeros(rec.tokens.shape[0], self.seq_len, rec.tokens.shape[-1])
        for step in self.steps:
            out.scatter_(1, step.positions[..., None].expand(-1, -1, out.shape[-1]), step.tokens.to(out.dtype))
        return out

    def conditions_at(self, step: int) -> LabelledConditions:
        """Conditions, their labels and positions at ``step``, flattened: ``[B*n, D]``, ``[B*n]``, ``[B*n]``."""
        rec = self.steps[step]
        b, n = rec.positions.shape
        labels = torch.as_tensor(self.labels, device=rec.positions.device)[:, None].expand(b, n)
        return LabelledConditions(rec.conditions.reshape(b * n, -1), labels.reshape(-1), rec.positions.reshape(-1))
