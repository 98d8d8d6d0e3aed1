"""The benchmark helpers (figures themselves are measured by `make bench`, never asserted in tests)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import lightning
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench  # noqa: E402
import compare  # noqa: E402
import sampler_quality  # noqa: E402


def test_compare_reports_ratios_and_direction() -> None:
    old = {"training": {"digits": {"fp32": {"samples_per_s": 100.0, "step_ms": 10.0, "train_mfu": 0.5}}},
           "date": "x", "quick": False}
    new = {"training": {"digits": {"fp32": {"samples_per_s": 150.0, "step_ms": 20.0, "train_mfu": 0.51}}},
           "extra": 1.0}
    rows = {key: (ratio, verdict) for key, _, _, ratio, verdict in compare.compare(old, new)}
    assert set(rows) == {"training.digits.fp32.samples_per_s", "training.digits.fp32.step_ms",
                         "training.digits.fp32.train_mfu"}
    assert rows["training.digits.fp32.samples_per_s"] == (1.5, "better")
    assert rows["training.digits.fp32.step_ms"] == (2.0, "worse")  # times: larger is worse
    assert rows["training.digits.fp32.train_mfu"][1] == ""  # within 5%


def test_compare_cli_needs_two_files(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        compare.main([str(tmp_path / "only.json")])


def test_training_figures_are_consistent() -> None:
    """FLOPs, throughput and MFU of one digits step agree with each other (quick timing)."""
    ceilings = {"fp32": 100.0, "bf16": 300.0}
    row = bench.training("digits", "fp32", ceilings, quick=True)
    assert row["gflops_per_sample"] > 0
    assert row["samples_per_s"] == pytest.approx(row["batch"] / (row["step_ms"] / 1e3), rel=0.02)
    achieved = row["gflops_per_sample"] * row["samples_per_s"]
    assert row["achieved_gflops"] == pytest.approx(achieved, rel=0.02)
    assert row["train_mfu"] == pytest.approx(row["achieved_gflops"] / 100.0, rel=0.02)


def test_compiled_training_figures_compare_the_same_loss() -> None:
    """The compiled path of ``make bench`` (here with dynamo's eager backend: capture, no code generation)."""
    torch._dynamo.reset()
    row = bench.compiled_training("digits", quick=True, backend="eager")
    assert row["speedup"] == pytest.approx(row["eager_step_ms"] / row["compiled_step_ms"], rel=0.02)
    assert row["loss_rel_diff"] < 1e-6 and row["compile_s"] > -1.0


def test_compiled_sampling_figures_compare_the_same_samples() -> None:
    """The compiled sampling path of ``make bench`` (dynamo's eager backend: capture, no code generation)."""
    torch._dynamo.reset()
    row = bench.compiled_sampling("digits", quick=True, backend="eager")
    assert row["speedup"] == pytest.approx(row["eager_sec_per_image"] / row["compiled_sec_per_image"], rel=0.05)
    assert row["max_abs_diff"] < 1e-4 and row["batch"] == 2


def test_sampler_verdict_uses_both_quality_bounds() -> None:
    rows = {
        "ddpm-100": {"sec_per_image": 0.03, "fid_pooled": 10.0, "cond_acc_pooled": 0.98},
        "fast": {"sec_per_image": 0.01, "fid_pooled": 10.9, "cond_acc_pooled": 0.975},
        "worse_fid": {"sec_per_image": 0.01, "fid_pooled": 11.2, "cond_acc_pooled": 0.99},
        "worse_acc": {"sec_per_image": 0.01, "fid_pooled": 9.0, "cond_acc_pooled": 0.96},
    }
    sampler_quality.judge(rows)
    assert rows["fast"]["equal_quality"] and rows["fast"]["speedup_vs_ddpm100"] == 3.0
    assert not rows["worse_fid"]["equal_quality"]
    assert not rows["worse_acc"]["equal_quality"]


@pytest.mark.parametrize("name", ["CausalARGenerator", "ConditionalDiffusion"])
def test_sampler_quality_reads_any_generator_checkpoint(name: str, tmp_path: Path, monkeypatch) -> None:
    """The sampler comparison runs on the baselines' checkpoints too (class read from LightningCLI's hparams)."""
    import lightning_ar

    torch.manual_seed(0)
    model = getattr(lightning_ar, name)(latent_shape=(1, 8, 8), num_classes=10, width=32, encoder_depth=1,
                                        decoder_depth=1, num_heads=2, head_width=32, head_depth=1)
    hparams = {**model.hparams, "_class_path": f"lightning_ar.{name}",
               "_instantiator": "lightning.pytorch.cli.instantiate_module"}
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams,
                "pytorch-lightning_version": lightning.__version__}, tmp_path / "g.ckpt")
    monkeypatch.setattr(sampler_quality, "SETTINGS", {sampler_quality.REFERENCE: ("ddpm", 4), "ddim-2": ("ddim", 2)})
    result = sampler_quality.evaluate(str(tmp_path / "g.ckpt"), seeds=1, labels=torch.arange(10).repeat(2))
    assert result["model"] == name and set(result["settings"]) == {"ddpm-100", "ddim-2"}
    for row in result["settings"].values():
        assert math.isfinite(row["fid_pooled"]) and 0 <= row["cond_acc_pooled"] <= 1 and row["sec_per_image"] > 0


