"""OT refinement variants on digits (issue 15 item 8): the gmm study's variants, scored against the unseen test split.

For each seed this trains, through the CLI with the shipped config, ``configs/digits/mar.yaml`` (``mar``) and the
same with ``--model.init_args.mask_ratio_min 0`` (``mar_m0``, the training-time remedy of the gmm study and of the
paper table), builds an ``OTRefinement`` of ``mar`` in-process with the settings of ``configs/digits/refine.yaml``
plus the batch-independent map (fitted on ``--pool-samples`` sequences of the generator's own sampling at its cfg,
and the token-to-condition map of the inverse process), trains the noisy-context amortised refiner (the real-data
objective; ``REFINER_STEPS`` steps, as on gmm), and then generates one sample per test-split label with the same
labels and the same seed under every variant:

- ``none``, ``flow`` (the shipped mode), ``map``, ``multistep`` and ``inverse`` (the gmm study's ``PROXIMAL_ARMS``),
  ``amortized_noisy``, ``mask_remedy`` (``mar_m0``, no refinement), and the two controls: ``shrink`` (toward the
  bank's group mean with the flow's step) and ``temperature`` (the head temperature of ``TEMPERATURES`` with the
  lowest digits-FID against the **val** split on a tuning draw of val labels; reported on the test split).

The refinements act on the conditional branch at the config's guidance (cfg 3, linear schedule; ``null_bank`` off,
as in ``configs/digits/refine.yaml``). The amortised refiner on exact targets does not exist here (no ground truth).

Pre-registered (2026-12-03, session 14, before any run; ``CRITERIA``): per variant, paired over seeds and samples
(same labels, same seed; two-level bootstrap, ``lightning_ar.metrics.digits_paired.compare``), the difference to
``none`` of digits-FID, KID, conditional accuracy and the copy fraction. A variant **improves** when its FID
difference to ``none`` has a CI below 0; it is **harmful** when that CI is above 0. **WORKING**: a candidate
(a refinement or the remedy) improves, its KID difference is not above 0 (CI), its copy fraction is not raised
(CI), and its FID is below both controls' (paired CI of candidate - control below 0). **NOT WORKING**: no
candidate improves. Otherwise **not resolved**. Settings are the gmm study's or the shipped configs'; nothing here
is tuned on the test split.

    python benchmarks/refinement_study_digits.py --jobs 2          # 3 seeds
    python benchmarks/refinement_study_digits.py --seeds 0 --max-steps 50 --pool-samples 256 --out /tmp/d  # smoke

Resumable: each seed writes ``samples.pt`` + ``info.json`` under ``--out``/seed<k>/ (fits leave ``.done`` markers);
the summary goes to ``--results``/refinement-study-digits.{json,md} (the default ``--out`` only).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from lightning_ar.io import atomic_write_text  # noqa: E402

VARIANTS = ("none", "flow", "map", "multistep", "inverse", "amortized_noisy", "mask_remedy", "shrink", "temperature")
CANDIDATES = ("flow", "map", "multistep", "inverse", "amortized_noisy", "mask_remedy")
CONTROLS = ("shrink", "temperature")
SEEDS = (0, 1, 2)
METRICS = ("fid", "kid", "cond_acc", "copy_fraction")
SIGN = {"fid": "negative", "kid": "negative", "cond_acc": "positive", "copy_fraction": "positive"}
TEMPERATURES = (0.6, 0.7, 0.8, 0.9, 1.0)
REFINER_STEPS = 48
REMEDY = ["--model.init_args.mask_ratio_min", "0"]
CRITERIA = {
    "improves": "digits-FID (test split) of variant - none: paired two-level bootstrap CI below 0",
    "harmful": "that CI above 0",
    "working": "a candidate improves, its KID difference to none is not above 0 (CI), its copy fraction is not "
               "raised (CI), and its FID is below both controls' (paired CI of candidate - control below 0)",
    "not_working": "no candidate improves",
}
DEFAULT_OUT = REPO / "outputs" / "refinement_study_digits"


def fit_generators(seed: int, out: Path, max_steps: int | None) -> dict[str, Path]:
    """``mar`` and ``mar_m0`` of one seed, trained through the CLI (a finished fit is reused)."""
    from paper_table import _cli, _run_args

    root, ckpts = out / f"seed{seed}", {}
    for name, extra in (("mar", []), ("mar_m0", REMEDY)):
        args = ["--seed_everything", str(seed), *extra, *(["--trainer.max_steps", str(max_steps)] if max_steps else [])]
        _cli(_run_args("fit", [REPO / "configs" / "digits" / "mar.yaml"], root, name, "fit", args),
             root / f"{name}_fit.log")
        ckpts[name] = root / name / "fit" / "checkpoints" / "last.ckpt"
    return ckpts


def refine_options() -> dict:
    """``configs/digits/refine.yaml``'s ``OTRefinement`` settings (without ``generator`` and ``mode``), with the
    real-data refiner objective on-policy."""
    init = yaml.safe_load((REPO / "configs" / "digits" / "refine.yaml").read_text())["model"]["init_args"]
    init = {k: v for k, v in init.items() if k not in ("generator", "mode")}
    return {**init, "map_pool_size": 8192, "map_blur_fraction": 2.0, "refiner_objective": "noisy_context",
            "refiner_on_policy": True}


class _ValAsTest:
    """A digits source whose test split is the val split (the temperature control's tuning reference)."""

    def __init__(self, source) -> None:
        self.source = source

    def split(self, name: str):
        return self.source.split("val" if name == "test" else name)


def best_temperature(gen, source, classifier, seed: int) -> dict:
    """The head temperature of ``TEMPERATURES`` with the lowest digits-FID against the val split (val labels,
    generation seeds other than the reported run's)."""
    from lightning_ar.metrics.digits_paired import DigitsReference, DigitsSamples

    ref = DigitsReference.build(classifier, _ValAsTest(source))
    _, labels = source.split("val")
    fid = {}
    for i, tau in enumerate(TEMPERATURES):
        latents = gen.generate(labels, generator=torch.Generator().manual_seed(50_000 + 100 * seed + i),
                               temperature=tau, progress=False)
        fid[tau] = DigitsSamples.build(latents, labels, classifier, ref).metric("fid", ref)
    return {"grid": list(TEMPERATURES), "val_fid": fid, "chosen": min(fid, key=fid.get)}


def _hooks(module, gen, dm, seed: int, info: dict) -> dict:
    from refinement_study import ShrinkControl, proximal_hooks, train_noisy_refiner

    from lightning_ar.nn.refiners import AmortizedHook

    noisy, info["refiner_noisy"] = train_noisy_refiner(module, dm, REFINER_STEPS, seed)
    return {"none": None, "flow": module._hook("flow"), "map": module._hook("map"), **proximal_hooks(module),
            "amortized_noisy": AmortizedHook(noisy), "mask_remedy": None,
            "shrink": ShrinkControl(module.bank, gen.seq_len, module.flow.options.eta), "temperature": None}


def run_seed(seed: int, out: Path, pool_samples: int, max_steps: int | None) -> Path:
    """Fit, refine, generate every variant on the test labels and save them for one seed."""
    from refinement_study import build_refinement, null_tests

    from lightning_ar import MARGenerator
    from lightning_ar.data.sources import DigitsSource
    from lightning_ar.metrics.digits_classifier import load_or_train_digits_classifier
    from lightning_ar.nn.trace import GenerationTrace

    folder = out / f"seed{seed}"
    if (folder / "info.json").is_file():
        return folder
    torch.set_num_threads(1)
    ckpts = fit_generators(seed, out, max_steps)
    source, start = DigitsSource(), time.perf_counter()
    module, gen, dm = build_refinement(ckpts["mar"], source, pool_samples, seed, inverse_map=True,
                                       options=refine_options())
    info: dict = {"seed": seed, "map_fit": module.map_fit_stats, "build_seconds": time.perf_counter() - start,
                  "checkpoints": {k: str(v) for k, v in ckpts.items()}}
    hooks = _hooks(module, gen, dm, seed, info)
    remedy = MARGenerator.load_from_checkpoint(ckpts["mar_m0"], map_location="cpu").eval()
    info["temperature"] = best_temperature(gen, source, load_or_train_digits_classifier(), seed)
    _, labels = source.split("test")
    samples, info["seconds"] = {}, {}
    for name, hook in hooks.items():
        model = remedy if name == "mask_remedy" else gen
        tau = info["temperature"]["chosen"] if name == "temperature" else float(model.hparams.temperature)
        trace, t0 = GenerationTrace(), time.perf_counter()
        latents = model.generate(labels, generator=torch.Generator().manual_seed(1_000 + seed), trace=trace,
                                 refiner=hook, temperature=tau, progress=False)
        info["seconds"][name] = {"total": time.perf_counter() - t0, "refine": trace.refine_seconds}
        samples[name] = {"latents": latents.float(), "labels": labels}
    if seed == SEEDS[0]:
        info["null_tests"] = null_tests(module, source, seed)
    tmp = folder / "samples.tmp.pt"
    torch.save(samples, tmp)
    tmp.replace(folder / "samples.pt")
    atomic_write_text(folder / "info.json", json.dumps(info, indent=1, default=float) + "\n")
    return folder


def _comparisons(samples: dict, ref, reps: int) -> dict:
    """Paired differences of every variant to ``none`` (each metric) and of each candidate to each control (FID)."""
    from lightning_ar.metrics.digits_paired import compare, paired_seed_differences

    rows = {}
    for v in [v for v in VARIANTS if v != "none"]:
        row = {}
        for m in METRICS:
            row[m] = compare(samples[v], samples["none"], m, ref, SIGN[m], reps).to_dict()
            row[m]["per_seed"] = paired_seed_differences(samples[v], samples["none"], m, ref).tolist()
        if v in CANDIDATES:
            row["fid_vs_controls"] = {c: compare(samples[v], samples[c], "fid", ref, "negative", reps).to_dict()
                                      for c in CONTROLS}
        rows[v] = row
    return rows


def _verdict(rows: dict) -> tuple[str, list[str], list[str]]:
    improves = [v for v in rows if rows[v]["fid"]["high"] < 0]
    harmful = [v for v in rows if rows[v]["fid"]["low"] > 0]
    winners = [v for v in CANDIDATES if v in improves and rows[v]["kid"]["low"] <= 0
               and rows[v]["copy_fraction"]["low"] <= 0
               and all(rows[v]["fid_vs_controls"][c]["high"] < 0 for c in CONTROLS)]
    if winners:
        return f"WORKING ({', '.join(winners)})", improves, harmful
    return ("NOT WORKING" if not set(improves) & set(CANDIDATES) else "not resolved"), improves, harmful


def summarise(out: Path, results: Path, reps: int, note: str) -> dict:
    """Levels, paired comparisons, verdict and costs over the seeds under ``out``; writes JSON + MD to ``results``."""
    import numpy as np

    from lightning_ar.data.sources import DigitsSource
    from lightning_ar.metrics.digits_classifier import load_or_train_digits_classifier
    from lightning_ar.metrics.digits_paired import DigitsReference, DigitsSamples

    folders = [out / f"seed{s}" for s in SEEDS if (out / f"seed{s}" / "info.json").is_file()]
    classifier = load_or_train_digits_classifier()
    ref = DigitsReference.build(classifier)
    samples: dict = {v: [] for v in VARIANTS}
    for f in folders:
        saved = torch.load(f / "samples.pt", map_location="cpu", weights_only=True)
        for v in VARIANTS:
            samples[v].append(DigitsSamples.build(saved[v]["latents"], saved[v]["labels"], classifier, ref))
    infos = [json.loads((f / "info.json").read_text()) for f in folders]
    val, val_labels = DigitsSource().split("val")
    rows = _comparisons(samples, ref, reps)
    verdict, improves, harmful = _verdict(rows)
    summary = {"criteria": CRITERIA, "note": note, "seeds": [i["seed"] for i in infos],
               "samples": int(samples["none"][0].labels.size), "reps": reps, "verdict": verdict,
               "improves": improves, "harmful": harmful,
               "floor": {m: DigitsSamples.build(val, val_labels, classifier, ref).metric(m, ref) for m in METRICS},
               "levels": {v: {m: [x.metric(m, ref) for x in samples[v]] for m in METRICS} for v in VARIANTS},
               "differences": rows, "temperature": [i["temperature"] for i in infos],
               "cost_share": {v: float(np.mean([i["seconds"][v]["refine"] / i["seconds"][v]["total"] for i in infos]))
                              for v in VARIANTS},
               "null_tests": next((i["null_tests"] for i in infos if "null_tests" in i), None),
               "map_fit": [i["map_fit"] for i in infos], "build_seconds": [i["build_seconds"] for i in infos]}
    results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(results / "refinement-study-digits.json", json.dumps(summary, indent=1, default=float) + "\n")
    atomic_write_text(results / "refinement-study-digits.md", markdown(summary))
    return summary


def _ci(e: dict, digits: int = 2) -> str:
    return f"{e['estimate']:+.{digits}f} [{e['low']:+.{digits}f}, {e['high']:+.{digits}f}]"


def markdown(s: dict) -> str:
    """The summary as a report: criteria, verdict, one row per variant, the null test."""
    import numpy as np

    lines = ["# OT refinement variants on digits", "",
             f"Generated by `python benchmarks/refinement_study_digits.py` (seeds {s['seeds']}, {s['samples']} "
             "samples per seed: one per test-split label, same labels and seed for every variant; cfg 3 as in "
             "`configs/digits/mar.yaml`; paired two-level 95% bootstrap CIs over seeds and samples, "
             f"{s['reps']} replicates).", "", "Pre-registered criteria:", ""]
    lines += [f"- **{k}**: {v}" for k, v in s["criteria"].items()]
    lines += ["", s["note"], "", f"Verdict: **{s['verdict']}**. Improves (FID CI < 0): "
              f"{', '.join(s['improves']) or 'none'}. Harmful (FID CI > 0): {', '.join(s['harmful']) or 'none'}.",
              "", f"Floor (val split vs test split, {s['samples']} images): digits-FID {s['floor']['fid']:.2f}, "
              f"KID {s['floor']['kid']:+.4f}. Temperature control chosen on val per seed: "
              f"{[t['chosen'] for t in s['temperature']]}.", "",
              "| variant | digits-FID (seed mean) | FID vs none | KID vs none | cond. acc. vs none | copy fraction "
              "vs none | refine share of sampling time |", "|---|---|---|---|---|---|---|"]
    for v in VARIANTS:
        fid = np.mean(s["levels"][v]["fid"])
        d = s["differences"].get(v)
        cells = [_ci(d["fid"]), _ci(d["kid"], 4), _ci(d["cond_acc"], 3), _ci(d["copy_fraction"], 3)] if d else [""] * 4
        share = f"{100 * s['cost_share'][v]:.1f}%" if s["cost_share"][v] > 0 else ""
        lines.append(f"| {v} | {fid:.2f} | " + " | ".join(cells) + f" | {share} |")
    lines += ["", "Candidates against the controls (FID, candidate - control):", ""]
    for v in CANDIDATES:
        c = s["differences"][v]["fid_vs_controls"]
        lines.append(f"- {v}: vs shrink {_ci(c['shrink'])}, vs temperature {_ci(c['temperature'])}")
    if s["null_tests"]:
        lines += ["", "Null test on seed 0 (conditions drawn from the target; moved / within-group spread, "
                  "dispersion after / before), per AR step:", "", "| step | map | flow (old) |", "|---|---|---|"]
        for k, r in s["null_tests"]["map"].items():
            f = s["null_tests"]["flow"][k]
            lines.append(f"| {k} | {r['ratio']:.3f} ({r['dispersion_after']:.2f}) | {f['ratio']:.3f} "
                         f"({f['dispersion_after']:.2f}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--pool-samples", type=int, default=8192)
    parser.add_argument("--max-steps", type=int, default=None, help="generator fits (default: the config's)")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS), choices=SEEDS)
    parser.add_argument("--reps", type=int, default=1000)
    parser.add_argument("--summarise-only", action="store_true")
    parser.add_argument("--note", default="", help="a line on what this run covers")
    opts = parser.parse_args(argv)
    out = Path(opts.out)
    if not opts.summarise_only:
        with ProcessPoolExecutor(max_workers=max(1, opts.jobs)) as pool:
            futures = [pool.submit(run_seed, s, out, opts.pool_samples, opts.max_steps) for s in opts.seeds]
            for f in futures:
                print(f"done: {f.result()}", flush=True)
    results = Path(opts.results) if out.resolve() == DEFAULT_OUT.resolve() else out
    summary = summarise(out, results, opts.reps, opts.note)
    print(json.dumps({"verdict": summary["verdict"], "improves": summary["improves"], "harmful": summary["harmful"]}))


if __name__ == "__main__":
    main()
