"""``GenerationMetrics``: generate for the labels of each validation/test batch and score the samples.

Works with any :class:`~lightning_ar.contracts.Generator` (``generate(labels, generator=..., **kwargs) -> latents``)
and a data module whose evaluator :func:`~lightning_ar.metrics.evaluator_for` knows (an embedded source, a registered
one, or a cache). ``variants`` compares several generation settings (samplers, refinement modes, guidance scales) from
one checkpoint with the same seeds, one row each.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_ar.callbacks.results import format_table, write_results
from lightning_ar.contracts import Generator, Refinement
from lightning_ar.io import atomic_output
from lightning_ar.metrics.base import SampleEvaluator
from lightning_ar.metrics.registry import evaluator_for
from lightning_ar.seeding import seeded_generator

DEFAULT_VARIANT = "default"


class GenerationMetrics(Callback):
    """Sample-quality metrics of generated latents, logged in ``validate``/``test``; ``test`` writes a table.

    For every validation/test batch ``(latents, labels)`` it generates one sample per label (seeded by
    ``seed``, the batch index and the process rank), times it, and feeds an evaluator per variant.

    Logged keys (``<stage>`` is ``val`` or ``test``; ``/<variant>`` is inserted after the stage unless the only
    variant is ``default``):

    - ``<stage>/<metric>``: every key of the evaluator's ``compute()`` (digits: ``fid``, ``kid``, ``cond_acc``;
      gmm: ``nll``, ``cond_acc``, ``swd``);
    - ``<stage>/<metric>_floor``: the evaluator's real-vs-real reference;
    - ``<stage>/sec_per_image``: sampling wall time per generated image;
    - ``<stage>/refine_share``: fraction of that time spent refining conditions (modules that report
      ``last_generation_stats["refine_seconds"]``, e.g. ``OTRefinement``).

    Every process logs every key with ``sync_dist=True``: the metrics are computed from the samples of all processes
    (the evaluators reduce across processes), so all processes hold the same value and ``ModelCheckpoint(monitor=
    "val/fid")`` or ``EarlyStopping`` work under DDP; the timings are averaged over the processes. Monitor a key only
    at epochs where it is computed (``every_n_epochs``).

    At the end of ``test`` the table (one row per variant, with the floors) is written to
    ``<results_dir>/results.md`` and ``results.json`` and printed. With ``save_samples`` the generated test samples
    are written too, ``<results_dir>/samples.pt`` (``torch.load``: variant -> ``{"latents": [N, C, H, W] float32,
    "labels": [N]}`` on CPU, in generation order; ``samples_rank<r>.pt`` per process with several processes), so
    that paired comparisons can be made on exactly the scored samples (``benchmarks/paper_table.py``).

    Args:
        variants: Name -> keyword arguments of ``generate`` (e.g. ``{"ddpm": {"sampler": "ddpm"}}``).
            ``None`` means one variant ``default`` with the module's defaults.
        on_validation: Also generate during validation (every ``every_n_epochs`` epochs).
        every_n_epochs: Validation epochs between evaluations.
        seed: Base seed of generation.
        results_dir: Where ``test`` writes its table (default: the trainer's log dir).
        max_batches: Generate for at most this many batches per evaluation (``None`` = all).
        save_samples: Write the generated test samples and their labels (``samples.pt``) beside the table.
    """

    def __init__(
        self,
        variants: dict[str, dict[str, Any]] | None = None,
        on_validation: bool = True,
        every_n_epochs: int = 1,
        seed: int = 0,
        results_dir: str | None = None,
        max_batches: int | None = None,
        save_samples: bool = False,
    ) -> None:
        super().__init__()
        self.variants = dict(variants) if variants else {DEFAULT_VARIANT: {}}
        self.on_validation, self.every_n_epochs, self.seed = on_validation, every_n_epochs, seed
        self.results_dir, self.max_batches, self.save_samples = results_dir, max_batches, save_samples
        self._samples: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._evaluators: dict[str, SampleEvaluator] = {}
        self._seconds: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._refine_seconds: dict[str, float] = {}
        self._active = False
        self._refines = False  # the module reports refinement time (an OTRefinement); set in setup
        self.last_results: dict[str, dict[str, float]] = {}

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.every_n_epochs < 1:
            raise ValueError(f"GenerationMetrics.every_n_epochs must be >= 1, got {self.every_n_epochs}")
        if not isinstance(pl_module, Generator):
            raise TypeError(f"GenerationMetrics needs a module with generate(labels, ...); got {type(pl_module)}")
        self._refines = isinstance(pl_module, Refinement)
        for name, kwargs in self.variants.items():
            if not isinstance(kwargs, dict):
                raise TypeError(f"GenerationMetrics.variants[{name!r}] must be a dict of generate() arguments")
            if name not in self._evaluators:  # build (may train a small model) outside the evaluation loops
                self._evaluators[name] = evaluator_for(trainer.datamodule)
                # on the process's own device: reference statistics of an Inception evaluator are a GPU-sized job
                self._evaluators[name].prepare(trainer.strategy.root_device)

    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for name in self.variants:
            self._evaluators[name].prepare(pl_module.device)
            self._evaluators[name].reset()
        self._seconds = dict.fromkeys(self.variants, 0.0)
        self._counts = dict.fromkeys(self.variants, 0)
        self._refine_seconds = dict.fromkeys(self.variants, 0.0)
        self._samples = {name: [] for name in self.variants}

    def _generate(self, trainer: L.Trainer, pl_module: L.LightningModule, labels: torch.Tensor, batch_idx: int):
        if self.max_batches is not None and batch_idx >= self.max_batches:
            return
        for name, kwargs in self.variants.items():
            seed = (self.seed * 1_000_003 + batch_idx) * max(trainer.world_size, 1) + trainer.global_rank
            generator = seeded_generator(seed, device=pl_module.device)
            _synchronize(pl_module.device)
            start = time.perf_counter()
            latents = pl_module.generate(labels, generator=generator, **kwargs)
            _synchronize(pl_module.device)
            self._seconds[name] += time.perf_counter() - start
            stats = pl_module.last_generation_stats if self._refines else {}
            self._refine_seconds[name] += float(stats.get("refine_seconds", 0.0))
            self._counts[name] += labels.shape[0]
            self._evaluators[name].update(latents, labels)
            if self.save_samples:
                self._samples[name].append((latents.detach().float().cpu(), labels.detach().cpu()))

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> dict[str, dict[str, float]]:
        results = {}
        for name in self.variants:
            row = dict(self._evaluators[name].compute())
            row.update(self._evaluators[name].reference())
            row["sec_per_image"] = self._seconds[name] / max(self._counts[name], 1)
            row["num_samples"] = float(self._counts[name])
            if self._refines:
                row["refine_share"] = self._refine_seconds[name] / max(self._seconds[name], 1e-12)
            results[name] = row
            prefix = stage if list(self.variants) == [DEFAULT_VARIANT] else f"{stage}/{name}"
            for key, value in row.items():
                if key != "num_samples":
                    pl_module.log(f"{prefix}/{key}", value, sync_dist=True)
        self.last_results = results
        return results

    # --------------------------------------------------------------------------------------------- validation
    def _val_enabled(self, trainer: L.Trainer) -> bool:
        return self.on_validation and not trainer.sanity_checking and (
            (trainer.current_epoch + 1) % self.every_n_epochs == 0 or trainer.state.fn != "fit"
        )

    @override
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._active = self._val_enabled(trainer)
        if self._active:
            self._start(trainer, pl_module)

    @override
    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._active:
            self._generate(trainer, pl_module, batch[1], batch_idx)

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._active:
            self._finish(trainer, pl_module, "val")
        self._active = False

    # ---------------------------------------------------------------------------------------------------- test
    @override
    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module)

    @override
    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._generate(trainer, pl_module, batch[1], batch_idx)

    @override
    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        results = self._finish(trainer, pl_module, "test")
        log_dir = trainer.log_dir  # a collective under DDP: every process must call it
        out_dir = Path(self.results_dir or log_dir or trainer.default_root_dir)
        if self.save_samples:
            self._write_samples(out_dir, trainer)
        if trainer.is_global_zero:
            paths = write_results(results, out_dir, title=f"Test results ({type(pl_module).__name__})")
            rank_zero_info(f"\n{format_table(results)}\nResults written to {paths[0]} and {paths[1]}")

    def _write_samples(self, out_dir: Path, trainer: L.Trainer) -> Path:
        """``samples.pt`` (one process) or ``samples_rank<r>.pt``: variant -> latents and labels, written atomically."""
        name = "samples.pt" if trainer.world_size <= 1 else f"samples_rank{trainer.global_rank}.pt"
        payload = {}
        for variant, parts in self._samples.items():
            latents = torch.cat([x for x, _ in parts]) if parts else torch.empty(0)
            labels = torch.cat([y for _, y in parts]) if parts else torch.empty(0, dtype=torch.long)
            payload[variant] = {"latents": latents, "labels": labels}
        with atomic_output(out_dir / name) as tmp:
            torch.save(payload, tmp)
        return out_dir / name


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
