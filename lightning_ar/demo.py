"""``make demo``: train MAR on the embedded digits, evaluate it, and print where everything is.

Runs ``lightning-ar fit`` then ``lightning-ar test`` on ``configs/digits/mar.yaml`` through the same entry point
as the shell (:func:`lightning_ar.cli.main`), with all outputs under one folder (default ``outputs/demo``).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from lightning_ar.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]


def _run(stage: str, config: Path, out: Path, extra: list[str]) -> object:
    args = [
        stage, "--config", str(config),
        "--trainer.default_root_dir", str(out),
        "--trainer.logger.init_args.save_dir", str(out.parent),
        "--trainer.logger.init_args.name", out.name,
        "--trainer.logger.init_args.version", stage,
    ]
    return cli_main(args + extra)


def run_demo(out: Path, config: Path, extra: list[str] | None = None) -> dict[str, Path]:
    """Fit and test; return the paths of the checkpoint, sample grids and results table."""
    extra = list(extra or [])
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    _run("fit", config, out, extra)
    fit_seconds = time.perf_counter() - start
    ckpt = out / "fit" / "checkpoints" / "last.ckpt"
    _run("test", config, out, extra + ["--ckpt_path", str(ckpt)])
    paths = {
        "checkpoint": ckpt,
        "samples (fit, EMA weights)": out / "fit" / "samples" / "val_latest.png",
        "samples (test)": out / "test" / "samples" / "test_latest.png",
        "results table": out / "test" / "results.md",
        "results json": out / "test" / "results.json",
        "tensorboard logs": out,
    }
    print(f"\nDemo finished: fit {fit_seconds / 60:.1f} min, total {(time.perf_counter() - start) / 60:.1f} min.")
    print(f"Outputs under {out}:")
    for name, path in paths.items():
        print(f"  {name:28s} {path}{'' if path.exists() else '  (MISSING)'}")
    print("\n" + paths["results table"].read_text())
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="outputs/demo", help="output folder (replaced)")
    parser.add_argument("--config", default=str(REPO / "configs" / "digits" / "mar.yaml"))
    args, extra = parser.parse_known_args(argv)
    run_demo(Path(args.out), Path(args.config), extra)


if __name__ == "__main__":
    main()
