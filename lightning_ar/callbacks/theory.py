"""Callbacks that measure the paper's theoretical claims (SPEC 2.2) on seeded generation batches.

- :class:`ConditionalScoreNormMonitor`: conditional score norm ``s_i`` and guidance norm ``g_i`` across AR steps,
  fitted by ``M beta^i + m`` (Theorem 2), with bootstrap verdicts.
- :class:`~lightning_ar.callbacks.sinkhorn_monitor.SinkhornDivergenceMonitor`: divergence of produced conditions to
  held-out ideal ones beside their dispersion ratio, the null test, and the flow claims (``OTRefinement`` only).

Both generate in the first validation/test batch hook (so with the weights validation uses, e.g. EMA), log in the
epoch-end hook, write a PNG to ``<log_dir>/theory/`` and their section of ``<log_dir>/theory_report.md``. A disabled
monitor (``enabled=False``, or not in the callback list) costs nothing.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
from typing_extensions import override

from lightning_ar.callbacks.sinkhorn_monitor import SinkhornDivergenceMonitor
from lightning_ar.callbacks.theory_base import TheoryMonitor, generator_module
from lightning_ar.contracts import Generator
from lightning_ar.nn.trace import GenerationTrace
from lightning_ar.theory.fits import decay_claim, fit_exponential_decay
from lightning_ar.theory.measures import ScoreNorms, score_norms
from lightning_ar.theory.stats import FAILS, HOLDS

__all__ = ["ConditionalScoreNormMonitor", "SinkhornDivergenceMonitor", "generator_module"]


class ConditionalScoreNormMonitor(TheoryMonitor):
    """Conditional score norm across AR steps (Theorem 2: ``||grad log p_t(x_t | c_i)|| <= M beta^i + m``).

    Generates ``num_batches`` seeded batches with a :class:`GenerationTrace`; for each AR step ``i`` and timestep
    ``t`` it noises the step's sampled tokens and measures ``s_i(t) = E||eps_theta(x_t, t, c_i)|| / sigma_t`` and,
    with guidance, ``g_i(t) = E||eps_theta(x_t, t, c_i) - eps_theta(x_t, t, c_null,i)|| / sigma_t``; ``s_i`` and
    ``g_i`` (means over ``t``) are fitted by :func:`~lightning_ar.theory.fits.fit_exponential_decay`, and each gets a
    verdict from a bootstrap over the generated samples (:func:`~lightning_ar.theory.fits.decay_claim`: holds /
    does not hold / not resolved). What this measures: the *model's* noise prediction at its own sampled tokens,
    which for an epsilon head is dominated by the noise norm (``||eps|| ~ sqrt(token_dim)``); it is not the true
    score of the data (known only on ``gmm``). Works with ``MARGenerator`` and ``OTRefinement`` (whose ``generate``
    then refines with its default mode: the conditions the head saw).

    Logged keys (one value per evaluated validation/test epoch):

    - ``theory/score_norm_beta``, ``theory/score_norm_floor``, ``theory/score_norm_M``, ``theory/score_norm_r2``:
      the fit ``s_i = M beta^i + m``;
    - ``theory/score_norm_exp_better``: 1 if the exponential model beats a line by AIC, else 0;
    - ``theory/score_norm_holds``: 1 (holds), 0 (does not hold) or NaN (not resolved / not measurable);
    - ``theory/guidance_norm_first``, ``theory/guidance_norm_last``, ``theory/guidance_norm_beta``,
      ``theory/guidance_norm_holds``: ``g_i`` at the first and last AR step, its fit and verdict (only when the
      generation uses guidance, ``cfg != 1``).

    Writes ``<log_dir>/theory/score_norm_<stage>.png`` (also logged as an image to a TensorBoard logger) and the
    score section of ``<log_dir>/theory_report.md``; ``self.last`` keeps the curves, the fit and the metrics.

    Args:
        num_per_class: Samples per class in the batch.
        timesteps: Diffusion timesteps ``t`` (training scale, ``0..T-1``) at which norms are measured.
        cfg: Guidance scale of the generation (``None``: the module's default).
        on_validation: Measure in validation (every ``every_n_epochs`` epochs during ``fit``).
        num_batches: Seeded generation batches pooled (more samples: narrower CIs).
        bootstrap: Bootstrap replicates of the verdicts.
        **kwargs: The shared options of :class:`~lightning_ar.callbacks.theory_base.TheoryMonitor` (``seed``,
            ``on_test``, ``every_n_epochs``, ``plot``, ``enabled``, ``classes``, ``generate_kwargs``).
    """

    section = "score_norm"

    def __init__(
        self,
        num_per_class: int = 4,
        timesteps: tuple[int, ...] = (100, 500, 900),
        cfg: float | None = None,
        on_validation: bool = True,
        num_batches: int = 1,
        bootstrap: int = 500,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_per_class=num_per_class, on_validation=on_validation, **kwargs)
        self.timesteps, self.cfg = tuple(int(t) for t in timesteps), cfg
        self.num_batches, self.bootstrap = num_batches, bootstrap

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.enabled:
            return
        self._check_common()
        if self.num_batches < 1 or self.bootstrap < 10:
            raise ValueError("ConditionalScoreNormMonitor.num_batches must be >= 1 and bootstrap >= 10")
        if "cfg" in self.generate_kwargs:
            raise ValueError("ConditionalScoreNormMonitor: set cfg with the cfg option, not in generate_kwargs")
        num_t = generator_module(pl_module).head.num_train_timesteps
        if not self.timesteps or not all(0 <= t < num_t for t in self.timesteps):
            raise ValueError(f"ConditionalScoreNormMonitor.timesteps must be non-empty in [0, {num_t}), "
                             f"got {self.timesteps}")
        if not isinstance(pl_module, Generator):
            raise TypeError(f"ConditionalScoreNormMonitor needs a module with generate(...); got {type(pl_module)}")

    def _norms(self, pl_module: L.LightningModule) -> tuple[ScoreNorms, int, float]:
        """Norms of ``num_batches`` seeded batches, per-sample arrays concatenated; sample count; cfg."""
        kwargs = dict(self.generate_kwargs)
        if self.cfg is not None:
            kwargs["cfg"] = self.cfg
        head, labels, parts = generator_module(pl_module).head, self.labels(pl_module), []
        for b in range(self.num_batches):
            trace = GenerationTrace(keep_on_device=True)
            pl_module.generate(labels, generator=self.rng(pl_module, 2 * b), trace=trace, **kwargs)
            parts.append(score_norms(head, trace, self.timesteps, self.rng(pl_module, 2 * b + 1)))
        cfg = self.cfg if self.cfg is not None else float(generator_module(pl_module).hparams.cfg)
        per_s = np.concatenate([p.score_per_sample for p in parts], axis=-1)  # (K, T, B_total)
        guided = parts[0].guidance is not None
        per_g = np.concatenate([p.guidance_per_sample for p in parts], axis=-1) if guided else None
        norms = ScoreNorms(list(self.timesteps), per_s.mean(-1), None if per_g is None else per_g.mean(-1), per_s,
                           per_g)
        return norms, int(per_s.shape[-1]), cfg

    @override
    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> tuple[dict[str, float], Any]:
        norms, num_samples, cfg = self._norms(pl_module)
        fit = fit_exponential_decay(range(norms.score.shape[0]), norms.score_mean)
        claim_s = decay_claim(norms.score_per_sample.mean(1), self.bootstrap, self.seed)
        metrics = {"theory/score_norm_beta": fit.beta, "theory/score_norm_floor": fit.floor,
                   "theory/score_norm_M": fit.M, "theory/score_norm_r2": fit.r2,
                   "theory/score_norm_exp_better": float(fit.exponential_better),
                   "theory/score_norm_holds": _as_number(claim_s["verdict"])}
        claim_g = None
        if norms.guidance is not None:
            claim_g = decay_claim(norms.guidance_per_sample.mean(1), self.bootstrap, self.seed + 1)
            metrics.update({"theory/guidance_norm_first": float(norms.guidance_mean[0]),
                            "theory/guidance_norm_last": float(norms.guidance_mean[-1]),
                            "theory/guidance_norm_beta": claim_g["fit"]["beta"],
                            "theory/guidance_norm_holds": _as_number(claim_g["verdict"])})
        self.last = {"num_samples": num_samples, "cfg": cfg, "norms": norms.to_dict(), "fit": fit.to_dict(),
                     "claim_score": claim_s, "claim_guidance": claim_g}
        if not self.plot:
            return metrics, None
        from lightning_ar.theory.plots import plot_score_norms

        return metrics, plot_score_norms(norms, fit)


def _as_number(verdict: str) -> float:
    """1.0 for ``holds``, 0.0 for ``does not hold``, NaN otherwise (for logging a verdict)."""
    return {HOLDS: 1.0, FAILS: 0.0}.get(verdict, float("nan"))
