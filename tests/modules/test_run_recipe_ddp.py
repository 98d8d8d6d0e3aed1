"""MAR's learning-rate recipe read from the run, and metric monitoring under DDP: ``fit`` with 1 and 2 CPU processes
(gloo) through the CLI.

- ``lr = base_lr x global batch / 256`` and the warmup steps of ``warmup_epochs`` follow the world size, the batch size
  and the dataset length (the same config, nothing edited between the runs);
- ``GenerationMetrics`` logs every key reduced over the processes, so ``ModelCheckpoint(monitor="val/fid")`` sees one
  value on every process and all processes agree on the best score, whatever key is monitored (logged with
  ``rank_zero_only=True`` instead, each process kept its own value: equal for the gathered metrics, different for
  the per-process timings ``val/sec_per_image``);
- ``SampleGrid`` (in the digits config) calls the collective ``trainer.log_dir`` on every process (no hang).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightning_ar import LatentDataModule

pytestmark = pytest.mark.slow  # two subprocess CLI runs, one of them with 2 processes

REPO = Path(__file__).resolve().parents[2]
DIGITS, DEBUG = str(REPO / "configs/digits/mar.yaml"), str(REPO / "configs/debug.yaml")
BATCH, BASE_LR, WARMUP_EPOCHS = 16, 1e-4, 2

PROBE = '''
import json
from pathlib import Path
from lightning.pytorch.callbacks import Callback, ModelCheckpoint


class Probe(Callback):
    """Writes what this process sees: the recipe's lr and warmup, and the monitored checkpoint's best score."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_start(self, trainer, pl_module):
        scheduler = trainer.lr_scheduler_configs[0].scheduler
        self.seen = {"world_size": trainer.world_size, "num_training_batches": trainer.num_training_batches,
                     "initial_lr": [g["initial_lr"] for g in trainer.optimizers[0].param_groups],
                     "warmup_steps": scheduler.lr_lambdas[0].warmup_steps}

    def on_fit_end(self, trainer, pl_module):
        ckpt = next(c for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.monitor)
        self.seen.update(best_score=None if ckpt.best_model_score is None else float(ckpt.best_model_score),
                         best_path=ckpt.best_model_path,
                         val={k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.seen))
'''


def _fit(root: Path, devices: int) -> dict[int, dict]:
    """``lightning-ar fit`` of the digits config with the recipe and a ``val/fid``-monitored checkpoint."""
    out = root / f"world{devices}"
    config = {
        "trainer": {"accelerator": "cpu", "devices": devices, "strategy": "ddp" if devices > 1 else "auto",
                    "logger": False, "enable_progress_bar": False, "default_root_dir": str(out),
                    "max_steps": -1, "limit_train_batches": 1.0, "limit_val_batches": 0.2,  # an epoch, then val
                    "callbacks": [
                        {"class_path": "lightning_ar.callbacks.GenerationMetrics", "init_args": {"max_batches": 1}},
                        {"class_path": "lightning_ar.callbacks.SampleGrid", "init_args": {"num_per_class": 1}},
                        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                         "init_args": {"dirpath": str(out / "ckpt"), "monitor": "val/fid", "mode": "min",
                                       "save_top_k": 1, "filename": "best", "auto_insert_metric_name": False}},
                        {"class_path": "probe16.Probe", "init_args": {"out": str(out / "probe")}}]},
        "model": {"init_args": {"base_lr": BASE_LR, "warmup_epochs": WARMUP_EPOCHS, "lr_scheduler": None,
                                "num_iter": 2, "num_sampling_steps": 2}},
        "data": {"batch_size": BATCH},
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "probe16.py").write_text(PROBE)
    (root / f"fit{devices}.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(root)])}
    args = [sys.executable, "-m", "lightning_ar.cli", "fit", "--config", DIGITS, "--config", DEBUG,
            "--config", str(root / f"fit{devices}.yaml")]
    done = subprocess.run(args, env=env, cwd=root, timeout=400, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return {rank: json.loads((out / "probe" / f"rank{rank}.json").read_text()) for rank in range(devices)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[int, dict]]:
    root = tmp_path_factory.mktemp("recipe")
    return {devices: _fit(root, devices) for devices in (1, 2)}


def _train_items() -> int:
    return len(LatentDataModule("digits").source.split("train")[1])


@pytest.mark.parametrize("world", [1, 2])
def test_lr_and_warmup_follow_the_world_size(runs: dict, world: int) -> None:
    steps_per_epoch = math.ceil(math.ceil(_train_items() / world) / BATCH)  # DistributedSampler pads to equal shares
    for seen in runs[world].values():
        assert seen["world_size"] == world and seen["num_training_batches"] == steps_per_epoch
        assert seen["initial_lr"] == pytest.approx([BASE_LR * BATCH * world / 256] * 2)
        assert seen["warmup_steps"] == WARMUP_EPOCHS * steps_per_epoch
    one, two = runs[1][0], runs[2][0]
    assert two["initial_lr"][0] == pytest.approx(2 * one["initial_lr"][0])  # same config, twice the global batch
    assert abs(2 * two["warmup_steps"] - one["warmup_steps"]) <= 2 * WARMUP_EPOCHS  # half the steps per epoch


def test_model_checkpoint_monitors_val_fid_on_every_process(runs: dict) -> None:
    ranks = runs[2]
    assert set(ranks) == {0, 1}
    for seen in ranks.values():
        assert seen["best_score"] is not None and math.isfinite(seen["best_score"]) and seen["best_score"] > 0
        assert seen["best_score"] == pytest.approx(seen["val"]["val/fid"])
    assert ranks[0]["best_score"] == pytest.approx(ranks[1]["best_score"])  # one value, seen by both processes
    assert {"val/fid", "val/cond_acc", "val/sec_per_image", "val/fid_floor"} <= set(ranks[0]["val"])
    assert ranks[0]["val"] == ranks[1]["val"]  # every key, the per-process timing included, is one value
    assert Path(ranks[0]["best_path"]).name == "best.ckpt" and Path(ranks[0]["best_path"]).is_file()
