"""The paper's comparison at small scale: CDM, MAR, MAR-m0, MAR+OT, AR, AR+OT on digits, several seeds, one table.

Every variant goes through the ``lightning-ar`` CLI (one subprocess per stage) with the shipped configs, under the
same budget: ``configs/digits/{cdm,mar,ar}.yaml`` are matched in parameters, optimizer, EMA, batch size and optimizer
steps, and the two OT rows refine the MAR and AR checkpoints of the same seed with ``configs/digits/refine.yaml`` and
``refine_ar.yaml`` (mode ``flow``). ``MAR-m0`` is the training-time competitor of the refinement: ``mar.yaml`` with
``mask_ratio_min 0``, so that training sees the large contexts late sampling steps use (fixed before the run, as
on gmm regime R1; not tuned on digits). Each test run generates one sample per test-split label (GenerationMetrics,
which saves the samples) and reports digits-FID and KID against the unseen test split, conditional accuracy and sampling
seconds per image. From the saved samples the table adds the memorisation figures (nearest-training-image distances)
and compares variants **paired**: per seed (same seeds, same labels) differences of each metric, averaged over seeds,
with a two-level bootstrap CI (seeds, then samples with the same indices for both variants); an ordering "holds" only
when the CI excludes zero (``lightning_ar.theory.stats``). Floors: the real val split against the test split, at the
same count (180).

    python benchmarks/paper_table.py                          # 3 seeds, the configs' own budgets (> 1 h on 2 cores)
    python benchmarks/paper_table.py --seeds 1 --max-steps 50 --refine-overlay configs/debug_refine.yaml  # smoke
    python benchmarks/paper_table.py --render outputs/paper_table/paper_table.json  # re-analyse / re-render

Writes ``<out>/paper_table.json`` (per-seed rows, summary, settings) and ``<out>/paper_table.md``. The notebook
``notebooks/04_paper_table_small_scale.ipynb`` loads ``outputs/paper_table/paper_table.json`` when it exists.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import yaml

from lightning_ar.io import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
REMEDY = "MAR-m0"  # the training-time remedy (issue 15 item 6): MAR trained with mask_ratio_min 0, all else equal
GENERATORS = {"CDM": "cdm.yaml", "MAR": "mar.yaml", REMEDY: "mar.yaml", "AR": "ar.yaml"}
GENERATOR_ARGS = {REMEDY: ["--model.init_args.mask_ratio_min", "0"]}  # row -> extra CLI options (fit and test)
REFINED = {"MAR+OT": ("MAR", ("refine.yaml",)), "AR+OT": ("AR", ("refine.yaml", "refine_ar.yaml"))}
ROWS = ("CDM", "MAR", REMEDY, "MAR+OT", "AR", "AR+OT")
METRICS = ("fid", "kid", "cond_acc", "sec_per_image")
SAMPLE_METRICS = ("fid", "kid", "cond_acc", "copy_fraction", "nn_ratio")  # recomputed from the saved samples
# (a, b, what the paper reports): "a is better than b", judged on digits-FID (KID beside it); pre-registered
CLAIMS = (
    ("MAR", "CDM", "CDM is worse than MAR (paper: 3.26 vs MAR 1.55-2.31)"),
    ("AR", "CDM", "CDM is worse than AR (paper: 3.26 vs 2.02)"),
    ("MAR+OT", "MAR", "OT refinement improves MAR (paper: 1.55 -> 1.31 for MAR-H)"),
    ("AR+OT", "AR", "OT refinement improves AR (paper: 2.02 -> 1.52)"),
    (REMEDY, "MAR", "training on every context size (mask_ratio_min 0) improves MAR (gmm R1: it lowers the exact "
                    "sequence excess NLL)"),
    (REMEDY, "MAR+OT", "the training-time remedy beats the OT refinement"),
)
CLAIM_SIGN = {"fid": "negative", "kid": "negative", "cond_acc": "positive", "copy_fraction": "positive",
              "nn_ratio": "negative"}  # the side each difference a - b takes if a is better / copies more
BOOTSTRAP_REPS = 1000
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


def folder(row: str) -> str:
    """A row's folder under ``seed<k>/``: lower case, other runs of characters as ``_`` (``MAR+OT`` -> ``mar_ot``)."""
    return re.sub(r"[^a-z0-9]+", "_", row.lower()).strip("_")


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
    name = folder(row)
    cfgs = [configs / GENERATORS[row], *([Path(opts.generator_overlay)] if opts.generator_overlay else [])]
    extra = ["--seed_everything", str(seed), *GENERATOR_ARGS.get(row, [])]
    extra += ["--trainer.max_steps", str(opts.max_steps)] if opts.max_steps else []

    def fit() -> Path:
        _cli(_run_args("fit", cfgs, root, name, "fit", extra), root / f"{name}_fit.log")
        return root / name / "fit" / "checkpoints" / "last.ckpt"

    return fit


