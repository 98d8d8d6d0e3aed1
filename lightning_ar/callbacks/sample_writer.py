"""``SampleWriter``: writes what ``predict`` generates (latents, decoded uint8 images, labels, indices)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override

from lightning_ar.io import atomic_output
from lightning_ar.metrics.image_io import quantize


def atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez`` written atomically."""
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def to_uint8_nhwc(images: torch.Tensor) -> np.ndarray:
    """Images ``[B, C, H, W]`` in ``[-1, 1]`` to ``uint8`` ``[B, H, W, C]`` (see ``metrics.image_io.quantize``)."""
    return quantize(images).permute(0, 2, 3, 1).cpu().numpy()


class SampleWriter(BasePredictionWriter):
    """Write each ``predict`` batch to ``<output_dir>/samples_rank<R>_batch<NNNNN>.npz``.

    Each file holds ``latents`` (float32 ``[B, C, H, W]``), ``images`` (uint8 ``[B, H, W, C]``, decoded by the
    data module), ``labels`` and ``indices`` (int64 ``[B]``). Files are written atomically.

    Args:
        output_dir: Folder of the files (default: ``<log_dir>/predictions``).
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self._resolved: Path | None = None

    def _dir(self, trainer: L.Trainer) -> Path:
        # resolved once in on_predict_start: trainer.log_dir is a collective, processes may run unequal batch counts
        if self._resolved is not None:
            return self._resolved
        return Path(self.output_dir or Path(trainer.log_dir or trainer.default_root_dir) / "predictions")

    @override
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._resolved = None
        self._resolved = self._dir(trainer)

    @override
    def write_on_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: dict[str, Any], batch_indices: Any,
        batch: Any, batch_idx: int, dataloader_idx: int = 0,
    ) -> None:
        images = trainer.datamodule.decode(prediction["latents"])
        path = self._dir(trainer) / f"samples_rank{trainer.global_rank}_batch{batch_idx:05d}.npz"
        atomic_save_npz(
            path,
            latents=prediction["latents"].float().cpu().numpy(),
            images=to_uint8_nhwc(images),
            labels=prediction["labels"].cpu().numpy(),
            indices=prediction["indices"].cpu().numpy(),
        )
