"""``SinkhornDivergenceMonitor``: condition statistics of a refinement that can see collapse (SPEC 2.3, 2026-12-01)."""

from __future__ import annotations

from functools import partial
from typing import Any

import lightning as L
import torch
from typing_extensions import override

from lightning_ar.callbacks.theory_base import TheoryMonitor
from lightning_ar.contracts import Refinement
from lightning_ar.nn.trace import GenerationTrace
from lightning_ar.theory.conditions import (
    StepPool,
    condition_statistics,
    half_sample_weights,
    pool_steps,
    summary_numbers,
)
from lightning_ar.theory.dispersion import null_test
from lightning_ar.theory.flow_claims import MIN_FLOW_STEPS, combine, flow_claims, not_measurable, path_divergences
from lightning_ar.theory.measures import sinkhorn_curves


class SinkhornDivergenceMonitor(TheoryMonitor):
    """Divergence of produced conditions to held-out ideal ones beside their dispersion ratio, the null test of each
    refinement mode, and the flow's monotonicity and contraction measured against held-out ideal conditions.

    Needs an ``OTRefinement`` (``generate(refine=..., trace=...)``, ``heldout``, ``refine_step``, ``flow_path``). Per
    mode it generates ``num_batches`` seeded batches (the same seeds for every mode: paired) and pools the conditions
    of each AR step over them. What it measures (:mod:`lightning_ar.theory.conditions`):

    - the class- and position-aware Sinkhorn divergence of the pooled raw / refined conditions to the held-out ideal
      (teacher-forced, real-context, validation-split) conditions, at a blur of 0.25x the ideal conditions'
      within-group spread. With a few conditions per (class, position) group this is mostly finite-sample matching,
      and collapse toward group means lowers it;
    - the pooled within-group dispersion ratio (produced / held-out ideal) with its standard error: below 0.9 the
      conditions are collapsed, above 1.1 over-dispersed;
    - the paired half-sample bootstrap CI (over generated images) of ``sum_k after_k - sum_k before_k`` and the
      verdict: the
      refinement improves the conditions only if that CI lies below zero and the refined ratio is in [0.9, 1.1];
      a lower divergence with a ratio below 0.9 is reported as collapse;
    - the null test: held-out ideal conditions, refined in chunks the size of a sampling batch, must move by less
      than 0.1x their within-group spread;
    - with ``flow_steps >= 10``: monotone decrease and contraction toward a floor of the divergence to the held-out
      ideal conditions along the flow (:mod:`lightning_ar.theory.flow_claims`); with fewer steps "not measurable".

    Logged keys (with several modes, ``theory/<mode>/...`` instead of ``theory/...``):

    - ``theory/sinkhorn_before_mean``, ``theory/sinkhorn_after_mean``: mean over non-trivial AR steps of the pooled
      divergence before and after refinement;
    - ``theory/sinkhorn_reduction``: ``1 - sum_k after_k / sum_k before_k``; ``theory/sinkhorn_reduction_low``,
      ``theory/sinkhorn_reduction_high``: the 95% CI of ``sum_k (after_k - before_k)`` (refining modes);
    - ``theory/dispersion_ratio_before``, ``theory/dispersion_ratio_after``: pooled over the non-trivial steps;
    - ``theory/refinement_improves``: 1 (holds), 0 (collapse, over-dispersion or does not hold), NaN (not
      resolved); refining modes only;
    - ``theory/null_max_ratio``: largest null-test displacement / spread over AR steps (refining modes);
    - ``theory/flow_heldout_rho``: mean fitted contraction rate toward the floor (``flow`` with >= 10 steps only).

    Writes ``<log_dir>/theory/sinkhorn_<stage>.png`` and the Sinkhorn section of ``<log_dir>/theory_report.md``;
    ``self.last`` keeps every statistic. In validation during the bank-filling epoch the held-out bank is incomplete.

    Args:
        num_per_class: Samples per class in each batch.
        modes: Refinement modes to measure (``none``, ``flow``, ``amortized``).
        on_validation: Measure in validation (every ``every_n_epochs`` epochs during ``fit``).
        num_batches: Seeded generation batches pooled per mode.
        bootstrap: Replicates of the half-sample bootstrap over generated images (divergence CIs).
        null_test: Run the null test for the refining modes.
        **kwargs: The shared options of :class:`~lightning_ar.callbacks.theory_base.TheoryMonitor` (``seed``,
            ``on_test``, ``every_n_epochs``, ``plot``, ``enabled``, ``classes``, ``generate_kwargs``).
    """

    section = "sinkhorn"
    reserved_kwargs = ("generator", "trace", "refine")

    def __init__(
        self,
        num_per_class: int = 8,
        modes: tuple[str, ...] = ("flow",),
        on_validation: bool = False,
        num_batches: int = 4,
        bootstrap: int = 200,
        null_test: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_per_class=num_per_class, on_validation=on_validation, **kwargs)
        self.modes = (modes,) if isinstance(modes, str) else tuple(modes)
        self.num_batches, self.bootstrap, self.run_null_test = num_batches, bootstrap, null_test

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from lightning_ar.modules.refinement import MODES

        if not self.enabled:
            return
        self._check_common()
        if not isinstance(pl_module, Refinement):
            raise TypeError(
                "SinkhornDivergenceMonitor needs a module whose generate(...) takes refine= and trace= and measures "
                f"divergences (OTRefinement); got {type(pl_module).__name__}"
            )
        bad = [m for m in self.modes if m not in MODES]
        if not self.modes or bad:
            raise ValueError(f"SinkhornDivergenceMonitor.modes must be a non-empty subset of {MODES}, got {self.modes}")
        if self.num_batches < 1 or self.bootstrap < 10:
            raise ValueError("SinkhornDivergenceMonitor.num_batches must be >= 1 and bootstrap >= 10")

    def _keys(self, mode: str) -> str:
        return "theory/" if len(self.modes) == 1 else f"theory/{mode}/"

    def _references(self, pl_module: L.LightningModule, num_steps: int) -> list:
        return [tuple(t.cpu() for t in pl_module.heldout.get(k)) for k in range(num_steps)]

    def _null(self, pl_module: L.LightningModule, mode: str, refs: list, pools: list[StepPool],
              stats: dict) -> dict[int, dict]:
        """Null test per non-trivial AR step, in chunks of one sampling batch's conditions of that step."""
        seq_len, out = pl_module.mar_generator.seq_len, {}
        for k, step in enumerate(stats["steps"]):
            if step["trivial"]:
                continue
            batch = len(pools[k].raw) // self.num_batches
            refine = partial(pl_module.refine_step, mode=mode)
            z, labels, positions = (t.to(pl_module.device) for t in refs[k])
            out[k] = null_test(refine, z, labels, positions, k, seq_len, max(batch, 1), self.rng(pl_module, 999)
                               ).to_dict()
        return out

    def _flow(self, pl_module: L.LightningModule, traces: list[GenerationTrace], refs: list, pools: list[StepPool],
              stats: dict) -> dict:
        """Flow claims against held-out ideal conditions (``flow_steps >= 10`` only)."""
        steps = pl_module.flow.options.steps
        if steps < MIN_FLOW_STEPS:
            return not_measurable(steps)
        num_images = sum(int(t.steps[0].positions.shape[0]) for t in traces)
        counts = half_sample_weights(num_images, self.bootstrap, self.seed)
        seq_len, per_step = pl_module.mar_generator.seq_len, {}
        for k, step in enumerate(stats["steps"]):
            if step["trivial"]:
                continue
            pooled = [pl_module.flow_path(*_raw_batch(t, k, pl_module.device), k) for t in traces]  # [batches][K+1]
            path = [torch.cat([p[j] for p in pooled]).cpu() for j in range(steps + 1)]
            pool = pools[k]
            values = path_divergences(path, pool.labels * seq_len + pool.positions, pool.clusters, refs[k], seq_len,
                                      counts).numpy()
            per_step[k] = flow_claims(values)
        return {"per_step": per_step, **combine(per_step), "num_flow_steps": steps}

    @override
    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> tuple[dict[str, float], Any]:
        labels, curves, metrics, results = self.labels(pl_module), {}, {}, {}
        for mode in self.modes:
            traces = []
            for b in range(self.num_batches):
                traces.append(GenerationTrace())
                pl_module.generate(labels, refine=mode, generator=self.rng(pl_module, b), trace=traces[-1],
                                   **self.generate_kwargs)
            refs = self._references(pl_module, len(traces[0].steps))
            pools = pool_steps(traces)
            stats = condition_statistics(pools, refs, pl_module.mar_generator.seq_len, mode != "none",
                                         self.bootstrap, self.seed)
            if mode != "none" and self.run_null_test:
                stats["null"] = self._null(pl_module, mode, refs, pools, stats)
            if mode == "flow":
                stats["flow"] = self._flow(pl_module, traces, refs, pools, stats)
            curves[mode] = sinkhorn_curves(traces[0])
            stats["inner_flow"] = curves[mode].to_dict()  # toward the flow's own target samples (proves nothing)
            results[mode] = stats
            metrics.update(_metrics(self._keys(mode), mode, stats))
        self.last = {"num_samples": int(labels.numel()) * self.num_batches, "num_batches": self.num_batches,
                     "bootstrap": self.bootstrap, "modes": results}
        if not self.plot:
            return metrics, None
        from lightning_ar.theory.plots import plot_conditions

        return metrics, plot_conditions(results, curves)


