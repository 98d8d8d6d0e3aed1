"""The paper's comparison at small scale: CDM, MAR, MAR+OT, AR, AR+OT on digits, several seeds, one table.

Every variant goes through the ``lightning-ar`` CLI (one subprocess per stage) with the shipped configs, under the
same budget: ``configs/digits/{cdm,mar,ar}.yaml`` are matched in parameters, optimizer, EMA, batch size and optimizer
steps, and the two OT rows refine the MAR and AR checkpoints of the same seed with ``configs/digits/refine.yaml`` and
``refine_ar.yaml`` (mode ``flow``). Each test run generates for the test split's labels (GenerationMetrics) and
reports digits-FID, conditional accuracy and sampling seconds per image; the table gives mean +- std over seeds.

    python benchmarks/paper_table.py                          # 3 seeds, the configs' own budgets (> 1 h on 2 cores)
    python benchmarks/paper_table.py --seeds 1 --max-steps 50 --refine-overlay configs/debug_refine.yaml  # smoke

Writes ``<out>/paper_table.json`` (per-seed rows, summary, settings) and ``<out>/paper_table.md``. The notebook
``notebooks/04_paper_table_small_scale.ipynb`` loads ``outputs/paper_table/paper_table.json`` when it exists.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from lightning_ar.io import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
GENERATORS = {"CDM": "cdm.yaml", "MAR": "mar.yaml", "AR": "ar.yaml"}
REFINED = {"MAR+OT": ("MAR", "refine.yaml"), "AR+OT": ("AR", "refine_ar.yaml")}
ROWS = ("CDM", "MAR", "MAR+OT", "AR", "AR+OT")
METRICS = ("fid", "cond_acc", "sec_per_image")
REFINE_ROW = "flow"  # the refinement test's variant reported as "+OT"
DEFAULT_OUT = "outputs/paper_table"


def _cli(args: list[str], log: Path) -> None:
    """Run ``python -m lightning_ar.cli ARGS`` in a subprocess; raise with the log's tail if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        done = subprocess.run([sys.executable, "-m", "lightning_ar.cli", *args], cwd=REPO, env=env, stdout=fh,
                              stderr=subprocess.STDOUT)
    if done.returncode:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"lightning-ar {args[0]} failed (exit {done.returncode}), log {log}:\n{tail}")


def _run_args(stage: str, configs: list[Path], root: Path, name: str, version: str, extra: list[str]) -> list[str]:
    args = [stage]
    for config in configs:
        args += ["--config", str(config)]
    return args + [
        "--trainer.default_root_dir", str(root),
        "--trainer.logger.init_args.save_dir", str(root),
        "--trainer.logger.init_args.name", name,
        "--trainer.logger.init_args.version", version,
        "--trainer.enable_progress_bar", "false",
        *extra,
    ]


def _test_results(root: Path, name: str, version: str) -> dict[str, dict[str, float]]:
    path = root / name / version / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"the test run wrote no {path}")
    return json.loads(path.read_text())


