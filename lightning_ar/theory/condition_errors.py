"""Generated vs teacher-forced vs oracle tokens of a per-token generator, as traces scored by the ground truth.

A :class:`~lightning_ar.nn.trace.GenerationTrace` of ``generate`` (GEN) fixes, per sample, the positions of every AR
step. :func:`teacher_forced_trace` samples the same positions with the model's conditions computed from a *real*
context (TF); :func:`oracle_trace` re-samples the tokens of any trace at the oracle conditions
(:mod:`lightning_ar.theory.oracle`). :func:`~lightning_ar.theory.ground_truth.trace_truth` scores each against the
exact conditional given the context it used, so ``GEN - TF`` is the error that the generated context adds (the
accumulated condition error) and ``GEN - ORACLE`` the most any condition refinement can remove.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_ar.contracts import TokenGenerator
from lightning_ar.data.sources import GMMSource
from lightning_ar.nn.diffusion_loss import DiffusionLoss
from lightning_ar.nn.sampling_options import SamplingOptions
from lightning_ar.nn.trace import GenerationTrace
from lightning_ar.theory.oracle import OracleSettings, head_loss, oracle_conditions


@dataclass
class ConditionModel:
    """What the evaluators need from a trained per-token generator (``MARGenerator``, ``CausalARGenerator``).

    Attributes:
        mar: The transformer: ``mar(tokens [B, L, Dt], mask [B, L], labels [B]) -> conditions [B, L, W]`` (label -1:
            the null class).
        head: The per-token diffusion head.
        latent_scale: The data's latent scale (tokens are sampled in scaled space).
        temperature: Sampling temperature of the head.
        sampler: Head sampler.
        num_sampling_steps: Denoising steps of the head.
    """

    mar: nn.Module
    head: DiffusionLoss
    latent_scale: float
    temperature: float = 1.0
    sampler: str = "ddpm"
    num_sampling_steps: int = 100

    @classmethod
    def from_generator(cls, module: nn.Module) -> ConditionModel:
        """The parts of a ``MARGenerator`` or ``CausalARGenerator`` (its defaults for sampling)."""
        if not isinstance(module, TokenGenerator) or not isinstance(module.head, DiffusionLoss):
            raise TypeError(f"{type(module).__name__} has no per-token transformer and head (a CDM has no AR steps)")
        hp = module.hparams
        return cls(module.mar, module.head, float(hp.latent_scale), float(hp.temperature), str(hp.sampler),
                   int(hp.num_sampling_steps))

    def conditions(self, tokens: Tensor, revealed: Tensor, labels: Tensor) -> Tensor:
        """``[B, L, W]`` conditions from the revealed tokens ``[B, L, Dt]`` (scaled)."""
        return self.mar(tokens, ~revealed, labels)

    def sample(self, z: Tensor, z_null: Tensor | None, cfg: float, generator: torch.Generator | None) -> Tensor:
        """``[N, Dt]`` tokens from conditions ``[N, W]`` (and null conditions with ``cfg != 1``)."""
        options = SamplingOptions(temperature=self.temperature, sampler=self.sampler,
                                  num_sampling_steps=self.num_sampling_steps)
        return self.head.sample(z, z_null, options, cfg=cfg, generator=generator)


def _gather(x: Tensor, positions: Tensor) -> Tensor:
    """``x`` ``[B, L, F]`` at ``positions`` ``[B, n]``: ``[B, n, F]``."""
    return x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1]))


@torch.no_grad()
def teacher_forced_trace(model: ConditionModel, real: Tensor, like: GenerationTrace,
                         generator: torch.Generator | None = None) -> GenerationTrace:
    """Sample the positions of every step of ``like`` with conditions computed from the real context.

    Args:
        model: The generator's parts (eval mode).
        real: ``[B, L, Dt]`` real sequences in the model's (scaled) token space, one per sample of ``like``.
        like: A trace of ``generate`` (its labels, positions, guidance per step).
        generator: RNG of the head's noise.

    Returns:
        A trace with ``like``'s positions, the TF conditions (and null ones under guidance) and sampled tokens.
    """
    labels = torch.as_tensor(like.labels, device=real.device)
    out = GenerationTrace(labels=labels.cpu())
    for k, rec in enumerate(like.steps):
        revealed, positions = like.revealed_before(k).to(real.device), rec.positions.to(real.device)
        b, n = positions.shape
        z = _gather(model.conditions(real, revealed, labels), positions)  # (B, n, W)
        z_null = None
        if rec.cfg != 1.0:
            z_null = _gather(model.conditions(real, revealed, torch.full_like(labels, -1)), positions)
        flat_null = z_null.reshape(b * n, -1) if z_null is not None else None
        tokens = model.sample(z.reshape(b * n, -1), flat_null, rec.cfg, generator).view(b, n, -1)
        null_cpu = z_null.cpu() if z_null is not None else None
        out.record(k, rec.num_masked_after, rec.cfg, positions=positions.cpu(), conditions=z.cpu(),
                   tokens=tokens.cpu(), raw_conditions=None, null_conditions=null_cpu)
    return out


def true_moments(source: GMMSource, trace: GenerationTrace, latent_scale: float,
                 context: Tensor | None = None) -> list[tuple[Tensor, Tensor]]:
    """Per step, the exact per-token conditional of the step's tokens in the model's scaled space: means
    ``[B, n, Dt]`` and Cholesky factors ``[B, n, Dt, Dt]`` (float64), given the trace's own earlier tokens or the
    revealed positions of ``context`` ``[B, L, Dt]`` (scaled)."""
    labels = torch.as_tensor(trace.labels)
    seq = (trace.sequence() if context is None else context.cpu()).double() / latent_scale
    chol_dim = torch.linalg.cholesky(source.dim_cov)
    out = []
    for k, rec in enumerate(trace.steps):
        cond = source.conditional(seq, trace.revealed_before(k), labels)
        mean = _gather(cond.mean, rec.positions) * latent_scale  # (B, n, Dt)
        std = cond.variance.gather(1, rec.positions).clamp_min(0).sqrt() * latent_scale  # (B, n)
        out.append((mean, std[..., None, None] * chol_dim))
    return out


def oracle_trace(model: ConditionModel, source: GMMSource, trace: GenerationTrace, settings: OracleSettings,
                 generator: torch.Generator | None = None, context: Tensor | None = None
                 ) -> tuple[GenerationTrace, list[dict[str, float]]]:
    """Re-sample every step of ``trace`` at the oracle conditions of its tokens (cfg 1).

    The oracle of a token minimises the head's loss on exact samples of the token's conditional given the trace's
    context (its own earlier tokens, or ``context`` ``[B, L, Dt]`` scaled, e.g. the real sequences of a TF trace),
    starting from the trace's condition. All steps are optimised in one batch.

    Returns:
        ``(oracle trace, per-step info)``: same positions, ``conditions`` = ``c*``; info holds the mean head loss
        at the model's and at the oracle's conditions of each step.
    """
    device = model.head.alphas_cumprod.device
    moments = true_moments(source, trace, model.latent_scale, context)
    sizes = [rec.positions.numel() for rec in trace.steps]
    z = torch.cat([rec.conditions.reshape(-1, rec.conditions.shape[-1]) for rec in trace.steps]).to(device)
    mean = torch.cat([m.reshape(-1, m.shape[-1]) for m, _ in moments]).to(device)
    chol = torch.cat([c.reshape(-1, *c.shape[-2:]) for _, c in moments]).to(device)
    best, summary = oracle_conditions(model.head, z, mean, chol, settings, generator)
    out, infos = GenerationTrace(labels=torch.as_tensor(trace.labels).cpu()), []
    for k, (rec, c_k, m_k, l_k) in enumerate(zip(trace.steps, best.split(sizes), mean.split(sizes),
                                                 chol.split(sizes))):
        with torch.no_grad():
            tokens = model.sample(c_k, None, 1.0, generator).view(rec.tokens.shape)
        infos.append(_step_losses(model.head, rec.conditions.reshape(c_k.shape).to(device), c_k, m_k, l_k,
                                  settings.draws, generator))
        out.record(k, rec.num_masked_after, 1.0, positions=rec.positions.cpu(),
                   conditions=c_k.view(*rec.positions.shape, -1).cpu(), tokens=tokens.cpu(), raw_conditions=None,
                   null_conditions=None)
    infos.append(summary)
    return out, infos


@torch.no_grad()
def _step_losses(head: DiffusionLoss, z: Tensor, c: Tensor, mean: Tensor, chol: Tensor, draws: int,
                 generator: torch.Generator | None) -> dict[str, float]:
    """Mean head loss at the model's conditions ``z`` and at the oracle's ``c`` on one common set of draws."""
    state = generator.get_state() if generator is not None else None
    before = head_loss(head, z.float(), mean.float(), chol.float(), 4 * draws, generator).mean()
    if state is not None:
        generator.set_state(state)
    after = head_loss(head, c.float(), mean.float(), chol.float(), 4 * draws, generator).mean()
    return {"loss_model": float(before), "loss_oracle": float(after)}
