"""One trained gmm model through every ground-truth instrument: the arms of :mod:`lightning_ar.theory.truth_stats`.

:func:`evaluate_generator` (MAR or causal AR) samples ``num_samples`` sequences for balanced labels and scores
per AR step the arms ``gen`` (generated context), ``tf`` (the same positions with real context), ``exact_gen`` /
``exact_tf`` (exact per-token draws at those contexts: the finite-sample floors of the pooled statistics) and, on the
first ``oracle_samples`` samples, ``oracle`` (the head sampled at the oracle conditions given the generated context);
it also returns the Theorem 2 norms against truth. :func:`evaluate_cdm` scores the CDM's single step.
:func:`evaluate_controls` runs the injected controls (:mod:`lightning_ar.nn.controls`) against a clean run with the
same generator seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_ar.contracts import Generator
from lightning_ar.data.sources import GMMSource
from lightning_ar.nn.controls import ConditionStats, ContextShuffle, Dispersion, MeanBias
from lightning_ar.nn.sampler import ConditionRefiner
from lightning_ar.nn.trace import GenerationTrace
from lightning_ar.seeding import seeded_generator
from lightning_ar.theory.condition_errors import ConditionModel, oracle_trace, teacher_forced_trace
from lightning_ar.theory.ground_truth import StepTruth, exact_trace, trace_truth
from lightning_ar.theory.oracle import OracleSettings
from lightning_ar.theory.score_truth import score_truth

Arms = dict[str, list[StepTruth]]


@dataclass
class TruthSettings:
    """Budget and seeds of one evaluation.

    Attributes:
        num_samples: Generated sequences (labels ``arange(N) % num_classes``).
        oracle_samples: Of those, how many get the oracle conditions (the costly part).
        oracle: Oracle search options.
        timesteps: Diffusion timesteps of the Theorem 2 norms.
        cfg: Guidance scale of the generation (1: the primary evaluation).
        seed: Seed of the sampling, the real sequences and the exact draws (streams ``seed``, ``seed + 1``, ...).
    """

    num_samples: int = 512
    oracle_samples: int = 64
    oracle: OracleSettings = field(default_factory=OracleSettings)
    timesteps: tuple[int, ...] = (100, 500, 900)
    cfg: float = 1.0
    seed: int = 0

    def rng(self, stream: int) -> torch.Generator:
        return seeded_generator(self.seed, stream, stride=1000)


def head_of(trace: GenerationTrace, count: int) -> GenerationTrace:
    """The first ``count`` samples of a trace."""
    out = GenerationTrace(labels=torch.as_tensor(trace.labels)[:count])
    for rec in trace.steps:
        tensors = {name: (getattr(rec, name)[:count] if getattr(rec, name) is not None else None)
                   for name in ("positions", "conditions", "raw_conditions", "null_conditions", "tokens")}
        out.record(rec.step, rec.num_masked_after, rec.cfg, **tensors)
    return out


def labels_for(source: GMMSource, count: int) -> Tensor:
    """Balanced labels ``[count]``."""
    return torch.arange(count) % source.num_classes


@torch.no_grad()
def generate_trace(module: Generator, labels: Tensor, cfg: float, generator: torch.Generator,
                   refiner: ConditionRefiner | None = None) -> GenerationTrace:
    """``module.generate`` with a trace (on the CPU)."""
    trace = GenerationTrace()
    module.generate(labels, cfg=cfg, generator=generator, trace=trace, refiner=refiner, progress=False)
    return trace


def _exact_at(source: GMMSource, trace: GenerationTrace, context: Tensor, scale: float, rng: torch.Generator
              ) -> list[StepTruth]:
    """Exact per-token draws at the positions and contexts of ``trace`` (``context`` scaled), scored."""
    positions = [rec.positions for rec in trace.steps]
    labels = torch.as_tensor(trace.labels)
    exact = exact_trace(source, labels, positions, rng, joint=False, latent_scale=scale, context=context / scale)
    return trace_truth(source, exact, scale, context=context)


def evaluate_generator(module: nn.Module, source: GMMSource, settings: TruthSettings, oracle: bool = True,
                       scores: bool = True) -> tuple[Arms, dict]:
    """All arms of one per-token generator (see the module docstring); returns ``(arms, extras)``.

    ``extras`` holds ``scores`` (:func:`~lightning_ar.theory.score_truth.score_truth` of the generated trace) and
    ``oracle_info`` (mean head loss at the model's and the oracle's conditions per step).
    """
    model = ConditionModel.from_generator(module)
    scale, labels = model.latent_scale, labels_for(source, settings.num_samples)
    gen = generate_trace(module, labels, settings.cfg, settings.rng(0))
    real = source.to_tokens(source.sample(labels, settings.rng(1))) * scale  # (N, L, D) scaled
    tf = teacher_forced_trace(model, real, gen, settings.rng(2))
    seq = gen.sequence()
    arms: Arms = {
        "gen": trace_truth(source, gen, scale),
        "tf": trace_truth(source, tf, scale, context=real),
        "exact_gen": _exact_at(source, gen, seq, scale, settings.rng(3)),
        "exact_tf": _exact_at(source, gen, real, scale, settings.rng(4)),
    }
    extras: dict = {}
    if oracle:
        sub = head_of(gen, settings.oracle_samples)
        orc, info = oracle_trace(model, source, sub, settings.oracle, settings.rng(5))
        arms["oracle"] = trace_truth(source, orc, scale, context=sub.sequence())
        extras["oracle_info"] = info
    if scores:
        extras["scores"] = score_truth(model, source, gen, settings.timesteps, settings.rng(6))
    return arms, extras


def evaluate_cdm(module: nn.Module, source: GMMSource, settings: TruthSettings) -> Arms:
    """Arms ``gen`` and ``exact_gen`` of a conditional diffusion model (one step: all tokens, no context)."""
    labels = labels_for(source, settings.num_samples)
    gen = generate_trace(module, labels, settings.cfg, settings.rng(0))
    scale = float(module.hparams.latent_scale)
    return {"gen": trace_truth(source, gen, scale),
            "exact_gen": _exact_at(source, gen, gen.sequence(), scale, settings.rng(3))}


def make_controls(module: nn.Module, source: GMMSource, settings: TruthSettings, start_step: int) -> dict:
    """The four controls of issue 14, calibrated on a clean run with another seed than the evaluation's."""
    labels = labels_for(source, settings.num_samples)
    calib = generate_trace(module, labels, settings.cfg, settings.rng(7))
    stats = ConditionStats.from_traces([calib], source.num_classes, source.grid**2)
    return {
        "bias": MeanBias(stats, start_step, scale=0.5, seed=settings.seed),
        "over": Dispersion(stats, start_step, factor=1.5),
        "under": Dispersion(stats, start_step, factor=0.5),
        "shuffle": ContextShuffle(start_step, source.grid**2, seed=settings.seed),
    }


def evaluate_controls(module: nn.Module, source: GMMSource, settings: TruthSettings, start_step: int
                      ) -> tuple[Arms, dict]:
    """Arms ``clean`` and one per control, all generated with the same seed (identical before ``start_step``).

    Returns ``(arms, info)``; ``info`` has the fraction of conditions the shuffle actually swapped.
    """
    labels = labels_for(source, settings.num_samples)
    scale = float(module.hparams.latent_scale)
    arms: Arms = {"clean": trace_truth(source, generate_trace(module, labels, settings.cfg, settings.rng(0)), scale)}
    controls = make_controls(module, source, settings, start_step)
    for name, hook in controls.items():
        arms[name] = trace_truth(source, generate_trace(module, labels, settings.cfg, settings.rng(0), hook), scale)
    shuffle = controls["shuffle"]
    return arms, {"shuffle_swapped_fraction": shuffle.swapped / max(shuffle.total, 1), "start_step": start_step}
