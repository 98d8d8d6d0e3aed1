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
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml

from lightning_ar.io import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
GENERATORS = {"CDM": "cdm.yaml", "MAR": "mar.yaml", "AR": "ar.yaml"}
REFINED = {"MAR+OT": ("MAR", "refine.yaml"), "AR+OT": ("AR", "refine_ar.yaml")}
ROWS = ("CDM", "MAR", "MAR+OT", "AR", "AR+OT")
METRICS = ("fid", "cond_acc", "sec_per_image")
REFINE_ROW = "flow"  # the refinement test's variant reported as "+OT"
DEFAULT_OUT = "outputs/paper_table"
_SLOTS = threading.BoundedSemaphore(1)  # CLI runs at once over all seeds (``--jobs``), set by main()


def _cli(args: list[str], log: Path) -> None:
    """Run ``python -m lightning_ar.cli ARGS`` in a subprocess; raise with the log's tail if it fails.

    A run that finished leaves ``<log>.done``; when that marker exists the run is skipped, so an interrupted table
    resumes where it stopped (delete a row's folder and marker files to redo it).
    """
    done_marker = log.with_suffix(log.suffix + ".done")
    if done_marker.is_file():
        return
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    log.parent.mkdir(parents=True, exist_ok=True)
    with _SLOTS, log.open("w") as fh:
        done = subprocess.run([sys.executable, "-m", "lightning_ar.cli", *args], cwd=REPO, env=env, stdout=fh,
                              stderr=subprocess.STDOUT)
    if done.returncode:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise RuntimeError(f"lightning-ar {args[0]} failed (exit {done.returncode}), log {log}:\n{tail}")
    atomic_write_text(done_marker, " ".join(args) + "\n")


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


def _parallel(tasks: list, jobs: int) -> list:
    """Run zero-argument callables with at most ``jobs`` at once (in order when ``jobs == 1``); return results."""
    if jobs <= 1:
        return [task() for task in tasks]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return [f.result() for f in [pool.submit(task) for task in tasks]]


def _generator_task(row: str, seed: int, opts: argparse.Namespace) -> Callable[[], Path]:
    """Fit one generator row for ``seed``; returns its checkpoint."""
    root, configs = Path(opts.out) / f"seed{seed}", Path(opts.configs)
    name = row.lower()
    cfgs = [configs / GENERATORS[row], *([Path(opts.generator_overlay)] if opts.generator_overlay else [])]
    extra = ["--seed_everything", str(seed)] + (["--trainer.max_steps", str(opts.max_steps)] if opts.max_steps else [])

    def fit() -> Path:
        _cli(_run_args("fit", cfgs, root, name, "fit", extra), root / f"{name}_fit.log")
        return root / name / "fit" / "checkpoints" / "last.ckpt"

    return fit


def _row_configs(row: str, opts: argparse.Namespace) -> tuple[str, list[Path]]:
    configs = Path(opts.configs)
    if row in GENERATORS:
        overlay = [Path(opts.generator_overlay)] if opts.generator_overlay else []
        return row.lower(), [configs / GENERATORS[row], *overlay]
    overlay = [Path(opts.refine_overlay)] if opts.refine_overlay else []
    return row.lower().replace("+", "_"), [configs / REFINED[row][1], *overlay]


def _test_task(row: str, seed: int, ckpt: Path, opts: argparse.Namespace) -> Callable[[], dict]:
    """Test one row's checkpoint for ``seed``; returns its results.json."""
    root = Path(opts.out) / f"seed{seed}"
    name, cfgs = _row_configs(row, opts)
    extra = ["--seed_everything", str(seed), "--ckpt_path", str(ckpt)]
    extra += [f"--trainer.limit_test_batches={opts.limit_test_batches}"] if opts.limit_test_batches else []

    def test() -> dict:
        _cli(_run_args("test", cfgs, root, name, "test", extra), root / f"{name}_test.log")
        return _test_results(root, name, "test")

    return test


def _refine_task(row: str, seed: int, generator: Path, opts: argparse.Namespace) -> Callable[[], dict]:
    """Build the refinement of ``row`` on the seed's generator checkpoint, then test it; returns results.json."""
    root = Path(opts.out) / f"seed{seed}"
    name, cfgs = _row_configs(row, opts)
    extra = ["--seed_everything", str(seed), "--model.init_args.generator", str(generator)]

    def refine_and_test() -> dict:
        _cli(_run_args("fit", cfgs, root, name, "fit", extra), root / f"{name}_fit.log")
        return _test_task(row, seed, root / name / "fit" / "checkpoints" / "last.ckpt", opts)()

    return refine_and_test


