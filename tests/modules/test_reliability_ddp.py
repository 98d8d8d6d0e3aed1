"""Reliability, distributed on CPU: ``fit``, ``test`` and ``predict`` with 2 processes (DDP, gloo) through the CLI;
sharded generation covers every (label, index) once and equals the 1-process output for the same seeds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.slow  # subprocess CLI runs (CI runs slow tests too)

REPO = Path(__file__).resolve().parents[2]
DIGITS, DEBUG = str(REPO / "configs/digits/mar.yaml"), str(REPO / "configs/debug.yaml")
PER_CLASS, BATCH = 3, 4  # 30 samples in 8 blocks of 4 (the last one of 2): ranks get 4 blocks each


def cli(root: Path, stage: str, devices: int, *extra: str) -> subprocess.CompletedProcess:
    config = {
        "trainer": {"accelerator": "cpu", "devices": devices, "strategy": "ddp" if devices > 1 else "auto",
                    "logger": False, "enable_progress_bar": False, "default_root_dir": str(root),
                    "max_steps": 4, "limit_train_batches": 2, "limit_val_batches": 0.0, "limit_test_batches": 2,
                    "limit_predict_batches": 1.0,
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(root / "ckpt"), "save_last": True}}]},
        "model": {"init_args": {"num_iter": 2, "num_sampling_steps": 3, "cfg": 2.0}},
        "data": {"batch_size": BATCH, "predict_per_class": PER_CLASS},
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{stage}{devices}.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "lightning_ar.cli", stage, "--config", DIGITS, "--config", DEBUG,
            "--config", str(root / f"{stage}{devices}.yaml"), *extra]
    done = subprocess.run(args, env=env, cwd=REPO, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def predicted(root: Path, ckpt: Path, devices: int) -> dict[int, np.ndarray]:
    """Latents by index, from the per-batch files of ``AdmNpzWriter`` (which checks coverage on gather)."""
    out = root / f"pred{devices}"
    cli(root, "predict", devices, "--ckpt_path", str(ckpt), "--trainer.callbacks+=lightning_ar.callbacks.AdmNpzWriter",
        f"--trainer.callbacks.output_dir={out}")
    with np.load(out / "samples.npz") as adm:
        assert adm["arr_0"].shape[0] == 10 * PER_CLASS
        assert adm["arr_1"].tolist() == [i // PER_CLASS for i in range(10 * PER_CLASS)]
    latents = {}
    for part in sorted(out.glob("samples_rank*_batch*.npz")):
        with np.load(part) as data:
            for index, latent in zip(data["indices"].tolist(), data["latents"]):
                assert index not in latents, f"index {index} generated twice"
                latents[index] = latent
    return latents


@pytest.fixture(scope="module")
def ddp_fit(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    cli(root, "fit", 2)
    return root


def test_fit_and_test_with_two_processes(ddp_fit: Path) -> None:
    assert (ddp_fit / "ckpt/last.ckpt").is_file()
    done = cli(ddp_fit, "test", 2, "--ckpt_path", str(ddp_fit / "ckpt/last.ckpt"))
    assert "test/loss" in done.stdout
    assert "distributed_backend=gloo" in done.stderr + done.stdout and "All distributed processes registered" in (
        done.stderr + done.stdout)


def test_sharded_generation_covers_every_index_and_matches_one_process(ddp_fit: Path) -> None:
    ckpt = ddp_fit / "ckpt/last.ckpt"
    two, one = predicted(ddp_fit, ckpt, 2), predicted(ddp_fit, ckpt, 1)
    assert sorted(two) == sorted(one) == list(range(10 * PER_CLASS))
    ranks = {p.name.split("_")[1] for p in (ddp_fit / "pred2").glob("samples_rank*_batch*.npz")}
    assert ranks == {"rank0", "rank1"}, "both processes must generate"
    for index in one:
        np.testing.assert_array_equal(two[index], one[index], err_msg=f"index {index}")


def test_cli_tears_down_the_process_group(tmp_path: Path) -> None:
    """A DDP stage leaves Lightning's process group alive; ``main`` destroys it, or gloo's threads can abort the
    process at interpreter exit (SIGABRT after a successful run)."""
    import torch.distributed as dist

    from lightning_ar.cli import main

    before = {key: os.environ.get(key) for key in ("LOCAL_RANK", "NODE_RANK", "MASTER_PORT", "MASTER_ADDR",
                                                   "WORLD_SIZE")}
    main(["test", "--config", DIGITS, "--config", DEBUG, "--trainer.strategy", "ddp", "--trainer.devices", "1",
          "--trainer.accelerator", "cpu", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
          "--trainer.default_root_dir", str(tmp_path)])
    assert dist.is_available() and not dist.is_initialized()
    # and the launch variables are gone: a later 2-process run started from here (a subprocess inherits them) took
    # LOCAL_RANK for "launched externally" and waited forever for a rank 1 it never started
    launch = ("LOCAL_RANK", "NODE_RANK", "MASTER_PORT", "MASTER_ADDR", "WORLD_SIZE")
    assert {key: os.environ.get(key) for key in launch} == before