def test_compare_reference_refuses_a_folder_that_is_not_a_mar_checkout(tmp_path: Path) -> None:
    """The side-by-side comparison needs the user's own LTH14/mar checkout; anything else is named and refused."""
    import compare_reference

    with pytest.raises(SystemExit, match="is not a checkout of LTH14/mar"):
        compare_reference.main([str(tmp_path), "--rounds", "1", "--steps", "1", "--configs", "digits"])


def _study_row(closed: float, d_seq: float, d_sw: float, min_eig: float, d_kl: float) -> dict:
    se = {"se": 0.01}
    return {"gap_closed": closed, "d_sequence_excess": {"value": d_seq, **se}, "d_sliced_w2": {"value": d_sw, **se},
            "late_min_eig": {"value": min_eig}, "d_late_kl": {"value": d_kl}}


def test_refinement_study_verdict_needs_a_positive_gap() -> None:
    """The pre-registered rule: a gap is a positive GEN - TF late KL above 3 SE; a resolved negative gap is VACUOUS."""
    import refinement_study as rs

    control = _study_row(0.0, 0.0, 0.0, 1.0, -0.01)
    rows = {"map": _study_row(0.5, -0.1, -0.1, 1.0, -0.05), "shrink": control, "temperature": control}
    positive = {"value": 0.10, "lo": 0.05, "hi": 0.15, "se": 0.02}
    assert rs._verdict({"variants": rows}, positive) == "WORKING (map)"  # positive control of the rule
    negative = {"value": -1.29, "lo": -1.41, "hi": -1.17, "se": 0.06}
    assert rs._verdict({"variants": rows}, negative) == "VACUOUS"
    small = {"value": 0.04, "lo": 0.001, "hi": 0.08, "se": 0.02}  # CI excludes 0 but under 3 SE
    assert rs._verdict({"variants": rows}, small) == "VACUOUS"
    rows["map"] = _study_row(0.05, -0.1, -0.1, 1.0, -0.05)
    assert rs._verdict({"variants": rows}, positive) == "NOT WORKING"


def test_head_training_benchmark_compares_equal_losses(monkeypatch: pytest.MonkeyPatch) -> None:
    """``benchmarks/head_training.py`` on a tiny shape: both formulations give the same loss (table path: 1200
    rows > 1000 timesteps)."""
    import head_training

    monkeypatch.setattr(head_training, "SHAPES", {"tiny": (4, 8, 16, 300)})
    row = head_training.measure("tiny", rounds=1)
    assert row["rows"] == 1200 and row["max_rel_diff"] < 1e-4
    assert row["speedup"] == pytest.approx(row["seconds"]["per_row"] / row["seconds"]["ours"])


def test_compile_quality_verdict_needs_the_ci_to_exclude_zero() -> None:
    import compile_quality

    def rows(shift: float) -> dict:
        eager = {s: {"fid": 20.0 + s, "kid": 0.0, "cond_acc": 0.98} for s in range(3)}
        comp = {s: {"fid": 20.0 + s + shift + 0.1 * s, "kid": 0.0, "cond_acc": 0.98} for s in range(3)}
        return {"eager": eager, "compile": comp}

    assert compile_quality.summarise(rows(5.0), [0, 1, 2])["fid"]["verdict"] == "differs"
    same = compile_quality.summarise(rows(-0.1), [0, 1, 2])["fid"]
    assert same["verdict"] == "no difference resolved" and same["low"] <= 0 <= same["high"]
    assert same["eager_seed_sd"] == pytest.approx(1.0)
