"""Callbacks that measure the paper's theoretical claims (SPEC 2.2) on one fixed, seeded generation batch.

- :class:`ConditionalScoreNormMonitor`: conditional score norm ``s_i`` and guidance norm ``g_i`` across AR steps,
  fitted by ``M beta^i + m`` (Theorem 2).
- :class:`SinkhornDivergenceMonitor`: Sinkhorn divergence of the produced conditions to held-out ideal ones before
  and after refinement, and monotonicity/contraction of the inner flow (``OTRefinement`` only).

Both generate in the first validation/test batch hook (so with the weights validation uses, e.g. EMA), log in the
epoch-end hook, write a PNG to ``<log_dir>/theory/`` and their section of ``<log_dir>/theory_report.md``. A disabled
monitor (``enabled=False``, or not in the callback list) costs nothing.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from typing_extensions import override

from lightning_ar.nn.diffusion_loss import DiffusionLoss
from lightning_ar.nn.trace import GenerationTrace
from lightning_ar.theory.fits import fit_exponential_decay
from lightning_ar.theory.measures import score_norms, sinkhorn_curves
from lightning_ar.theory.report import write_theory_report

MAX_DEFAULT_CLASSES = 10


def generator_module(pl_module: L.LightningModule) -> L.LightningModule:
    """The module owning the diffusion head: ``pl_module`` itself (``MARGenerator``) or its ``mar_generator``."""
    if isinstance(getattr(pl_module, "head", None), DiffusionLoss):
        return pl_module
    gen = getattr(pl_module, "mar_generator", None)
    if gen is None or not isinstance(getattr(gen, "head", None), DiffusionLoss):
        raise TypeError(f"expected a MARGenerator (with .head) or a module with .mar_generator, got {type(pl_module)}")
    return gen


class _TheoryMonitor(Callback):
    """Shared scheduling, logging and file output; subclasses implement :meth:`measure`."""

    section = ""  # "score_norm" or "sinkhorn": file names and report section
    reserved_kwargs: tuple[str, ...] = ("generator", "trace")  # generate() arguments the monitor sets itself

    def __init__(self, num_per_class: int, classes: list[int] | None, seed: int, on_validation: bool, on_test: bool,
                 every_n_epochs: int, plot: bool, enabled: bool, generate_kwargs: dict[str, Any] | None) -> None:
        super().__init__()
        self.num_per_class, self.classes, self.seed = num_per_class, classes, seed
        self.on_validation, self.on_test, self.every_n_epochs = on_validation, on_test, every_n_epochs
        self.plot, self.enabled = plot, enabled
        self.generate_kwargs = dict(generate_kwargs or {})
        self.last: dict[str, Any] = {}
        self._pending: dict[str, float] = {}

    def _check_common(self) -> None:
        name = type(self).__name__
        if self.num_per_class < 1 or self.every_n_epochs < 1:
            raise ValueError(f"{name}.num_per_class and {name}.every_n_epochs must be >= 1")
        reserved = set(self.reserved_kwargs) & set(self.generate_kwargs)
        if reserved:
            raise ValueError(f"{name}.generate_kwargs must not set {sorted(reserved)} (the monitor sets them)")

    def labels(self, pl_module: L.LightningModule) -> Tensor:
        """``[B]`` labels: each class (default: the first 10) repeated ``num_per_class`` times."""
        num_classes = int(generator_module(pl_module).hparams.num_classes)
        classes = self.classes if self.classes is not None else range(min(num_classes, MAX_DEFAULT_CLASSES))
        return torch.tensor(list(classes), device=pl_module.device).repeat_interleave(self.num_per_class)

    def rng(self, pl_module: L.LightningModule, stream: int = 0) -> torch.Generator:
        return torch.Generator(pl_module.device).manual_seed(self.seed * 1_000_003 + stream)

    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> tuple[dict[str, float], Any]:
        """Generate, fill ``self.last``; return the metrics to log and a figure (or ``None``)."""
        raise NotImplementedError

    def _due(self, trainer: L.Trainer, stage: str, batch_idx: int, dataloader_idx: int) -> bool:
        if not self.enabled or batch_idx or dataloader_idx:
            return False
        if stage == "test":
            return self.on_test
        if not self.on_validation or trainer.sanity_checking:
            return False
        return trainer.state.fn != "fit" or (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._pending, fig = self.measure(trainer, pl_module, stage)
        self.last.update(stage=stage, global_step=trainer.global_step, metrics=dict(self._pending), plot=None)
        out_dir = Path(trainer.log_dir or trainer.default_root_dir)  # log_dir must be read on every rank
        if not trainer.is_global_zero:
            return
        if fig is not None:
            self._save_plot(trainer, fig, out_dir / "theory" / f"{self.section}_{stage}.png", stage)
        write_theory_report(out_dir, **{"score" if self.section == "score_norm" else "sinkhorn": self.last})

    def _save_plot(self, trainer: L.Trainer, fig: Any, path: Path, stage: str) -> None:
        from lightning_ar.theory.plots import figure_to_array, save_figure

        self.last["plot"] = str(save_figure(fig, path))
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(f"theory/{self.section}_{stage}", figure_to_array(fig),
                                            global_step=trainer.global_step, dataformats="HWC")

    def _flush(self, pl_module: L.LightningModule) -> None:
        # Every rank measures the same seeded batch; sync_dist averages identical values (and keeps DDP quiet).
        for key, value in self._pending.items():
            pl_module.log(key, float(value), sync_dist=True)
        self._pending = {}

    @override
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._due(trainer, "val", batch_idx, dataloader_idx):
            self._run(trainer, pl_module, "val")

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush(pl_module)

    @override
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._due(trainer, "test", batch_idx, dataloader_idx):
            self._run(trainer, pl_module, "test")

    @override
    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush(pl_module)


class ConditionalScoreNormMonitor(_TheoryMonitor):
    """Conditional score norm across AR steps (Theorem 2: ``||grad log p_t(x_t | c_i)|| <= M beta^i + m``).

    Generates one seeded batch with a :class:`GenerationTrace`; for each AR step ``i`` and timestep ``t`` it noises
    the step's sampled tokens and measures ``s_i(t) = E||eps_theta(x_t, t, c_i)|| / sigma_t`` and, with guidance,
    ``g_i(t) = E||eps_theta(x_t, t, c_i) - eps_theta(x_t, t, c_null,i)|| / sigma_t``; ``s_i`` (mean over ``t``) is
    fitted by :func:`~lightning_ar.theory.fits.fit_exponential_decay`. Works with ``MARGenerator`` and
    ``OTRefinement`` (whose ``generate`` then refines with its default mode: the conditions the head saw).

    Logged keys (one value per evaluated validation/test epoch):

    - ``theory/score_norm_beta``, ``theory/score_norm_floor``, ``theory/score_norm_M``, ``theory/score_norm_r2``:
      the fit ``s_i = M beta^i + m``;
    - ``theory/score_norm_exp_better``: 1 if the exponential model beats a line by AIC, else 0;
    - ``theory/guidance_norm_first``, ``theory/guidance_norm_last``: ``g_i`` at the first and last AR step (only
      when the generation uses guidance, ``cfg != 1``).

    Writes ``<log_dir>/theory/score_norm_<stage>.png`` (also logged as an image to a TensorBoard logger) and the
    score section of ``<log_dir>/theory_report.md``; ``self.last`` keeps the curves, the fit and the metrics.

    Args:
        num_per_class: Samples per class in the batch.
        timesteps: Diffusion timesteps ``t`` (training scale, ``0..T-1``) at which norms are measured.
        seed: Seed of generation and of the noise.
        cfg: Guidance scale of the generation (``None``: the module's default).
        on_validation: Measure in validation (every ``every_n_epochs`` epochs during ``fit``).
        on_test: Measure in ``test``.
        every_n_epochs: Validation epochs between measurements during ``fit``.
        plot: Write and log the PNG.
        enabled: ``False`` turns the monitor off (no generation, no option checks).
        classes: Classes of the batch (default: the first 10).
        generate_kwargs: Extra keyword arguments of ``generate`` (e.g. ``{"refine": "none"}`` for ``OTRefinement``).
    """

    section = "score_norm"

    def __init__(
        self,
        num_per_class: int = 4,
        timesteps: tuple[int, ...] = (100, 500, 900),
        seed: int = 0,
        cfg: float | None = None,
        on_validation: bool = True,
        on_test: bool = True,
        every_n_epochs: int = 1,
        plot: bool = True,
        enabled: bool = True,
        classes: list[int] | None = None,
        generate_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(num_per_class, classes, seed, on_validation, on_test, every_n_epochs, plot, enabled,
                         generate_kwargs)
        self.timesteps, self.cfg = tuple(int(t) for t in timesteps), cfg

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.enabled:
            return
        self._check_common()
        if "cfg" in self.generate_kwargs:
            raise ValueError("ConditionalScoreNormMonitor: set cfg with the cfg option, not in generate_kwargs")
        num_t = generator_module(pl_module).head.num_train_timesteps
        if not self.timesteps or not all(0 <= t < num_t for t in self.timesteps):
            raise ValueError(f"ConditionalScoreNormMonitor.timesteps must be non-empty in [0, {num_t}), "
                             f"got {self.timesteps}")
        if not callable(getattr(pl_module, "generate", None)):
            raise TypeError(f"ConditionalScoreNormMonitor needs a module with generate(...); got {type(pl_module)}")

    def _generate(self, pl_module: L.LightningModule) -> tuple[GenerationTrace, Tensor, float]:
        kwargs = dict(self.generate_kwargs)
        if self.cfg is not None:
            kwargs["cfg"] = self.cfg
        trace, labels = GenerationTrace(keep_on_device=True), self.labels(pl_module)
        pl_module.generate(labels, generator=self.rng(pl_module), trace=trace, **kwargs)
        cfg = self.cfg if self.cfg is not None else float(generator_module(pl_module).hparams.cfg)
        return trace, labels, cfg

    @override
    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> tuple[dict[str, float], Any]:
        trace, labels, cfg = self._generate(pl_module)
        norms = score_norms(generator_module(pl_module).head, trace, self.timesteps, self.rng(pl_module, 1))
        fit = fit_exponential_decay(range(norms.score.shape[0]), norms.score_mean)
        metrics = {"theory/score_norm_beta": fit.beta, "theory/score_norm_floor": fit.floor,
                   "theory/score_norm_M": fit.M, "theory/score_norm_r2": fit.r2,
                   "theory/score_norm_exp_better": float(fit.exponential_better)}
        if norms.guidance is not None:
            metrics["theory/guidance_norm_first"] = float(norms.guidance_mean[0])
            metrics["theory/guidance_norm_last"] = float(norms.guidance_mean[-1])
        self.last = {"num_samples": int(labels.numel()), "cfg": cfg, "norms": norms.to_dict(), "fit": fit.to_dict()}
        if not self.plot:
            return metrics, None
        from lightning_ar.theory.plots import plot_score_norms

        return metrics, plot_score_norms(norms, fit)


class SinkhornDivergenceMonitor(_TheoryMonitor):
    """Sinkhorn divergence of produced conditions to held-out ideal conditions, and the inner flow's behaviour.

    Needs a module whose ``generate`` takes ``refine`` and ``trace`` and fills the trace's ``divergence_before``,
    ``divergence_after`` and ``flow_trace`` (``OTRefinement``). Generates one seeded batch per mode (same seed).
    Flow traces that start at or below ``1e-6`` (e.g. AR step 0, where conditions are exact) are left out of the
    flow statistics.

    Logged keys (with several modes, ``theory/<mode>/...`` instead of ``theory/...``):

    - ``theory/sinkhorn_before_mean``, ``theory/sinkhorn_after_mean``: mean over AR steps of the divergence before
      and after refinement;
    - ``theory/sinkhorn_reduction``: ``1 - sum_k after_k / sum_k before_k``;
    - ``theory/flow_fraction_monotone``: fraction of inner-flow steps whose divergence did not increase, pooled over
      the non-trivial flow traces (modes with a flow only);
    - ``theory/flow_rho``: contraction rate, the median successive ratio of each flow trace averaged over AR steps
      (modes with a flow only);
    - ``theory/flow_rho_bound``: the smallest rate with ``S_j <= rho^j S_0`` at every flow step of every non-trivial
      trace (``max_k max_j (S_j/S_0)^(1/j)``; ``< 1`` is the paper's contraction claim on the measured steps).

    Writes ``<log_dir>/theory/sinkhorn_<stage>.png`` (also logged to a TensorBoard logger) and the Sinkhorn section
    of ``<log_dir>/theory_report.md``; ``self.last`` keeps the curves and the metrics. In validation during the
    first (bank-filling) epoch of ``OTRefinement.fit`` the held-out bank is still incomplete.

    Args:
        num_per_class: Samples per class in each batch.
        seed: Seed of generation.
        modes: Refinement modes to measure (``none``, ``flow``, ``amortized``).
        on_validation: Measure in validation (every ``every_n_epochs`` epochs during ``fit``).
        on_test: Measure in ``test``.
        every_n_epochs: Validation epochs between measurements during ``fit``.
        plot: Write and log the PNG.
        enabled: ``False`` turns the monitor off (no generation, no option checks).
        classes: Classes of the batch (default: the first 10).
        generate_kwargs: Extra keyword arguments of ``generate`` (e.g. ``{"cfg": 2.0}``).
    """

    section = "sinkhorn"
    reserved_kwargs = ("generator", "trace", "refine")

    def __init__(
        self,
        num_per_class: int = 8,
        seed: int = 0,
        modes: tuple[str, ...] = ("flow",),
        on_validation: bool = False,
        on_test: bool = True,
        every_n_epochs: int = 1,
        plot: bool = True,
        enabled: bool = True,
        classes: list[int] | None = None,
        generate_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(num_per_class, classes, seed, on_validation, on_test, every_n_epochs, plot, enabled,
                         generate_kwargs)
        self.modes = (modes,) if isinstance(modes, str) else tuple(modes)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from lightning_ar.modules.refinement import MODES

        if not self.enabled:
            return
        self._check_common()
        generate = getattr(pl_module, "generate", None)
        params = inspect.signature(generate).parameters if callable(generate) else {}
        if not {"refine", "trace"} <= set(params):
            raise TypeError(
                "SinkhornDivergenceMonitor needs a module whose generate(...) takes refine= and trace= and measures "
                f"divergences (OTRefinement); got {type(pl_module).__name__}"
            )
        bad = [m for m in self.modes if m not in MODES]
        if not self.modes or bad:
            raise ValueError(f"SinkhornDivergenceMonitor.modes must be a non-empty subset of {MODES}, got {self.modes}")

    def _keys(self, mode: str) -> str:
        return "theory/" if len(self.modes) == 1 else f"theory/{mode}/"

    @override
    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> tuple[dict[str, float], Any]:
        labels, curves, metrics = self.labels(pl_module), {}, {}
        for mode in self.modes:
            trace = GenerationTrace()
            pl_module.generate(labels, refine=mode, generator=self.rng(pl_module), trace=trace, **self.generate_kwargs)
            curves[mode] = cur = sinkhorn_curves(trace)
            s, prefix = cur.summary(), self._keys(mode)
            metrics.update({f"{prefix}sinkhorn_before_mean": s["before_mean"],
                            f"{prefix}sinkhorn_after_mean": s["after_mean"],
                            f"{prefix}sinkhorn_reduction": s["reduction"]})
            if any(tr is not None for tr in cur.flow_traces):
                metrics.update({f"{prefix}flow_fraction_monotone": s["fraction_monotone"],
                                f"{prefix}flow_rho": s["rho"], f"{prefix}flow_rho_bound": s["rho_bound"]})
        self.last = {"num_samples": int(labels.numel()), "modes": {m: c.to_dict() for m, c in curves.items()}}
        if not self.plot:
            return metrics, None
        from lightning_ar.theory.plots import plot_sinkhorn

        return metrics, plot_sinkhorn(curves)