def _row_configs(row: str, opts: argparse.Namespace) -> tuple[str, list[Path]]:
    configs = Path(opts.configs)
    if row in GENERATORS:
        overlay = [Path(opts.generator_overlay)] if opts.generator_overlay else []
        return folder(row), [configs / GENERATORS[row], *overlay]
    overlay = [Path(opts.refine_overlay)] if opts.refine_overlay else []
    return folder(row), [*(configs / name for name in REFINED[row][1]), *overlay]


def _test_task(row: str, seed: int, ckpt: Path, opts: argparse.Namespace) -> Callable[[], dict]:
    """Test one row's checkpoint for ``seed``; returns its results.json."""
    root = Path(opts.out) / f"seed{seed}"
    name, cfgs = _row_configs(row, opts)
    extra = ["--seed_everything", str(seed), "--ckpt_path", str(ckpt), *GENERATOR_ARGS.get(row, [])]
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
    """``row -> {metric_mean, metric_std, ...}`` over seeds from the test runs' results (std with ``ddof=1``; 0 for
    one seed; NaN for a metric a run did not report)."""
    summary = {}
    for row in table_rows(per_seed):
        values = {m: np.array([per_seed[s][row].get(m, np.nan) for s in per_seed], dtype=float) for m in METRICS}
        summary[row] = {"num_seeds": len(per_seed)}
        for metric, v in values.items():
            summary[row][f"{metric}_mean"] = float(v.mean())
            summary[row][f"{metric}_std"] = float(v.std(ddof=1)) if v.size > 1 else 0.0
        for floor_key in ("fid_floor", "kid_floor"):
            floor = [per_seed[s][row].get(floor_key) for s in per_seed]
            summary[row][floor_key] = float(np.mean(floor)) if None not in floor else float("nan")
    return summary


def sample_file(out: Path, seed: int, row: str) -> tuple[Path, str]:
    """Where a row's test run saved its samples, and the variant key inside the file."""
    return out / f"seed{seed}" / folder(row) / "test" / "samples.pt", "default" if row in GENERATORS else REFINE_ROW


def table_rows(per_seed: dict) -> list[str]:
    """The rows of :data:`ROWS` that every seed of a table has (tables before 2026-12-02 have no MAR-m0 row)."""
    return [row for row in ROWS if all(row in rows for rows in per_seed.values())]


def _load_samples(out: Path, seeds: list[int], rows: list[str], classifier, ref) -> dict[str, list]:
    from lightning_ar.metrics.digits_paired import DigitsSamples

    samples: dict[str, list] = {}
    for row in rows:
        for seed in seeds:
            path, variant = sample_file(out, seed, row)
            saved = torch.load(path, map_location="cpu", weights_only=True)[variant]
            samples.setdefault(row, []).append(DigitsSamples.build(saved["latents"], saved["labels"], classifier, ref))
    return samples