def run_seed(seed: int, opts: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Train, refine and test the five variants for one seed; return ``row -> metrics``."""
    root, configs = Path(opts.out) / f"seed{seed}", Path(opts.configs)
    common = ["--seed_everything", str(seed)]
    fit_extra = common + (["--trainer.max_steps", str(opts.max_steps)] if opts.max_steps else [])
    test_extra = common + ([f"--trainer.limit_test_batches={opts.limit_test_batches}"]
                           if opts.limit_test_batches else [])
    rows, ckpts = {}, {}
    gen_overlay = [Path(opts.generator_overlay)] if opts.generator_overlay else []
    for row, config in GENERATORS.items():
        name, cfgs = row.lower(), [configs / config, *gen_overlay]
        _cli(_run_args("fit", cfgs, root, name, "fit", fit_extra), root / f"{name}_fit.log")
        ckpts[row] = root / name / "fit" / "checkpoints" / "last.ckpt"
        _cli(_run_args("test", cfgs, root, name, "test", test_extra + ["--ckpt_path", str(ckpts[row])]),
             root / f"{name}_test.log")
        rows[row] = _test_results(root, name, "test")["default"]
    overlay = [Path(opts.refine_overlay)] if opts.refine_overlay else []
    for row, (base, config) in REFINED.items():
        name = row.lower().replace("+", "_")
        cfgs = [configs / config, *overlay]
        _cli(_run_args("fit", cfgs, root, name, "fit", common + ["--model.init_args.generator", str(ckpts[base])]),
             root / f"{name}_fit.log")
        ckpt = root / name / "fit" / "checkpoints" / "last.ckpt"
        _cli(_run_args("test", cfgs, root, name, "test", test_extra + ["--ckpt_path", str(ckpt)]),
             root / f"{name}_test.log")
        results = _test_results(root, name, "test")
        rows[row] = results[REFINE_ROW]
        rows[f"{row} (none)"] = results["none"]  # refine=none must reproduce the base row: a consistency check
    return rows


def summarise(per_seed: dict[int, dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """``row -> {metric_mean, metric_std, ...}`` over seeds (std with ``ddof=1``; 0 for one seed)."""
    summary = {}
    for row in ROWS:
        values = {m: np.array([per_seed[s][row][m] for s in per_seed]) for m in METRICS}
        summary[row] = {"num_seeds": len(per_seed)}
        for metric, v in values.items():
            summary[row][f"{metric}_mean"] = float(v.mean())
            summary[row][f"{metric}_std"] = float(v.std(ddof=1)) if v.size > 1 else 0.0
        floor = [per_seed[s][row].get("fid_floor") for s in per_seed]
        summary[row]["fid_floor"] = float(np.mean(floor)) if None not in floor else float("nan")
    return summary


def format_markdown(summary: dict[str, dict[str, float]], settings: dict) -> str:
    """The table: one row per variant, ``mean ± std`` over seeds."""
    lines = [
        "# Paper table at small scale (digits)",
        "",
        f"Seeds: {settings['seeds']}; generator max_steps: {settings['max_steps'] or 'config default'}; "
        f"generator overlay: {settings.get('generator_overlay') or 'none'}; "
        f"refine overlay: {settings['refine_overlay'] or 'none'}. Mean ± std over seeds. "
        f"digits-FID real-vs-real floor: {summary['MAR']['fid_floor']:.3g}.",
        "",
        "| variant | digits-FID | cond. accuracy | sec / image |",
        "|---|---|---|---|",
    ]
    for row in ROWS:
        s = summary[row]
        cells = [f"{s[f'{m}_mean']:.4g} ± {s[f'{m}_std']:.2g}" for m in METRICS]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(per_seed: dict, settings: dict, out: Path) -> tuple[Path, Path]:
    """Write ``paper_table.json`` and ``paper_table.md`` atomically; return their paths."""
    summary = summarise(per_seed)
    payload = {"settings": settings, "summary": summary, "per_seed": {str(k): v for k, v in per_seed.items()}}
    js, md = out / "paper_table.json", out / "paper_table.md"
    atomic_write_text(js, json.dumps(payload, indent=2) + "\n")
    atomic_write_text(md, format_markdown(summary, settings))
    return js, md


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...); default 3")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="override trainer.max_steps of the three generators (same for all); default: configs'")
    parser.add_argument("--generator-overlay", default=None,
                        help="extra config for the three generators (e.g. configs/debug.yaml: tiny models)")
    parser.add_argument("--refine-overlay", default=None,
                        help="extra config for both refinement stages (e.g. configs/debug_refine.yaml)")
    parser.add_argument("--limit-test-batches", type=float, default=None,
                        help="trainer.limit_test_batches of every test run (a fraction); default: all")
    parser.add_argument("--configs", default=str(REPO / "configs" / "digits"), help="folder of the digits configs")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    opts = parser.parse_args(argv)
    if opts.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {opts.seeds}")
    if opts.max_steps is not None and opts.max_steps < 1:
        parser.error(f"--max-steps must be >= 1, got {opts.max_steps}")
    for name in [*GENERATORS.values(), *(c for _, c in REFINED.values())]:
        if not (Path(opts.configs) / name).is_file():
            parser.error(f"--configs: {Path(opts.configs) / name} does not exist")
    for flag, path in (("--generator-overlay", opts.generator_overlay), ("--refine-overlay", opts.refine_overlay)):
        if path and not Path(path).is_file():
            parser.error(f"{flag}: {path} does not exist")
    opts.out = str(Path(opts.out).resolve())
    return opts


def main(argv: list[str] | None = None) -> dict:
    """Run the comparison; return the written JSON payload."""
    opts = parse_args(argv)
    settings = {"seeds": opts.seeds, "max_steps": opts.max_steps, "generator_overlay": opts.generator_overlay,
                "refine_overlay": opts.refine_overlay,
                "limit_test_batches": opts.limit_test_batches, "refine_row": REFINE_ROW}
    per_seed, start = {}, time.perf_counter()
    for seed in range(opts.seeds):
        per_seed[seed] = run_seed(seed, opts)
        print(f"seed {seed} done after {time.perf_counter() - start:.0f} s", flush=True)
    settings["seconds"] = time.perf_counter() - start
    js, md = write_table(per_seed, settings, Path(opts.out))
    print(md.read_text())
    print(f"written {js} and {md}")
    return json.loads(js.read_text())


if __name__ == "__main__":
    main()
