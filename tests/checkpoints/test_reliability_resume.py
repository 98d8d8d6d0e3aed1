"""Reliability, exact resume: 9 optimizer steps in one run == a run SIGKILLed after step 3 (its epoch-end checkpoint)
and resumed with ``--ckpt_path last``: weights, EMA weights, AdamW state, LR and data order, bitwise on CPU.

Also: the same with the shipped config and its logger on, resume with nothing to resume (an error), atomic
checkpoint writes.

Checkpoints are taken at epoch ends (3 batches an epoch): Lightning 2.x does not fast-forward a plain DataLoader
resumed mid-epoch (it replays the epoch from its first batch), see README "Reliability".
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

pytestmark = pytest.mark.slow  # subprocess CLI runs (CI runs slow tests too)

REPO = Path(__file__).resolve().parents[2]
DIGITS = str(REPO / "configs/digits/mar.yaml")


class KillAtStep(Callback):
    """Test helper: SIGKILL this process when the batch of optimizer step ``step`` starts (no clean shutdown)."""

    def __init__(self, step: int = -1) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def write_config(root: Path, kill_at: int = -1, epochs: int = 3) -> Path:
    """A tiny digits run: 3 batches an epoch, EMA, a checkpoint at every epoch end, dropout on (global RNG)."""
    config = {
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": -1, "max_epochs": epochs,
            "limit_train_batches": 3, "limit_val_batches": 0.0, "logger": False, "enable_progress_bar": False,
            "enable_model_summary": False, "default_root_dir": str(root),
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.EMAWeightAveraging", "init_args": {"decay": 0.9}},
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(root / "ckpt"), "save_last": True, "save_top_k": -1,
                               "every_n_epochs": 1, "save_on_train_epoch_end": True}},
                {"class_path": "test_reliability_resume.KillAtStep", "init_args": {"step": kill_at}},
            ],
        },
        "model": {"init_args": {"width": 16, "encoder_depth": 1, "decoder_depth": 1, "num_heads": 2,
                                "head_width": 16, "head_depth": 1, "num_iter": 2, "num_sampling_steps": 2,
                                "dropout": 0.1, "diffusion_batch_mul": 2}},
        "data": {"batch_size": 8},
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "resume.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent), str(REPO)])}  # KillAtStep
    return subprocess.run([sys.executable, "-m", "lightning_ar.cli", *args], env=env, cwd=REPO, timeout=timeout,
                          capture_output=True, text=True)


def fit(root: Path, kill_at: int = -1, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("fit", "--config", DIGITS, "--config", str(write_config(root, kill_at)), *extra)


def assert_same(a, b, where: str = "ckpt") -> None:
    """Recursive bitwise equality of tensors (and equality of plain values) in nested dicts/lists."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs (max abs diff {(a.float() - b.float()).abs().max():.3g})"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def training_state(path: Path) -> dict:
    """What must match after resume: EMA weights (state_dict), current weights (EMA callback state), AdamW state,
    LR scheduler, step/epoch counters and the sampler position (the fit loop's progress)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    ema = {k: v for k, v in ckpt["callbacks"].items() if "WeightAveraging" in k}
    return {
        "state_dict": ckpt["state_dict"], "optimizer_states": ckpt["optimizer_states"],
        "lr_schedulers": ckpt["lr_schedulers"], "global_step": ckpt["global_step"], "epoch": ckpt["epoch"],
        "ema_callback": ema, "fit_progress": ckpt["loops"]["fit_loop"]["epoch_progress"],
    }


def test_sigkill_then_resume_is_bitwise_identical(tmp_path: Path) -> None:
    straight = fit(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = fit(tmp_path / "killed", 4)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    mid = torch.load(tmp_path / "killed/ckpt/last.ckpt", weights_only=False)
    assert mid["global_step"] == 3  # died in epoch 1, after the checkpoint of epoch 0
    resumed = fit(tmp_path / "killed", -1, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = training_state(tmp_path / "straight/ckpt/last.ckpt"), training_state(tmp_path / "killed/ckpt/last.ckpt")
    assert a["global_step"] == 9 and a["ema_callback"], "EMA state missing from the checkpoint"
    assert_same(a, b)


@pytest.mark.parametrize("config", ["digits/mar.yaml", "digits/ar.yaml", "digits/cdm.yaml", "gmm/mar.yaml"])
def test_shipped_configs_checkpoint_every_epoch(config: str, tmp_path: Path) -> None:
    """With the shipped configs' ModelCheckpoint, a run SIGKILLed in its second epoch leaves the first epoch's
    checkpoint as ``last.ckpt``, and a finished run leaves its final step there (also when it ends mid-epoch)."""
    def run(root: Path, *extra: str) -> subprocess.CompletedProcess:
        return run_cli("fit", "--config", str(REPO / "configs" / config), "--config", str(REPO / "configs/debug.yaml"),
                       "--trainer.default_root_dir", str(root), "--trainer.logger", "false",
                       "--trainer.enable_progress_bar", "false", "--trainer.limit_train_batches", "2",
                       "--trainer.limit_val_batches", "0", "--trainer.max_epochs", "3", *extra)

    finished = run(tmp_path / "finished", "--trainer.max_steps", "5")
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert torch.load(tmp_path / "finished/checkpoints/last.ckpt", weights_only=False)["global_step"] == 5
    killed = run(tmp_path / "killed", "--trainer.max_steps", "-1",
                 "--trainer.callbacks+=test_reliability_resume.KillAtStep", "--trainer.callbacks.step", "3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert torch.load(tmp_path / "killed/checkpoints/last.ckpt", weights_only=False)["global_step"] == 2


def shipped(root: Path, *extra: str) -> subprocess.CompletedProcess:
    """The shipped digits config as it is (TensorBoard logger on, its ModelCheckpoint), with a tiny model and an
    epoch-bounded budget of 3 epochs x 3 batches (dropout on: the global RNG matters)."""
    return run_cli("fit", "--config", DIGITS, "--config", str(REPO / "configs/debug.yaml"),
                   "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
                   "--trainer.enable_progress_bar", "false", "--trainer.limit_train_batches", "3",
                   "--trainer.limit_val_batches", "0", "--trainer.max_steps", "-1", "--trainer.max_epochs", "3",
                   "--model.init_args.dropout", "0.1", *extra)


def test_resume_with_the_shipped_config_and_its_logger(tmp_path: Path) -> None:
    """``--ckpt_path last`` with the logger on: the resumed run continues in the killed run's version directory and
    ends bitwise where an uninterrupted run ends (before: a new version_1 directory and training from step 0)."""
    straight = shipped(tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = shipped(tmp_path / "killed", "--trainer.callbacks+=test_reliability_resume.KillAtStep",
                     "--trainer.callbacks.step", "4")  # mid-epoch 1: its last checkpoint is epoch 0's
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = shipped(tmp_path / "killed", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restored all states from the checkpoint" in resumed.stdout + resumed.stderr
    assert sorted(p.name for p in (tmp_path / "killed" / "mar").iterdir()) == ["version_0"]
    a = training_state(tmp_path / "straight/mar/version_0/checkpoints/last.ckpt")
    b = training_state(tmp_path / "killed/mar/version_0/checkpoints/last.ckpt")
    assert a["global_step"] == 9
    assert_same(a, b)


def test_resume_with_the_shipped_step_budget_continues_from_the_checkpoint(tmp_path: Path) -> None:
    """The shipped configs bound training by ``max_steps``: resume continues from the last epoch-end checkpoint to the
    step budget in the same version directory (not bitwise: Lightning 2.6 replays one batch, README "Reliability")."""
    budget = ("--trainer.max_steps", "8", "--trainer.max_epochs", "-1")
    killed = shipped(tmp_path, *budget, "--trainer.callbacks+=test_reliability_resume.KillAtStep",
                     "--trainer.callbacks.step", "4")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = shipped(tmp_path, *budget, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restoring states from the checkpoint path at" in resumed.stdout + resumed.stderr
    assert sorted(p.name for p in (tmp_path / "mar").iterdir()) == ["version_0"]
    assert training_state(tmp_path / "mar/version_0/checkpoints/last.ckpt")["global_step"] == 8


def test_resume_with_nothing_to_resume_is_an_error(tmp_path: Path) -> None:
    result = shipped(tmp_path, "--ckpt_path", "last")
    assert result.returncode == 2
    assert "--ckpt_path last: no last checkpoint to resume from" in result.stderr
    assert "Traceback" not in result.stderr and not list(tmp_path.rglob("*.ckpt"))


def test_checkpoint_writes_are_atomic(tmp_path: Path) -> None:
    """A write that fails (disk full) leaves the previous checkpoint intact and no partial or temporary file."""
    from lightning_ar.checkpoints.atomic_io import AtomicCheckpointIO

    io, target = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, target)

    def full_disk(obj, handle) -> None:
        handle.write(b"PK\x03\x04 partial bytes")
        raise OSError(28, "No space left on device")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch, "save", full_disk)
        with pytest.raises(OSError, match="No space left"):
            io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert torch.load(target, weights_only=True)["step"] == 1


def test_cli_writes_checkpoints_with_the_atomic_plugin(tmp_path: Path) -> None:
    from lightning_ar.checkpoints.atomic_io import AtomicCheckpointIO
    from lightning_ar.cli import build_cli

    cli = build_cli(["--config", DIGITS, "--config", str(REPO / "configs/debug.yaml"), "--trainer.default_root_dir",
                     str(tmp_path)], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
