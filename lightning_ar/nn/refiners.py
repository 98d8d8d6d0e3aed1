"""Sampler hooks that refine the conditions of each AR step: the Sinkhorn flow, the entropic map, the amortised
refiner, the hook that fits the map on the generator's own sampling, and a chain of hooks (e.g. an injected control
followed by a refinement).

All follow :class:`~lightning_ar.nn.sampler.ConditionRefiner` and keep per-step statistics (inner-flow traces,
seconds spent) that the caller copies into a :class:`~lightning_ar.nn.trace.GenerationTrace`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from lightning_ar.nn.amortized_refiner import AmortizedRefiner
from lightning_ar.nn.condition_bank import ConditionBank
from lightning_ar.nn.context_features import ContextSpec
from lightning_ar.nn.entropic_map import EntropicMap
from lightning_ar.nn.refine import (
    FlowOptions,
    LabelledConditions,
    labelled_clouds,
    refine_conditions,
    sinkhorn_divergence,
)
from lightning_ar.nn.sampler import call_hook, context_spec_of
from lightning_ar.seeding import seeded_generator

if TYPE_CHECKING:
    from lightning_ar.nn.sampler import ConditionRefiner


@dataclass(frozen=True)
class FlowSettings:
    """What the refinement's flow uses: the flow's options, its labelled features and its target subsample.

    Attributes:
        options: The flow's :class:`~lightning_ar.nn.refine.FlowOptions`; the refinement's defaults are one step of
            ``eta`` 0.6 at blur 0.5 with epsilon-scaling 0.3 (on digits the held-out divergence reduction is the
            same as with 0.9, at a fraction of the cost).
        label_weight: Weight of the appended class/position one-hots (large: no transport across groups);
            ``None`` uses the diameter of the two clouds.
        target_size: Bank samples used as the target per AR step (caps the cost).
    """

    options: FlowOptions = field(default_factory=lambda: FlowOptions(steps=1, eta=0.6, blur=0.5, scaling=0.3))
    label_weight: float | None = None
    target_size: int = 1024

    def __post_init__(self) -> None:
        if self.target_size < 1:
            raise ValueError(f"flow target_size must be >= 1, got {self.target_size}")


def labelled_divergence(
    source: LabelledConditions, target: LabelledConditions, num_classes: int, seq_len: int, settings: FlowSettings
) -> Tensor:
    """Class- and position-aware Sinkhorn divergence of the ``source`` conditions ``[N, D]`` to the ``target`` ones.

    The same construction as the flow's: target mass matched per ``(class, position)`` group to the source's and
    scaled one-hots appended. Source points whose group has no target point are left out. Differentiable in the
    source conditions.

    Returns:
        Scalar divergence (0 when no source point has a target group).
    """
    blur, scaling = settings.options.blur, settings.options.scaling
    clouds = labelled_clouds(source, target, num_classes, seq_len, blur, settings.label_weight)
    if clouds.src is None:
        return source.conditions.new_zeros((), dtype=torch.float32)
    return sinkhorn_divergence(clouds.src, clouds.tgt, blur, scaling, clouds.a[clouds.keep], clouds.b[clouds.used])


@dataclass
class HookStats:
    """What a refinement hook did, per AR step (filled as the sampler calls it)."""

    seconds: float = 0.0
    flow_traces: dict[int, Tensor] = field(default_factory=dict)
    unmoved: dict[int, int] = field(default_factory=dict)


class FlowRefiner:
    """Moves the conditions of AR step ``k`` by the Sinkhorn flow toward the bank's bucket ``k``.

    Args:
        bank: Ideal conditions per AR step.
        settings: Flow options.
        num_classes: Class count (for the class one-hot).
        seq_len: Tokens per image (for the position one-hot).
        seed: Seed of the target subsampling (the same targets for the same seed).
        null_bank: Optional bank of null-class conditions; when given, :meth:`refine_null` refines the null branch.
        record_trace: Measure the divergence along the flow (for a :class:`GenerationTrace`; ``K + 1`` more
            Sinkhorn solves per AR step, the refined conditions are the same).
    """

    def __init__(
        self,
        bank: ConditionBank,
        settings: FlowSettings,
        num_classes: int,
        seq_len: int,
        seed: int = 0,
        null_bank: ConditionBank | None = None,
        record_trace: bool = True,
    ) -> None:
        self.bank, self.settings, self.num_classes, self.seq_len = bank, settings, num_classes, seq_len
        self.record_trace = record_trace
        self.seed, self.null_bank, self.stats = seed, null_bank, HookStats()
        self.refine_null = null_bank is not None

    def _flow(self, bank: ConditionBank, z: Tensor, labels: Tensor, positions: Tensor, step: int, classes: int):
        s = self.settings
        generator = seeded_generator(self.seed, step, stride=7919, device=bank.conditions.device)
        return refine_conditions(LabelledConditions(z, labels, positions), bank.sample(step, s.target_size, generator),
                                 classes, self.seq_len, s.options, label_weight=s.label_weight,
                                 record_trace=self.record_trace)

    def __call__(self, z: Tensor, labels: Tensor, positions: Tensor, step: int) -> Tensor:
        """Refined conditions ``[N, D]`` for the conditions ``z`` ``[N, D]`` of AR step ``step``."""
        start = time.perf_counter()
        result = self._flow(self.bank, z, labels, positions, step, self.num_classes)
        self.stats.flow_traces[step] = result.trace.detach().cpu()
        self.stats.unmoved[step] = result.unmoved
        self.stats.seconds += time.perf_counter() - start
        return result.conditions

    def null(self, z: Tensor, positions: Tensor, step: int) -> Tensor:
        """Refine null-branch conditions with the null bank (all of one class)."""
        if self.null_bank is None:
            return z
        start = time.perf_counter()
        zeros = torch.zeros_like(positions)
        result = self._flow(self.null_bank, z, zeros, positions, step, 1)
        self.stats.seconds += time.perf_counter() - start
        return result.conditions


class AmortizedHook:
    """Applies a trained :class:`AmortizedRefiner` (one MLP pass per AR step)."""

    def __init__(self, refiner: AmortizedRefiner) -> None:
        self.refiner, self.stats, self.refine_null = refiner, HookStats(), False

    @torch.no_grad()
    def __call__(self, z: Tensor, labels: Tensor, positions: Tensor, step: int) -> Tensor:
        start = time.perf_counter()
        out = self.refiner(z, labels, step)
        self.stats.seconds += time.perf_counter() - start
        return out


def _context_spec_for(entropic_map: EntropicMap, spec: ContextSpec | None) -> ContextSpec | None:
    """The spec a hook around ``entropic_map`` passes to the samplers (``None`` for a map without context)."""
    if entropic_map.uses_context and spec is None:
        raise ValueError("a context-aware entropic map needs the ContextSpec its context features are computed with")
    return spec if entropic_map.uses_context else None


class MapHook:
    """Applies a fitted :class:`~lightning_ar.nn.entropic_map.EntropicMap`: each condition is refined on its own,
    whatever else its sampling batch holds.

    Args:
        entropic_map: The conditional branch's map.
        null_map: The CFG null branch's map (one class, fitted on null-class conditions); when given, the samplers
            pass the null branch to :meth:`null`, so both branches of the guided prediction are refined.
        context_spec: How the context features of a context-aware map are computed (required with one, the spec
            it was fitted with; the null map takes no context).
    """

    def __init__(self, entropic_map: EntropicMap, null_map: EntropicMap | None = None,
                 context_spec: ContextSpec | None = None) -> None:
        self.map, self.null_map, self.stats = entropic_map, null_map, HookStats()
        self.refine_null = null_map is not None
        self.context_spec = _context_spec_for(entropic_map, context_spec)

    @torch.no_grad()
    def __call__(self, z: Tensor, labels: Tensor, positions: Tensor, step: int, context: Tensor | None = None
                 ) -> Tensor:
        start = time.perf_counter()
        out = self.map(z, labels, positions, step, context)
        self.stats.seconds += time.perf_counter() - start
        return out

    @torch.no_grad()
    def null(self, z_null: Tensor, positions: Tensor, step: int) -> Tensor:
        """Null-branch conditions ``[N, D]`` at ``positions`` ``[N]`` through the null map (unchanged without one)."""
        if self.null_map is None:
            return z_null
        start = time.perf_counter()
        out = self.null_map(z_null, torch.zeros_like(positions), positions, step)
        self.stats.seconds += time.perf_counter() - start
        return out


class MapFitter:
    """Sampler hook that fits the map of each AR step on the conditions it is handed, then applies it.

    Run over one large batch of the generator's own sampling, the pool of step ``k`` is produced with the fitted
    map already active at steps ``< k`` (on-policy). At most ``pool_size`` conditions per step are kept (a uniform
    subsample, ``generator``). With a ``null_map`` and ``null_bank`` (and guided sampling) the null branch's map is
    fitted the same way on the null-class conditions.

    Args:
        entropic_map: The map to fit (its buffers are overwritten step by step).
        bank: Ideal conditions per AR step (the targets).
        pool_size: Pool points kept per step.
        generator: RNG of the subsampling.
        null_map: The null branch's map to fit (optional).
        null_bank: Ideal null-class conditions per AR step (with ``null_map``).
        context_spec: For a context-aware map: how the samplers compute the pool's context features (the bank
            must hold its targets' features, computed the same way).
    """

    def __init__(self, entropic_map: EntropicMap, bank: ConditionBank, pool_size: int,
                 generator: torch.Generator | None = None, null_map: EntropicMap | None = None,
                 null_bank: ConditionBank | None = None, context_spec: ContextSpec | None = None) -> None:
        if (null_map is None) != (null_bank is None):
            raise ValueError("MapFitter needs both null_map and null_bank, or neither")
        self.context_spec = _context_spec_for(entropic_map, context_spec)
        if self.context_spec is not None and bank.context_dim != entropic_map.context_dim:
            raise ValueError(f"the context-aware map needs a bank with context features of dimension "
                             f"{entropic_map.context_dim}, the bank has {bank.context_dim}")
        self.map, self.bank, self.pool_size, self.generator = entropic_map, bank, pool_size, generator
        self.null_map, self.null_bank = null_map, null_bank
        self.refine_null, self.stats = null_map is not None, HookStats()
        self.marginal_errors: dict[int, float] = {}
        self.null_marginal_errors: dict[int, float] = {}
        self.pool_sizes: dict[int, int] = {}
        self.missing_classes: dict[int, list[int]] = {}  # classes of the pool with no bank conditions (left as is)

    def _keep(self, n: int, device: torch.device) -> Tensor:
        if n <= self.pool_size:
            return torch.arange(n, device=device)
        rng_device = self.generator.device if self.generator is not None else "cpu"
        return torch.randperm(n, generator=self.generator, device=rng_device)[: self.pool_size].to(device)

    @torch.no_grad()
    def __call__(self, z: Tensor, labels: Tensor, positions: Tensor, step: int, context: Tensor | None = None
                 ) -> Tensor:
        start = time.perf_counter()
        keep = self._keep(len(z), z.device)
        target = self.bank.get(step).to(z.device)
        missing = sorted(set(labels.tolist()) - set(target.labels.tolist()))
        if missing:
            self.missing_classes[step] = missing
        pool = LabelledConditions(z[keep], labels[keep], positions[keep])
        contexts = (context[keep], self.bank.context_of(step).to(z.device)) if self.context_spec else ()
        self.marginal_errors[step] = self.map.fit_step(step, pool, target, *contexts)
        self.pool_sizes[step] = len(keep)
        out = self.map(z, labels, positions, step, context)
        self.stats.seconds += time.perf_counter() - start
        return out

    @torch.no_grad()
    def null(self, z_null: Tensor, positions: Tensor, step: int) -> Tensor:
        """Fit the null map of ``step`` on the null-branch conditions ``[N, D]``, then apply it."""
        start = time.perf_counter()
        keep, zeros = self._keep(len(z_null), z_null.device), torch.zeros_like(positions)
        pool = LabelledConditions(z_null[keep], zeros[keep], positions[keep])
        self.null_marginal_errors[step] = self.null_map.fit_step(step, pool, self.null_bank.get(step).to(z_null.device))
        out = self.null_map(z_null, zeros, positions, step)
        self.stats.seconds += time.perf_counter() - start
        return out


class ChainedHooks:
    """Applies several sampler hooks in order at every AR step (e.g. an injected control of
    :mod:`lightning_ar.nn.controls`, then a refinement: the refinement sees the defective conditions).

    The null branch is passed through the hooks that refine it. ``stats.seconds`` is the time spent in the hooks
    after the first (the refinement's share when the first is a control).

    Args:
        hooks: Hooks following :class:`~lightning_ar.nn.sampler.ConditionRefiner`; ``None`` entries are skipped.
    """

    def __init__(self, *hooks: ConditionRefiner | None) -> None:
        self.hooks = [h for h in hooks if h is not None]
        if not self.hooks:
            raise ValueError("ChainedHooks needs at least one hook")
        self.refine_null = any(h.refine_null for h in self.hooks)
        specs = {repr(s): s for s in (context_spec_of(h) for h in self.hooks) if s is not None}
        if len(specs) > 1:
            raise ValueError(f"ChainedHooks: the hooks use different context specs {sorted(specs)}")
        self.context_spec = next(iter(specs.values()), None)
        self.stats = HookStats()

    def __call__(self, z: Tensor, labels: Tensor, positions: Tensor, step: int, context: Tensor | None = None
                 ) -> Tensor:
        """Conditions ``z`` ``[N, D]`` of AR step ``step`` through every hook in order -> ``[N, D]`` (``context``
        ``[N, Fc]`` goes to the hooks that take it)."""
        z = call_hook(self.hooks[0], z, labels, positions, step, context)
        start = time.perf_counter()
        for hook in self.hooks[1:]:
            z = call_hook(hook, z, labels, positions, step, context)
        self.stats.seconds += time.perf_counter() - start
        return z

    def null(self, z_null: Tensor, positions: Tensor, step: int) -> Tensor:
        """Null-branch conditions ``[N, D]`` through the hooks that refine the null branch."""
        for hook in self.hooks:
            if hook.refine_null:
                z_null = hook.null(z_null, positions, step)
        return z_null
