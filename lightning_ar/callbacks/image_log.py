"""Log an image to every logger of a Trainer that takes images (TensorBoard, W&B, MLflow; CSV gets a PNG file).

Lightning's loggers have no common image API, so :func:`log_image` dispatches on the logger type:

- ``TensorBoardLogger``: ``experiment.add_image(tag, image, global_step=step)``;
- ``WandbLogger``: ``log_image(key=tag, images=[HWC uint8], step=step)``;
- ``MLFlowLogger``: ``experiment.log_image(run_id, HWC uint8, artifact_file="<tag>/step<NNNNNNNN>.png")``;
- ``CSVLogger`` (text only): a PNG ``<log_dir>/<tag>_step<NNNNNNNN>.png`` beside its ``metrics.csv``;
- other loggers: nothing (the caller's own PNG under the trainer's log dir remains).

The W&B and MLflow branches need those packages only when such a logger is configured (its own requirement).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from torch import Tensor
from torchvision.utils import save_image

from lightning_ar.io import atomic_output


def to_hwc_uint8(image: Tensor) -> np.ndarray:
    """``[C, H, W]`` float in ``[0, 1]`` -> ``uint8`` ``[H, W, C]`` (``C`` 1 is kept, for grayscale)."""
    return (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def _png_name(tag: str, step: int) -> str:
    return f"{tag.replace('/', '_')}_step{step:08d}.png"


def log_image(logger: Logger, tag: str, image: Tensor, step: int) -> str | None:
    """Log ``image`` (``[C, H, W]`` float in ``[0, 1]``) under ``tag`` at ``step``.

    Returns:
        How it was logged (``"tensorboard"``, ``"wandb"``, ``"mlflow"``, ``"png"``), or ``None`` for a logger that
        takes no images.
    """
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(tag, image, global_step=step)
        return "tensorboard"
    if isinstance(logger, WandbLogger):
        logger.log_image(key=tag, images=[to_hwc_uint8(image)], step=step)
        return "wandb"
    if isinstance(logger, MLFlowLogger):
        logger.experiment.log_image(logger.run_id, to_hwc_uint8(image), artifact_file=f"{tag}/step{step:08d}.png")
        return "mlflow"
    if isinstance(logger, CSVLogger):
        path = Path(logger.log_dir) / _png_name(tag, step)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(path) as tmp:
            save_image(image, tmp, format="png")
        return "png"
    return None


def log_image_to_all(loggers: list[Logger], tag: str, image: Tensor, step: int) -> list[str]:
    """:func:`log_image` for each logger; returns the non-``None`` results."""
    return [how for logger in loggers if (how := log_image(logger, tag, image, step)) is not None]
