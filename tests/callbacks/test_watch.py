"""Watching runs: sample grids reach every logger that takes images, and progress bars show outside Trainer stages."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger
from PIL import Image

from lightning_ar import LatentDataModule
from lightning_ar.callbacks import SampleGrid, batch_size
from lightning_ar.callbacks.image_log import log_image, to_hwc_uint8
from lightning_ar.progress import default_progress


def _trainer(tmp_path: Path, loggers: list, callbacks: list) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=loggers, callbacks=callbacks, limit_val_batches=1,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)


def _tensorboard_images(log_dir: str) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(log_dir, size_guidance={"images": 0})
    events.Reload()
    return {tag: events.Images(tag) for tag in events.Tags()["images"]}


def test_sample_grid_reaches_tensorboard_and_csv(tiny_generator, tmp_path: Path) -> None:
    tensorboard = TensorBoardLogger(tmp_path, name="tb")
    csv = CSVLogger(tmp_path, name="csv")
    grid = SampleGrid(num_per_class=2, classes=[0, 1, 2])
    trainer = _trainer(tmp_path, [tensorboard, csv], [grid])
    trainer.validate(tiny_generator, LatentDataModule("digits", batch_size=8))
    assert grid.logged_to == ["tensorboard", "png"]
    images = _tensorboard_images(tensorboard.log_dir)
    assert list(images) == ["samples/val"] and len(images["samples/val"]) == 1
    png = Path(tensorboard.log_dir) / "samples" / "val_latest.png"  # the first logger's dir holds the grid files
    expected = np.asarray(Image.open(png))
    assert expected.shape[0] == 3 * (8 * 4 + 2) + 2  # 3 class rows of 8x8 digits x upscale 4, 2 px padding
    csv_png = Path(csv.log_dir) / "samples_val_step00000000.png"
    np.testing.assert_array_equal(np.asarray(Image.open(csv_png)), expected)


class _FakeWandb(WandbLogger):
    """A W&B logger without wandb: records ``log_image`` calls."""

    def __init__(self) -> None:  # no super().__init__: it needs the wandb package
        self.calls: list = []

    def log_image(self, key, images, step=None, **kwargs) -> None:
        self.calls.append((key, images, step))


class _FakeMlflow(MLFlowLogger):
    """An MLflow logger without mlflow: its ``experiment`` (an MlflowClient) records ``log_image`` calls."""

    def __init__(self) -> None:  # no super().__init__: it needs the mlflow package
        self.calls: list = []
        self._run_id = "run-1"

    @property
    def experiment(self):
        logger = self

        class Client:
            def log_image(self, run_id, image, artifact_file=None):
                logger.calls.append((run_id, image, artifact_file))

        return Client()

    @property
    def run_id(self) -> str:
        return self._run_id


def test_image_log_dispatches_to_wandb_and_mlflow() -> None:
    image = torch.rand(3, 10, 12, generator=torch.Generator().manual_seed(0))
    wandb, mlflow = _FakeWandb(), _FakeMlflow()
    assert log_image(wandb, "samples/val", image, 7) == "wandb"
    assert log_image(mlflow, "samples/val", image, 7) == "mlflow"
    (key, images, step), = wandb.calls
    assert (key, step) == ("samples/val", 7) and images[0].dtype == np.uint8 and images[0].shape == (10, 12, 3)
    run_id, array, artifact = mlflow.calls[0]
    assert (run_id, artifact) == ("run-1", "samples/val/step00000007.png")
    np.testing.assert_array_equal(array, to_hwc_uint8(image))
    assert log_image(object(), "samples/val", image, 7) is None  # loggers without images are skipped


class _GenerateInValidation(L.Callback):
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx == 0:
            self.progress = default_progress(None, pl_module)
            pl_module.generate(torch.tensor([1, 2]), num_iter=2, num_sampling_steps=2,
                               generator=torch.Generator().manual_seed(0))


def test_generate_shows_progress_outside_trainer_stages(tiny_generator, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    labels, kwargs = torch.tensor([1, 2]), {"num_iter": 3, "num_sampling_steps": 2}
    tiny_generator.generate(labels, generator=torch.Generator().manual_seed(0), **kwargs)
    assert "AR steps" in capsys.readouterr().err  # from Python (and notebooks): a bar by default
    tiny_generator.generate(labels, generator=torch.Generator().manual_seed(0), progress=False, **kwargs)
    assert "AR steps" not in capsys.readouterr().err
    probe = _GenerateInValidation()
    _trainer(tmp_path, [], [probe]).validate(tiny_generator, LatentDataModule("digits", batch_size=8))
    assert probe.progress is False and "AR steps" not in capsys.readouterr().err  # Lightning's bar reports there
    assert default_progress(None, tiny_generator) is True  # the stage is over


def test_batch_size_fn_counts_samples() -> None:
    assert batch_size((torch.zeros(5, 1, 8, 8), torch.zeros(5))) == 5
    assert batch_size([torch.arange(3), torch.arange(3)]) == 3 and batch_size(torch.zeros(4, 2)) == 4