def run_seed(seed: int, opts: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Train, refine and test the five variants for one seed; return ``row -> metrics``.

    Stage 1 fits the three generators; stage 2 tests them and builds + tests the two refinements (``--jobs`` of
    these CLI runs at once).
    """
    ckpts = dict(zip(GENERATORS, _parallel([_generator_task(r, seed, opts) for r in GENERATORS], opts.jobs)))
    tasks = [_test_task(r, seed, ckpts[r], opts) for r in GENERATORS]
    tasks += [_refine_task(r, seed, ckpts[base], opts) for r, (base, _) in REFINED.items()]
    results = dict(zip([*GENERATORS, *REFINED], _parallel(tasks, opts.jobs)))
    rows = {row: results[row]["default"] for row in GENERATORS}
    for row in REFINED:
        rows[row] = results[row][REFINE_ROW]
        rows[f"{row} (none)"] = results[row]["none"]  # refine=none must reproduce the base row: a consistency check
    return rows


def row_samplers(configs: Path) -> dict[str, str]:
    """``row -> "<sampler>-<steps>"`` from the generator configs; the +OT rows sample with their base generator's."""
    out = {}
    for row, name in GENERATORS.items():
        init = (yaml.safe_load((configs / name).read_text()).get("model") or {}).get("init_args") or {}
        out[row] = f"{init.get('sampler', 'default')}-{init.get('num_sampling_steps', 'default')}"
    out.update({row: out[base] for row, (base, _) in REFINED.items()})
    return out


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
        "| variant | digits-FID | cond. accuracy | sec / image | sampler |",
        "|---|---|---|---|---|",
    ]
    samplers = settings.get("samplers") or {}
    for row in ROWS:
        s = summary[row]
        cells = [f"{s[f'{m}_mean']:.4g} ± {s[f'{m}_std']:.2g}" for m in METRICS]
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {samplers.get(row, '?')} |")
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
    parser.add_argument("--render", default=None, metavar="JSON",
                        help="only rewrite the markdown (and JSON summary) of an existing paper_table.json")
    parser.add_argument("--jobs", type=int, default=1,
                        help="CLI runs at once, over all seeds (one thread each); default 1. On a CPU use at most "
                             "the core count, so that the seconds per image stay comparable")
    opts = parser.parse_args(argv)
    if opts.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {opts.seeds}")
    if opts.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {opts.jobs}")
    if opts.max_steps is not None and opts.max_steps < 1:
        parser.error(f"--max-steps must be >= 1, got {opts.max_steps}")
    for name in [*GENERATORS.values(), *(c for _, c in REFINED.values())]:
        if not (Path(opts.configs) / name).is_file():
            parser.error(f"--configs: {Path(opts.configs) / name} does not exist")
    for flag, path in (("--generator-overlay", opts.generator_overlay), ("--refine-overlay", opts.refine_overlay)):
        if path and not Path(path).is_file():
            parser.error(f"{flag}: {path} does not exist")
    if opts.render and not Path(opts.render).is_file():
        parser.error(f"--render: {opts.render} does not exist")
    opts.out = str(Path(opts.out).resolve())
    return opts


def render(path: Path, configs: Path) -> tuple[Path, Path]:
    """Rewrite the table files of an existing ``paper_table.json`` (e.g. after a format change)."""
    payload = json.loads(path.read_text())
    settings = {"samplers": row_samplers(configs), **payload["settings"]}
    per_seed = {int(k): v for k, v in payload["per_seed"].items()}
    return write_table(per_seed, settings, path.parent)


def _commit() -> str:
    """``git describe`` of the code that made the table (``-dirty`` when uncommitted changes were present)."""
    done = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> dict:
    """Run the comparison; return the written JSON payload."""
    opts = parse_args(argv)
    if opts.render:
        js, md = render(Path(opts.render), Path(opts.configs))
        print(md.read_text())
        return json.loads(js.read_text())
    settings = {"seeds": opts.seeds, "max_steps": opts.max_steps, "generator_overlay": opts.generator_overlay,
                "refine_overlay": opts.refine_overlay,
                "limit_test_batches": opts.limit_test_batches, "refine_row": REFINE_ROW, "jobs": opts.jobs,
                "commit": _commit(), "samplers": row_samplers(Path(opts.configs))}
    start = time.perf_counter()
    global _SLOTS
    _SLOTS = threading.BoundedSemaphore(opts.jobs)

    def seed_task(seed: int) -> Callable[[], dict]:
        def run() -> dict:
            rows = run_seed(seed, opts)
            print(f"seed {seed} done after {time.perf_counter() - start:.0f} s", flush=True)
            return rows

        return run

    seed_jobs = opts.seeds if opts.jobs > 1 else 1  # seeds side by side; _SLOTS bounds the CLI runs at once
    per_seed = dict(enumerate(_parallel([seed_task(s) for s in range(opts.seeds)], seed_jobs)))
    settings["seconds"] = time.perf_counter() - start
    js, md = write_table(per_seed, settings, Path(opts.out))
    print(md.read_text())
    print(f"written {js} and {md}")
    return json.loads(js.read_text())


if __name__ == "__main__":
    main()
