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

On real data no exact conditional exists. The noisy-context objective (issue 15, item 5b) uses real next tokens
instead: a real context is corrupted with the model's own tokens (:func:`corrupted_context`; each revealed token is,
with a probability, the model's draw given the real context of its own step), the condition is computed from that
context, and the head's loss at the refined condition is taken on the real tokens of the step: the refiner learns to
predict what the data does next from a context that carries the model's errors.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor, nn

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


def corrupted_context(real: Tensor, model_tokens: Tensor, revealed: Tensor, corruption: float,
                      generator: torch.Generator | None = None) -> Tensor:
    """A real context with each revealed token replaced, with probability ``corruption``, by the model's own token.

    Args:
        real: ``[B, L, Dt]`` real sequences (the sampler's scaled space).
        model_tokens: ``[B, L, Dt]`` the model's tokens at the same positions (e.g. each drawn by the model given the
            real context of its own AR step: a teacher-forced trace's ``sequence()``).
        revealed: ``[B, L]`` bool, the context.
        corruption: Probability in ``[0, 1]`` that a revealed token is the model's.
        generator: RNG of the choice (on ``real``'s device).

    Returns:
        ``[B, L, Dt]`` the corrupted sequences (unrevealed positions keep the real values; the transformer masks
        them).
    """
    if not 0.0 <= corruption <= 1.0:
        raise ValueError(f"corruption must be in [0, 1], got {corruption}")
    u = torch.rand(revealed.shape, generator=generator, device=real.device)  # (B, L)
    swap = revealed.to(real.device) & (u < corruption)
    return torch.where(swap[..., None], model_tokens.to(real.dtype), real)


class TokenModel(Protocol):
    """The generator's parts the noisy-context objective uses (``lightning_ar.theory.ConditionModel``)."""

    def conditions(self, tokens: Tensor, revealed: Tensor, labels: Tensor) -> Tensor:  # pragma: no cover - protocol
        """``[B, L, W]`` conditions from the revealed tokens ``[B, L, Dt]``."""

    def sample(self, z: Tensor, z_null: Tensor | None, cfg: float,
               generator: torch.Generator | None) -> Tensor:  # pragma: no cover - protocol
        """``[N, Dt]`` tokens from conditions ``[N, W]``."""


def _gather(x: Tensor, positions: Tensor) -> Tensor:
    """``x`` ``[B, L, F]`` at ``positions`` ``[B, n]``: ``[B, n, F]``."""
    return x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1]))


class NoisyContexts:
    """Per AR step of a trace: the conditions of a corrupted real context and the real tokens they should predict.

    The model's tokens are drawn once, step by step, each given the *real* context of its own step (with
    ``refiner`` applied to those conditions when given: on-policy); :meth:`step` then corrupts the real context of
    step ``k`` with them (:func:`corrupted_context`) and returns the conditions computed from it with the real
    tokens of the step's positions.
    """

    def __init__(self, model: TokenModel, real: Tensor, trace: GenerationTrace, corruption: float,
                 generator: torch.Generator | None = None, refiner: nn.Module | None = None) -> None:
        """Draw the model's tokens at the trace's positions.

        Args:
            model: The frozen generator's transformer and head.
            real: ``[B, L, Dt]`` real sequences (scaled), one per sample of ``trace`` (same classes).
            trace: A generation whose per-step positions (the order and schedule) are used.
            corruption: Probability that a revealed real token is replaced by the model's.
            generator: RNG of the draws and of the corruption.
            refiner: Optional ``refiner(z [N, W], labels [N], step) -> [N, W]`` applied before each draw.
        """
        self.model, self.real, self.trace, self.corruption, self.generator = model, real, trace, corruption, generator
        self.labels = torch.as_tensor(trace.labels, device=real.device)
        with torch.no_grad():
            self.model_tokens = self._draw(refiner)  # (B, L, Dt)

    def _where(self, step: int) -> tuple[Tensor, Tensor]:
        rec = self.trace.steps[step]
        return self.trace.revealed_before(step).to(self.real.device), rec.positions.to(self.real.device)

    def _draw(self, refiner: nn.Module | None) -> Tensor:
        seq = torch.zeros_like(self.real)
        for k in range(len(self.trace.steps)):
            revealed, positions = self._where(k)
            b, n = positions.shape
            z = _gather(self.model.conditions(self.real, revealed, self.labels), positions).reshape(b * n, -1)
            if refiner is not None:
                z = refiner(z, self.labels[:, None].expand(b, n).reshape(-1), k)
            tokens = self.model.sample(z, None, 1.0, self.generator).view(b, n, -1)
            seq.scatter_(1, positions[..., None].expand(-1, -1, seq.shape[-1]), tokens.to(seq.dtype))
        return seq

    def step(self, step: int) -> tuple[Tensor, Tensor]:
        """``([B * n, W], [B * n, Dt])``: conditions of AR step ``step`` from its corrupted real context (no
        gradient) and the real tokens at its positions, in the order of :meth:`GenerationTrace.conditions_at`."""
        revealed, positions = self._where(step)
        b, n = positions.shape
        context = corrupted_context(self.real, self.model_tokens, revealed, self.corruption, self.generator)
        with torch.no_grad():
            z = _gather(self.model.conditions(context, revealed, self.labels), positions).reshape(b * n, -1)
        return z, _gather(self.real, positions).reshape(b * n, -1)
