"""Ground-truth objective of the on-policy amortised refiner (issue 15, item 5a).

The amortised refiner ``R(c, k, y)`` can be trained against two kinds of target. The flow objective (the default of
``OTRefinement``) pulls the distribution of refined conditions toward the bank of ideal, teacher-forced ones: a
marginal match per (class, position) that cannot tell a condition which is right for its context from one that is
not. Where the exact conditional of the next tokens given the *generated* context is known (the ``gmm`` source),
the refiner can instead be trained on what the condition is for: the head's denoising loss, at the refined
condition, on exact draws of the step's tokens given the context the sampler actually produced. Minimising it over
the refiner makes the head's output at ``R(c)`` the exact conditional, the ideal the condition-error study's
``oracle`` arm searches for per sample.

On-policy (DAgger-style): the contexts come from sampling with the current refiner in the loop
(``OTRefinement(refiner_on_policy=True)``), so the refiner is trained on the contexts it will itself produce.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from lightning_ar.nn.diffusion_loss import DiffusionLoss
from lightning_ar.nn.trace import GenerationTrace


class ExactConditionals(Protocol):
    """A source with closed-form conditionals (``lightning_ar.data.sources.GMMSource``)."""

    def conditional(self, tokens: Tensor, revealed: Tensor, labels: Tensor) -> Any:  # pragma: no cover - protocol
        """The exact conditional of every token (a ``KroneckerConditional``: ``sample(positions, generator,
        joint)``)."""


def exact_step_targets(source: ExactConditionals, trace: GenerationTrace, step: int, latent_scale: float,
                       generator: torch.Generator | None = None) -> Tensor:
    """Exact draws of AR step ``step``'s tokens given the trace's own (generated) context.

    Args:
        source: The source whose ``conditional(tokens [B, L, D], revealed [B, L], labels [B])`` is exact.
        trace: A recorded generation (labels, per-step positions and tokens, in the sampler's scaled space).
        step: The AR step.
        latent_scale: The data's latent scale (the sampler's tokens are ``latent_scale`` x the source's).
        generator: RNG of the draws (on the trace's device).

    Returns:
        ``[B * n, D]`` one independent draw per predicted token from its exact per-token conditional, scaled like
        the sampler's tokens, in the order of :meth:`GenerationTrace.conditions_at`.
    """
    rec = trace.steps[step]
    seq = trace.sequence().double() / latent_scale  # (B, L, D)
    labels = torch.as_tensor(trace.labels, device=seq.device)
    cond = source.conditional(seq, trace.revealed_before(step).to(seq.device), labels)
    draws = cond.sample(rec.positions.to(seq.device), generator, joint=False)  # (B, n, D)
    return (draws * latent_scale).to(rec.tokens.dtype).reshape(-1, draws.shape[-1])


def head_denoising_loss(head: DiffusionLoss, conditions: Tensor, targets: Tensor, repeats: int = 1,
                        generator: torch.Generator | None = None) -> Tensor:
    """Mean training loss of the (frozen) diffusion ``head`` on ``targets`` ``[N, Dt]`` at ``conditions`` ``[N, D]``,
    each token scored at ``repeats`` independent noise levels; differentiable in ``conditions``. Returns a scalar."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    z, x = conditions.repeat(repeats, 1), targets.repeat(repeats, 1)  # (N*r, D), (N*r, Dt)
    return head(x, z, generator).mean()