def analyse(out: Path, seeds: list[int], reps: int = BOOTSTRAP_REPS, rows: list[str] | tuple[str, ...] = ROWS) -> dict:
    """Levels, floors and paired comparisons of ``rows`` recomputed from the saved test samples (``{}`` if any is
    missing); the claims between two of ``rows`` are compared.

    Returns:
        ``levels`` (row -> metric -> per-seed values), ``floors`` (metric -> value of the real val split against the
        test split), ``comparisons`` (one per :data:`CLAIMS` entry: metric -> per-seed differences, the mean, its
        two-level bootstrap CI and the verdict of "a is better than b"), ``num_samples`` and ``reps``.
    """
    from lightning_ar.data.sources import DigitsSource
    from lightning_ar.metrics.digits_classifier import load_or_train_digits_classifier
    from lightning_ar.metrics.digits_paired import DigitsReference, DigitsSamples, compare, paired_seed_differences

    if not all(sample_file(out, seed, row)[0].is_file() for seed in seeds for row in rows):
        return {}
    classifier = load_or_train_digits_classifier()
    ref = DigitsReference.build(classifier)
    samples = _load_samples(out, seeds, list(rows), classifier, ref)
    val, val_labels = DigitsSource().split("val")
    floor = DigitsSamples.build(val, val_labels, classifier, ref)
    levels = {row: {m: [x.metric(m, ref) for x in samples[row]] for m in SAMPLE_METRICS} for row in rows}
    comparisons = []
    for a, b, text in [claim for claim in CLAIMS if claim[0] in rows and claim[1] in rows]:
        per_metric = {}
        for m in SAMPLE_METRICS:
            result = compare(samples[a], samples[b], m, ref, CLAIM_SIGN[m], reps).to_dict()
            result["per_seed"] = paired_seed_differences(samples[a], samples[b], m, ref).tolist()
            per_metric[m] = result
        comparisons.append({"a": a, "b": b, "claim": text, "metrics": per_metric})
    return {"levels": levels, "floors": {m: floor.metric(m, ref) for m in SAMPLE_METRICS},
            "comparisons": comparisons, "num_samples": int(samples["MAR"][0].labels.size), "reps": reps}


def _cell(values: list[float]) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.4g} ± {v.std(ddof=1) if v.size > 1 else 0.0:.2g}"


def _summary_cell(row: dict, metric: str) -> str:
    """``mean ± std`` of one metric of a summary row; ``-`` when the run did not record it (older tables)."""
    if f"{metric}_mean" not in row:
        return "-"
    return f"{row[f'{metric}_mean']:.4g} ± {row[f'{metric}_std']:.2g}"


def _levels_table(summary: dict, settings: dict, analysis: dict) -> list[str]:
    timing = settings.get("timing_valid", True)
    samplers = settings.get("samplers") or {}
    split = "test" if settings.get("fid_reference") == "test" else "train split"
    names = [f"digits-FID ({split})", f"KID ({split})", "cond. accuracy", "copy fraction", "nn ratio"]
    head = "| variant | " + " | ".join(names) + (" | sec / image" if timing else "") + " | sampler |"
    lines = [head, "|---" * (len(names) + 2 + timing) + "|"]
    for row in [r for r in ROWS if r in summary]:
        if analysis:
            cells = [_cell(analysis["levels"][row][m]) for m in SAMPLE_METRICS]
        else:  # no saved samples: the test runs' own figures
            cells = [_summary_cell(summary[row], m) for m in METRICS[:3]] + ["-", "-"]
        if timing:
            cells.append(f"{summary[row]['sec_per_image_mean']:.4g} ± {summary[row]['sec_per_image_std']:.2g}")
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {samplers.get(row, '?')} |")
    if analysis:
        floors = [f"{analysis['floors'][m]:.4g}" for m in SAMPLE_METRICS]
        lines.append("| real val split (floor) | " + " | ".join(floors) + (" | -" if timing else "") + " | - |")
    return lines


