"""``make demo`` / ``lightning-ar demo``: train MAR on the embedded digits, evaluate it, refine its conditions, and
print the results.

Runs through the same entry point as the shell (:func:`lightning_ar.cli.main`) on the shipped configs (found in a
checkout and in an installed copy, :mod:`lightning_ar.config_files`), with all outputs under one folder (default
``outputs/demo``); ``--debug`` adds the seconds-long debug overlays:

1. ``lightning-ar fit`` + ``test`` on ``configs/digits/mar.yaml`` (the generator);
2. ``lightning-ar fit`` + ``test`` on ``configs/digits/refine.yaml`` with that checkpoint (OT refinement: banks,
   amortised refiner; test compares refinement modes ``none``, ``flow``, ``amortized`` with the same seeds).

The combined table is written to ``<out>/results.md`` and ``results.json``. In a checkout, the demo then prints what
the committed digits refinement study (``benchmarks/results/refinement-study-digits.json``, 3 seeds, paired CIs)
measured for each variant, so the demo's one-seed refinement rows are read beside the evidence.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from lightning_ar.callbacks.results import write_results
from lightning_ar.cli import main as cli_main
from lightning_ar.config_files import config_path


def _run(stage: str, config: Path, out: Path, version: str, extra: list[str]) -> None:
    cli_main([
        stage, "--config", str(config),
        "--trainer.default_root_dir", str(out),
        "--trainer.logger.init_args.save_dir", str(out.parent),
        "--trainer.logger.init_args.name", out.name,
        "--trainer.logger.init_args.version", version,
        *extra,
    ])


def _combine(out: Path) -> tuple[Path, Path]:
    """One table: the generator's row and the refinement modes' rows (same test labels and seeds)."""
    rows = {f"mar ({k})": v for k, v in json.loads((out / "test" / "results.json").read_text()).items()}
    refine = out / "refine_test" / "results.json"
    if refine.exists():
        rows.update({f"mar + refine={k}": v for k, v in json.loads(refine.read_text()).items()})
    return write_results(rows, out, title="Demo results: MAR on digits, then OT condition refinement")


STUDY = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "refinement-study-digits.json"


def study_summary(path: Path = STUDY) -> str | None:
    """A markdown table of the committed digits refinement study (variant, digits-FID vs none with its paired CI,
    its verdict, share of sampling time); ``None`` where the file is absent (an installed copy)."""
    if not path.is_file():
        return None
    study = json.loads(path.read_text())
    lines = [f"What the committed study measured ({path.name}: {len(study['seeds'])} seeds, paired 95% CIs; "
             f"verdict **{study['verdict']}**; the demo's rows above are one seed and one run):", "",
             "| variant | digits-FID vs none | verdict | refine share of sampling time |", "|---|---|---|---|"]
    for name, diff in study["differences"].items():
        fid, share = diff["fid"], study["cost_share"].get(name, 0.0)
        verdict = "lowers FID" if fid["high"] < 0 else "raises FID" if fid["low"] > 0 else "not resolved"
        lines.append(f"| {name} | {fid['estimate']:+.2f} [{fid['low']:+.2f}, {fid['high']:+.2f}] | {verdict} "
                     f"| {f'{100 * share:.1f}%' if share else ''} |")
    return "\n".join(lines) + "\n"


def run_demo(
    out: Path,
    config: Path,
    refine_config: Path | None,
    extra: list[str] | None = None,
    refine_extra: list[str] | None = None,
) -> dict[str, Path]:
    """Fit and test the generator, then (unless ``refine_config`` is None) the refinement; return output paths.

    ``extra`` and ``refine_extra`` are further CLI arguments of the generator and refinement runs.
    """
    extra, refine_extra = list(extra or []), list(refine_extra or [])
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    _run("fit", config, out, "fit", extra)
    fit_minutes = (time.perf_counter() - start) / 60
    ckpt = out / "fit" / "checkpoints" / "last.ckpt"
    _run("test", config, out, "test", extra + ["--ckpt_path", str(ckpt)])
    if refine_config is not None:
        refine_extra += ["--model.init_args.generator", str(ckpt)]
        _run("fit", refine_config, out, "refine", refine_extra)
        refine_ckpt = out / "refine" / "checkpoints" / "last.ckpt"
        _run("test", refine_config, out, "refine_test", refine_extra + ["--ckpt_path", str(refine_ckpt)])
    table, table_json = _combine(out)
    paths = {
        "generator checkpoint": ckpt,
        "samples (fit, EMA weights)": out / "fit" / "samples" / "val_latest.png",
        "samples (test)": out / "test" / "samples" / "test_latest.png",
        "refinement checkpoint": out / "refine" / "checkpoints" / "last.ckpt",
        "results table": table,
        "results json": table_json,
        "tensorboard logs": out,
    }
    total = (time.perf_counter() - start) / 60
    print(f"\nDemo finished: generator fit {fit_minutes:.1f} min, total {total:.1f} min.")
    print(f"Outputs under {out}:")
    for name, path in paths.items():
        print(f"  {name:28s} {path}{'' if path.exists() else '  (not produced)'}")
    print("\n" + table.read_text())
    summary = study_summary()
    if summary is not None:
        print("\n" + summary)
    return paths


def main(argv: list[str] | None = None) -> None:
    """``lightning-ar demo [--out DIR] [--config C] [--refine-config R|none] [--debug] [CLI options...]``; unknown
    options go to both stages' ``lightning-ar`` runs."""
    parser = argparse.ArgumentParser(prog="lightning-ar demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/demo", help="output folder (replaced)")
    parser.add_argument("--config", default=str(config_path("digits/mar.yaml")), help="generator config")
    parser.add_argument("--refine-config", default=str(config_path("digits/refine.yaml")),
                        help="refinement config ('none' to skip the refinement stage)")
    parser.add_argument("--debug", action="store_true",
                        help="add the debug overlays (debug.yaml, debug_refine.yaml): a seconds-long smoke run")
    args, extra = parser.parse_known_args(argv)
    refine = None if args.refine_config == "none" else Path(args.refine_config)
    refine_extra = list(extra)
    if args.debug:
        extra = ["--config", str(config_path("debug.yaml")), *extra]
        refine_extra = ["--config", str(config_path("debug_refine.yaml")), *refine_extra]
    run_demo(Path(args.out), Path(args.config), refine, extra, refine_extra)


if __name__ == "__main__":
    main()