def _raw_batch(trace: GenerationTrace, k: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Raw conditions ``[n, D]``, labels and positions of AR step ``k`` of one batch, on ``device``."""
    z, labels, positions = trace.conditions_at(k)
    raw = trace.steps[k].raw_conditions
    z = z if raw is None else raw.reshape(z.shape)
    return z.to(device), labels.to(device), positions.to(device)


def _metrics(prefix: str, mode: str, stats: dict) -> dict[str, float]:
    nums = summary_numbers(stats)
    out = {f"{prefix}sinkhorn_before_mean": nums["before_mean"], f"{prefix}sinkhorn_after_mean": nums["after_mean"],
           f"{prefix}dispersion_ratio_before": nums["ratio_before"],
           f"{prefix}dispersion_ratio_after": nums["ratio_after"]}
    if mode == "none":
        return out
    out.update({f"{prefix}sinkhorn_reduction": nums["reduction"], f"{prefix}sinkhorn_reduction_low":
                nums["reduction_low"], f"{prefix}sinkhorn_reduction_high": nums["reduction_high"],
                f"{prefix}refinement_improves": {"holds": 1.0, "not resolved": float("nan"),
                                                 "not measurable": float("nan")}.get(stats["verdict"], 0.0)})
    if stats.get("null"):
        out[f"{prefix}null_max_ratio"] = float(max(r["ratio"] for r in stats["null"].values()))
    flow = stats.get("flow") or {}
    if flow.get("per_step"):
        out[f"{prefix}flow_heldout_rho"] = float(flow["rho_mean"])
    return out