def _comparison_lines(analysis: dict) -> list[str]:
    lines = ["| comparison (a - b) | metric | per-seed differences | mean | 95% CI | a better than b? |",
             "|---|---|---|---|---|---|"]
    for comp in analysis["comparisons"]:
        for m in ("fid", "kid", "cond_acc", "copy_fraction"):
            r = comp["metrics"][m]
            per_seed = ", ".join(f"{v:+.3g}" for v in r["per_seed"])
            answer = r["verdict"] if m in ("fid", "kid", "cond_acc") else {
                "holds": "a copies more", "does not hold": "a copies less"}.get(r["verdict"], r["verdict"])
            lines.append(f"| {comp['a']} - {comp['b']} | {m} | {per_seed} | {r['estimate']:+.3g} | "
                         f"[{r['low']:+.3g}, {r['high']:+.3g}] | {answer} |")
    return lines


def _reference_text(settings: dict, summary: dict) -> str:
    """What digits-FID was computed against: the test split (tables that record ``fid_reference``), or, for tables
    from before 2026-12-01 (no record), the training split, whose floor is lower."""
    if settings.get("fid_reference") == "test":
        return ("digits-FID and KID in the features of the digits classifier, generated samples (one per test label) "
                "against the unseen test split; floor: the real val split (180 images) against the test split (180)")
    floor = next((r["fid_floor"] for r in summary.values() if "fid_floor" in r), float("nan"))
    return ("digits-FID in the features of the digits classifier against the TRAINING split (a table from before "
            f"2026-12-01, which records no fid_reference; floor {floor:.2f}); not comparable with test-split figures")


def format_markdown(summary: dict[str, dict[str, float]], settings: dict, analysis: dict | None = None) -> str:
    """The table (mean ± std over seeds per variant, the floors) and, with an ``analysis``, the paired comparisons."""
    analysis = analysis or {}
    lines = [
        "# Paper table at small scale (digits)",
        "",
        f"Seeds: {settings['seeds']}; generator max_steps: {settings['max_steps'] or 'config default'}; "
        f"generator overlay: {settings.get('generator_overlay') or 'none'}; "
        f"refine overlay: {settings['refine_overlay'] or 'none'}; code: {settings.get('commit', '?')}"
        + (f" (analysis: {settings['analysis_commit']})" if settings.get("analysis_commit") else "") + ". "
        "Mean ± std over seeds. " + (f"{REMEDY}: MAR trained with mask_ratio_min 0 (MAR: 0.7). " if REMEDY in summary
                                     else "") + _reference_text(settings, summary)
        + (f"; {analysis['num_samples']} generated samples per variant and seed." if analysis else "."),
        "",
        *_levels_table(summary, settings, analysis),
        "",
    ]
    if not settings.get("timing_valid", True):
        lines += ["Seconds per image are not reported for this run: it shared the CPUs with other jobs, so its "
                  "timings are not valid.", ""]
    if analysis:
        lines += [f"Paired comparisons: per seed (same seeds, same test labels) the difference a - b, its mean over "
                  f"seeds and a 95% two-level basic bootstrap CI ({analysis['reps']} replicates: seeds, then samples "
                  "with the same indices for a and b). \"a better than b\" **holds** only when the CI excludes zero "
                  "on the better side (lower FID/KID, higher accuracy), reads **does not hold** when it excludes zero "
                  "on the other side, and **not resolved** otherwise. copy fraction: share of samples closer to a "
                  "training image than 95% of test images are (0.05 expected without copying); nn ratio: median "
                  "nearest-training-image distance over that of the test images.", "",
                  *_comparison_lines(analysis), ""]
    return "\n".join(lines)


