"""Shared machinery of the theory monitors: scheduling (first validation/test batch), seeded labels and RNGs,
logging in the epoch-end hook, the PNG and the report section (see :mod:`lightning_ar.callbacks.theory`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from typing_extensions import override

from lightning_ar.contracts import HeadGenerator, head_generator
from lightning_ar.seeding import seeded_generator
from lightning_ar.theory.report import write_theory_report

MAX_DEFAULT_CLASSES = 10


def generator_module(pl_module: L.LightningModule) -> HeadGenerator:
    """The module owning the diffusion head: ``pl_module`` itself (a generator) or its ``mar_generator``."""
    return head_generator(pl_module)


class TheoryMonitor(Callback):
    """Shared scheduling, logging and file output; subclasses implement :meth:`measure`.

    Args:
        num_per_class: Samples per class in each batch.
        on_validation: Measure in validation (every ``every_n_epochs`` epochs during ``fit``).
        seed: Seed of generation (batch ``b`` uses stream ``b``), of the noise and of the bootstrap.
        on_test: Measure in ``test``.
        every_n_epochs: Validation epochs between measurements during ``fit``.
        plot: Write and log the PNG.
        enabled: ``False`` turns the monitor off (no generation, no option checks).
        classes: Classes of the batch (default: the first 10).
        generate_kwargs: Extra keyword arguments of ``generate`` (e.g. ``{"cfg": 2.0}``, or ``{"refine": "none"}``
            for ``OTRefinement``); not those the monitor sets itself.
    """

    section = ""  # "score_norm" or "sinkhorn": file names and report section
    reserved_kwargs: tuple[str, ...] = ("generator", "trace")  # generate() arguments the monitor sets itself

    def __init__(
        self,
        *,
        num_per_class: int,
        on_validation: bool,
        seed: int = 0,
        on_test: bool = True,
        every_n_epochs: int = 1,
        plot: bool = True,
        enabled: bool = True,
        classes: list[int] | None = None,
        generate_kwargs: dict[str, Any] | None = None,
    ) -> None:
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
        return seeded_generator(self.seed, stream, stride=1_000_003, device=pl_module.device)

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
    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._due(trainer, "val", batch_idx, dataloader_idx):
            self._run(trainer, pl_module, "val")

    @override
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._flush(pl_module)

    @override
    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._due(trainer, "test", batch_idx, dataloader_idx):
            self._run(trainer, pl_module, "test")

    on_test_epoch_end = on_validation_epoch_end  # log what the stage's first batch measured
