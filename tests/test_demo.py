"""`make demo`'s driver (`lightning-ar demo`) with its debug overlays: every stage runs, the combined table lists every
row, and the configs come from the package (``lightning_ar/configs``, the link to the repository's ``configs/``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_ar.cli import main
from lightning_ar.config_files import CONFIG_DIR, available_configs, config_path
from lightning_ar.demo import study_summary

REPO = Path(__file__).resolve().parents[1]


def test_packaged_configs_are_the_repository_configs() -> None:
    """One source of truth: ``lightning_ar/configs`` resolves to ``configs/``, so README commands and an installed
    copy read the same files."""
    assert CONFIG_DIR.resolve() == (REPO / "configs").resolve()
    shipped = set(available_configs())
    assert {str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").rglob("*.yaml")} == shipped
    assert {"digits/mar.yaml", "digits/refine.yaml", "debug.yaml", "imagenet256/mar_base.yaml"} <= shipped
    with pytest.raises(FileNotFoundError, match="no shipped config 'nope.yaml'.*digits/mar.yaml"):
        config_path("nope.yaml")


def test_configs_tool_prints_paths(capsys: pytest.CaptureFixture) -> None:
    main(["configs", "digits/mar.yaml"])
    assert Path(capsys.readouterr().out.strip()) == config_path("digits/mar.yaml")
    main(["configs", "--list"])
    assert "gmm/mar.yaml" in capsys.readouterr().out.split()


def test_demo_pipeline_with_debug_overlays(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "demo"
    main(["demo", "--debug", "--out", str(out), "--trainer.enable_progress_bar=false"])
    assert "What the committed study measured (refinement-study-digits.json" in capsys.readouterr().out
    for path in ("fit/checkpoints/last.ckpt", "test/samples/test_latest.png", "refine/checkpoints/last.ckpt",
                 "results.md"):
        assert (out / path).is_file(), path
    rows = json.loads((out / "results.json").read_text())
    assert set(rows) == {"mar (default)", "mar + refine=none", "mar + refine=flow", "mar + refine=amortized"}
    for row in rows.values():
        assert 0.0 <= row["cond_acc"] <= 1.0 and row["fid"] > 0 and row["sec_per_image"] > 0
    # same test batches and seeds: refinement mode `none` reproduces the generator's own row
    assert rows["mar + refine=none"]["fid"] == rows["mar (default)"]["fid"]
    assert rows["mar + refine=flow"]["refine_share"] > 0


def test_study_summary_reads_the_committed_digits_study(tmp_path: Path) -> None:
    """The demo's evidence table is the committed study's numbers, each variant's CI read as the study reads it;
    an installed copy without ``benchmarks/`` prints none."""
    study = json.loads((REPO / "benchmarks/results/refinement-study-digits.json").read_text())
    table = study_summary()
    assert f"verdict **{study['verdict']}**" in table
    for name, diff in study["differences"].items():
        fid = diff["fid"]
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        assert f"{fid['estimate']:+.2f} [{fid['low']:+.2f}, {fid['high']:+.2f}]" in row
        expected = "raises FID" if fid["low"] > 0 else "lowers FID" if fid["high"] < 0 else "not resolved"
        assert expected in row
    fake = tmp_path / "study.json"
    fake.write_text(json.dumps({**study, "differences": {"x": {"fid": {"estimate": -2.0, "low": -3.0, "high": -1.0}}},
                                "cost_share": {"x": 0.05}}))
    assert "| x | -2.00 [-3.00, -1.00] | lowers FID | 5.0% |" in study_summary(fake)
    assert study_summary(tmp_path / "absent.json") is None