def write_table(per_seed: dict, settings: dict, out: Path, analysis: dict | None = None) -> tuple[Path, Path]:
    """Write ``paper_table.json`` and ``paper_table.md`` atomically; return their paths."""
    summary = summarise(per_seed)
    payload = {"settings": settings, "summary": summary, "per_seed": {str(k): v for k, v in per_seed.items()},
               "analysis": analysis or {}}
    js, md = out / "paper_table.json", out / "paper_table.md"
    atomic_write_text(js, json.dumps(payload, indent=2) + "\n")
    atomic_write_text(md, format_markdown(summary, settings, analysis))
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
                        help="only re-analyse (from the saved samples beside it, when present) and rewrite the "
                             "markdown and JSON of an existing paper_table.json")
    parser.add_argument("--no-timing", action="store_true",
                        help="leave seconds per image out of the table (timings of a run that shared the CPUs with "
                             "other jobs are not valid)")
    parser.add_argument("--bootstrap", type=int, default=BOOTSTRAP_REPS,
                        help=f"bootstrap replicates of the paired comparisons (default {BOOTSTRAP_REPS})")
    parser.add_argument("--jobs", type=int, default=1,
                        help="CLI runs at once, over all seeds (one thread each); default 1. On a CPU use at most "
                             "the core count, so that the seconds per image stay comparable")
    opts = parser.parse_args(argv)
    if opts.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {opts.seeds}")
    if opts.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {opts.jobs}")
    if opts.bootstrap < 10:
        parser.error(f"--bootstrap must be >= 10, got {opts.bootstrap}")
    if opts.max_steps is not None and opts.max_steps < 1:
        parser.error(f"--max-steps must be >= 1, got {opts.max_steps}")
    for name in [*GENERATORS.values(), *(c for _, names in REFINED.values() for c in names)]:
        if not (Path(opts.configs) / name).is_file():
            parser.error(f"--configs: {Path(opts.configs) / name} does not exist")
    for flag, path in (("--generator-overlay", opts.generator_overlay), ("--refine-overlay", opts.refine_overlay)):
        if path and not Path(path).is_file():
            parser.error(f"{flag}: {path} does not exist")
    if opts.render and not Path(opts.render).is_file():
        parser.error(f"--render: {opts.render} does not exist")
    opts.out = str(Path(opts.out).resolve())
    return opts


def render(path: Path, configs: Path, reps: int = BOOTSTRAP_REPS, no_timing: bool = False) -> tuple[Path, Path]:
    """Rewrite the table files of an existing ``paper_table.json`` (e.g. after a format change): re-analysed from
    the saved samples under its folder when they are there, else with the analysis stored in the JSON."""
    payload = json.loads(path.read_text())
    settings = {"samplers": row_samplers(configs), **payload["settings"]}
    if no_timing:
        settings["timing_valid"] = False
    per_seed = {int(k): v for k, v in payload["per_seed"].items()}
    analysis = analyse(path.parent, sorted(per_seed), reps, table_rows(per_seed))
    if analysis:
        settings["analysis_commit"] = _commit()  # the run's code is settings["commit"]; the analysis may be newer
    analysis = analysis or payload.get("analysis") or {}
    return write_table(per_seed, settings, path.parent, analysis)


def _commit() -> str:
    """``git describe`` of the code that made the table (``-dirty`` when uncommitted changes were present)."""
    done = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> dict:
    """Run the comparison; return the written JSON payload."""
    opts = parse_args(argv)
    if opts.render:
        js, md = render(Path(opts.render), Path(opts.configs), opts.bootstrap, opts.no_timing)
        print(md.read_text())
        return json.loads(js.read_text())
    settings = {"seeds": opts.seeds, "max_steps": opts.max_steps, "generator_overlay": opts.generator_overlay,
                "refine_overlay": opts.refine_overlay,
                "limit_test_batches": opts.limit_test_batches, "refine_row": REFINE_ROW, "jobs": opts.jobs,
                "commit": _commit(), "samplers": row_samplers(Path(opts.configs)), "timing_valid": not opts.no_timing,
                "fid_reference": "test"}
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
    analysis = analyse(Path(opts.out), sorted(per_seed), opts.bootstrap)
    js, md = write_table(per_seed, settings, Path(opts.out), analysis)
    print(md.read_text())
    print(f"written {js} and {md}")
    return json.loads(js.read_text())


if __name__ == "__main__":
    main()
