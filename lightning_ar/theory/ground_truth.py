"""Ground-truth condition errors on ``gmm``: per AR step, how far generated tokens are from the exact conditional.

For AR step ``k`` of a sample, the step's ``n`` tokens ``X_P`` are compared with the *exact* conditional of those
positions given the context the sampler actually used (the tokens revealed before step ``k``), which the ``gmm``
source gives in closed form (:meth:`~lightning_ar.data.sources.GMMSource.conditional`). Per sample and step:

- ``excess_joint``: ``-log p(X_P | context) - H(X_P | context)`` in nats per dimension of the step (``n * D``). It is
  ``(q - nD) / (2 nD)`` with ``q`` the joint Mahalanobis form, 0 in expectation for exact joint samples, and by the
  chain rule the per-step terms, weighted by ``n_k / L``, sum to the sequence's ``-log p(X) - H`` per dimension.
- ``excess_token``: the same with each token scored under its own conditional (ignoring the correlations within the
  step): ``(sum_i |r_i|^2 - nD) / (2 nD)`` with ``r_i`` the whitened residuals. 0 in expectation for any sampler
  whose tokens follow their exact per-token conditionals.
- ``parallel = excess_joint - excess_token``: the parallel-decoding part. A sampler that draws a step's tokens
  independently given the context (MAR's head) pays ``parallel_floor`` even when each token is exact; no per-token
  condition change can remove it.
- whitened residuals ``r_i`` (``N(0, I)`` for exact per-token samples), kept as per-sample sums ``sum r`` and
  ``sum r r^T``, from which :func:`gaussian_kl` gives the Gaussian KL of their pooled mean and covariance to
  ``N(0, I)``: two-sided (over- and under-dispersion both raise it), with a finite-sample floor that the same
  estimator reaches on exact samples of the same count.

Everything is in the source's unscaled space (divide the sampler's tokens by the data's ``latent_scale``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_ar.data.sources import GMMSource
from lightning_ar.nn.masking import cosine_schedule, random_orders
from lightning_ar.nn.trace import GenerationTrace


@dataclass
class StepTruth:
    """Per-sample ground-truth errors of one AR step (``B`` samples, ``n`` tokens each, token dimension ``D``).

    Attributes:
        num_tokens: ``n``.
        excess_joint: ``[B]`` joint excess NLL, nats per dimension of the step.
        excess_token: ``[B]`` per-token excess NLL, nats per dimension of the step.
        parallel_floor: ``[B]`` expected ``excess_joint`` of exact independent per-token draws, nats per dimension.
        res_sum: ``[B, D]`` sum of the whitened residuals of the sample's ``n`` tokens.
        res_outer: ``[B, D, D]`` sum of their outer products.
    """

    num_tokens: int
    excess_joint: Tensor
    excess_token: Tensor
    parallel_floor: Tensor
    res_sum: Tensor
    res_outer: Tensor

    @property
    def parallel(self) -> Tensor:
        """``[B]`` joint minus per-token excess (the parallel-decoding part)."""
        return self.excess_joint - self.excess_token


def step_truth(source: GMMSource, context: Tensor, revealed: Tensor, labels: Tensor, positions: Tensor,
               tokens: Tensor) -> StepTruth:
    """Ground-truth errors of the tokens of one AR step.

    Args:
        source: The gmm source.
        context: ``[B, L, D]`` sequences holding the context values (unscaled; only revealed positions are read).
        revealed: ``[B, L]`` bool, the context of the step.
        labels: ``[B]`` classes.
        positions: ``[B, n]`` positions predicted at the step.
        tokens: ``[B, n, D]`` the step's tokens (unscaled).

    Returns:
        :class:`StepTruth` (float64, on ``context``'s device).
    """
    cond = source.conditional(context, revealed, labels)
    n, d = positions.shape[1], tokens.shape[-1]
    white = cond.whiten(tokens, positions)  # (B, n, D)
    joint = 0.5 * (cond.joint_quadratic(tokens, positions) - n * d) / (n * d)
    token = 0.5 * (white.square().sum(dim=(1, 2)) - n * d) / (n * d)
    floor = cond.parallel_floor(positions) / (n * d)
    outer = torch.einsum("bni,bnj->bij", white, white)
    return StepTruth(n, joint, token, floor, white.sum(dim=1), outer)


def trace_truth(source: GMMSource, trace: GenerationTrace, latent_scale: float = 1.0,
                context: Tensor | None = None) -> list[StepTruth]:
    """:func:`step_truth` of every step of a trace, the context of step ``k`` being the trace's own tokens of the
    steps before ``k`` (generated context), or those positions of ``context`` ``[B, L, D]`` (e.g. real sequences,
    for teacher forcing). Token values are divided by ``latent_scale`` (the sampler works in scaled space)."""
    labels = torch.as_tensor(trace.labels)
    seq = (trace.sequence() if context is None else context).double() / latent_scale
    out = []
    for k, rec in enumerate(trace.steps):
        revealed = trace.revealed_before(k).to(seq.device)
        tokens = rec.tokens.to(seq.device).double() / latent_scale
        out.append(step_truth(source, seq, revealed, labels.to(seq.device), rec.positions.to(seq.device), tokens))
    return out


def gaussian_kl(res_sum: Tensor, res_outer: Tensor, count: Tensor | float) -> dict[str, Tensor]:
    """Gaussian KL of pooled whitened residuals to ``N(0, I)``, from their sums.

    ``KL(N(m, C) || N(0, I)) = (tr C + |m|^2 - D - log det C) / 2`` with ``m`` and ``C`` (maximum-likelihood) the
    residuals' mean and covariance, split into ``kl_mean = |m|^2 / 2`` and ``kl_cov`` (the rest); ``dispersion`` is
    ``tr C / D`` (1 for exact samples, > 1 over-, < 1 under-dispersed). Leading batch dimensions (e.g. bootstrap
    replicates) are kept. ``min_eig`` / ``max_eig`` are the extreme eigenvalues of ``C`` (1 for exact samples; a
    direction below 1 is under-dispersed, e.g. by a refinement that collapses conditions).

    Args:
        res_sum: ``[..., D]`` sum of the residuals.
        res_outer: ``[..., D, D]`` sum of their outer products.
        count: Number of residual vectors (scalar or ``[...]``).

    Returns:
        ``kl``, ``kl_mean``, ``kl_cov``, ``dispersion``, ``min_eig``, ``max_eig``, each ``[...]``.
    """
    count = torch.as_tensor(count, dtype=res_sum.dtype, device=res_sum.device)
    mean = res_sum / count[..., None]
    cov = res_outer / count[..., None, None] - mean[..., :, None] * mean[..., None, :]
    d = res_sum.shape[-1]
    trace = cov.diagonal(dim1=-2, dim2=-1).sum(-1)
    kl_mean = 0.5 * mean.square().sum(-1)
    kl_cov = 0.5 * (trace - d - torch.linalg.slogdet(cov)[1])
    eig = torch.linalg.eigvalsh(cov)  # (..., D) ascending
    return {"kl": kl_mean + kl_cov, "kl_mean": kl_mean, "kl_cov": kl_cov, "dispersion": trace / d,
            "min_eig": eig[..., 0], "max_eig": eig[..., -1]}


def sequence_excess(steps: list[StepTruth], dim: int) -> Tensor:
    """``[B]`` sequence excess NLL (``-log p(X) - H``) in nats per dimension, from the per-step joint terms (the chain
    rule: each step's per-dimension excess weighted by its share ``n_k D / (L D)``). ``dim`` is ``L * D``."""
    token_dim = steps[0].res_sum.shape[-1]
    return sum(s.excess_joint * (s.num_tokens * token_dim) for s in steps) / dim


def exact_trace(source: GMMSource, labels: Tensor, step_positions: list[Tensor], generator: torch.Generator,
                joint: bool = True, latent_scale: float = 1.0, context: Tensor | None = None) -> GenerationTrace:
    """A trace whose tokens are exact conditional samples: what a perfect model would produce.

    Step ``k`` draws the tokens at ``step_positions[k]`` ``[B, n_k]`` from their exact conditional given the tokens
    of the earlier steps (or, with ``context`` ``[B, L, D]`` unscaled, given those positions of ``context``: exact
    draws at a fixed context, e.g. a generated one, for floors). ``joint=False`` draws each token of a step
    independently from its own conditional (a perfect per-token sampler, like MAR's head). Tokens are stored times
    ``latent_scale``, like a sampler's.
    """
    b, seq_len = labels.shape[0], sum(int(p.shape[1]) for p in step_positions)
    seq = torch.zeros(b, seq_len, source.token_dim, dtype=torch.float64)
    revealed = torch.zeros(b, seq_len, dtype=torch.bool)
    trace = GenerationTrace(labels=labels.cpu())
    for k, positions in enumerate(step_positions):
        ctx = seq if context is None else context.double().cpu()
        cond = source.conditional(ctx, revealed, labels.cpu())
        tokens = cond.sample(positions.cpu(), generator, joint=joint)  # (B, n, D)
        seq.scatter_(1, positions.cpu()[..., None].expand(-1, -1, source.token_dim), tokens)
        revealed.scatter_(1, positions.cpu(), True)
        trace.record(k, seq_len - int(revealed[0].sum()), 1.0, positions=positions.cpu(),
                     conditions=torch.zeros(b, positions.shape[1], 0), tokens=(tokens * latent_scale).float(),
                     raw_conditions=None, null_conditions=None)
    return trace


def mar_step_positions(batch: int, seq_len: int, num_iter: int, generator: torch.Generator) -> list[Tensor]:
    """``[B, n_k]`` positions of each AR step of MAR's sampler: a random order per sample and the cosine schedule
    (the order's trailing entries are revealed first)."""
    orders = random_orders(batch, seq_len, generator)
    schedule, before, out = cosine_schedule(seq_len, num_iter), seq_len, []
    for after in schedule:
        out.append(orders[:, after:before].sort(dim=1).values)
        before = after
    return out


def entropy_per_dim(source: GMMSource) -> float:
    """Differential entropy of the source's class-conditional Gaussian in nats per dimension (``L * D``)."""
    dim = source.grid**2 * source.token_dim
    logdet = source.token_dim * torch.linalg.slogdet(source.pos_cov)[1] + source.grid**2 * torch.linalg.slogdet(
        source.dim_cov)[1]
    return float(0.5 * (dim * math.log(2 * math.pi * math.e) + logdet) / dim)
