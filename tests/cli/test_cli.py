"""The `lightning-ar` CLI end to end with the debug overlay: fit, test, predict, print_config, loggers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from lightning_ar.cli import main

REPO = Path(__file__).resolve().parents[2]
DIGITS, DEBUG = str(REPO / "configs/digits/mar.yaml"), str(REPO / "configs/debug.yaml")


def _args(stage: str, root: Path, *extra: str) -> list[str]:
    return [
        stage, "--config", DIGITS, "--config", DEBUG,
        "--trainer.default_root_dir", str(root),
        "--trainer.logger.init_args.save_dir", str(root),
        "--trainer.logger.init_args.name", "run",
        "--trainer.logger.init_args.version", stage,
        "--trainer.enable_progress_bar", "false",
        *extra,
    ]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    main(_args("fit", root))
    return root


def test_fit_writes_checkpoint_config_and_grid(fitted: Path) -> None:
    run = fitted / "run" / "fit"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "samples" / "val_latest.png").is_file()
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["class_path"] == "lightning_ar.MARGenerator"


def test_test_writes_results_table(fitted: Path) -> None:
    main(_args("test", fitted, "--ckpt_path", str(fitted / "run/fit/checkpoints/last.ckpt")))
    run = fitted / "run" / "test"
    results = json.loads((run / "results.json").read_text())["default"]
    assert {"fid", "fid_floor", "cond_acc", "cond_acc_floor", "sec_per_image"} <= set(results)
    assert results["num_samples"] > 0
    table = (run / "results.md").read_text()
    assert "| variant |" in table and "fid_floor" in table
    assert (run / "samples" / "test_latest.png").is_file()


def test_predict_writes_samples(fitted: Path) -> None:
    out = fitted / "pred"
    main(_args(
        "predict", fitted, "--ckpt_path", str(fitted / "run/fit/checkpoints/last.ckpt"),
        "--trainer.callbacks+=lightning_ar.callbacks.SampleWriter",
        f"--trainer.callbacks.output_dir={out}",
    ))
    files = sorted(out.glob("samples_rank0_batch*.npz"))
    assert files
    data = np.load(files[0])
    assert data["images"].dtype == np.uint8 and data["images"].shape[1:] == (8, 8, 1)
    assert data["latents"].shape[1:] == (1, 8, 8) and len(data["labels"]) == len(data["indices"])


def test_csv_logger_works(tmp_path: Path) -> None:
    main([
        "fit", "--config", DIGITS, "--config", DEBUG, "--trainer.default_root_dir", str(tmp_path),
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}",
        "--trainer.enable_progress_bar", "false",
    ])
    metrics = next(tmp_path.rglob("metrics.csv")).read_text()
    assert "val/fid" in metrics and "train/loss" in metrics
    assert next(tmp_path.rglob("val_latest.png")).is_file()


def test_print_config(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", DIGITS, "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: lightning_ar.MARGenerator" in printed and "source: digits" in printed


def test_unknown_option_is_named(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", DIGITS, "--model.init_args.widht", "64"])
    assert exit_info.value.code != 0
    assert "widht" in capsys.readouterr().err
