"""``SampleGrid``: a PNG grid of generated samples (one row per class), written and logged at validation/test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torchvision.utils import make_grid, save_image
from typing_extensions import override

from lightning_ar.callbacks.image_log import log_image_to_all
from lightning_ar.contracts import Decodes
from lightning_ar.seeding import seeded_generator


class SampleGrid(Callback):
    """Generate ``num_per_class`` samples of every class and save them as a grid (rows = classes).

    The grid is generated at the end of the first validation (or test) batch, i.e. with the weights that
    validation uses (the EMA weights under ``EMAWeightAveraging``), from a fixed seed so grids of successive
    epochs are comparable. Process 0 generates it (the others only join the collective ``trainer.log_dir``), writes
    ``<log_dir>/samples/<stage>_epoch<NNN>.png`` and ``<stage>_latest.png``, and logs it as image ``samples/<stage>``
    to every logger that takes images (:mod:`lightning_ar.callbacks.image_log`: TensorBoard, W&B, MLflow; a CSV
    logger gets a PNG beside its ``metrics.csv``).

    Args:
        num_per_class: Columns of the grid.
        classes: Classes to show (default: all, up to 10).
        upscale: Nearest-neighbour magnification of the saved image (small latents are hard to see).
        seed: Seed of generation.
        every_n_epochs: Validation epochs between grids.
        on_test: Also write a grid in ``test``.
        generate_kwargs: Extra keyword arguments for ``generate`` (e.g. ``{"cfg": 3.0}``).
    """

    def __init__(
        self,
        num_per_class: int = 8,
        classes: list[int] | None = None,
        upscale: int = 4,
        seed: int = 0,
        every_n_epochs: int = 1,
        on_test: bool = True,
        generate_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.num_per_class, self.classes, self.upscale, self.seed = num_per_class, classes, upscale, seed
        self.every_n_epochs, self.on_test = every_n_epochs, on_test
        self.generate_kwargs = dict(generate_kwargs or {})
        self.last_path: Path | None = None
        self.logged_to: list[str] = []

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.num_per_class < 1 or self.upscale < 1 or self.every_n_epochs < 1:
            raise ValueError("SampleGrid.num_per_class, upscale and every_n_epochs must be >= 1")
        if not isinstance(trainer.datamodule, Decodes):
            raise TypeError("SampleGrid needs a data module with decode(latents) (e.g. LatentDataModule)")

    def _labels(self, pl_module: L.LightningModule) -> Tensor:
        classes = self.classes if self.classes is not None else range(min(pl_module.hparams.num_classes, 10))
        return torch.tensor(list(classes), device=pl_module.device).repeat_interleave(self.num_per_class)

    def grid(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Tensor:
        """Generate and decode the grid: ``[C, H', W']`` float image in ``[0, 1]``."""
        generator = seeded_generator(self.seed, device=pl_module.device)
        latents = pl_module.generate(self._labels(pl_module), generator=generator, **self.generate_kwargs)
        images = (trainer.datamodule.decode(latents).float().clamp(-1, 1) + 1) / 2  # (B, C, H, W) in [0, 1]
        images = images.repeat_interleave(self.upscale, dim=-1).repeat_interleave(self.upscale, dim=-2)
        return make_grid(images.cpu(), nrow=self.num_per_class, padding=2, pad_value=1.0)

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        log_dir = trainer.log_dir  # a collective under DDP: every process must call it
        if not trainer.is_global_zero:
            return
        grid = self.grid(trainer, pl_module)
        out_dir = Path(log_dir or trainer.default_root_dir) / "samples"
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{stage}_epoch{trainer.current_epoch:03d}.png"
        save_image(grid, path)
        save_image(grid, out_dir / f"{stage}_latest.png")
        self.last_path = path
        self.logged_to = log_image_to_all(trainer.loggers, f"samples/{stage}", grid, trainer.global_step)

    @override
    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx or dataloader_idx or trainer.sanity_checking:
            return
        if trainer.state.fn == "fit" and (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self._write(trainer, pl_module, "val")

    @override
    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.on_test and batch_idx == 0 and dataloader_idx == 0:
            self._write(trainer, pl_module, "test")
