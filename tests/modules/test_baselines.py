"""Baselines of the paper's table: the causal AR generator (KV cache, OT refinement) and the DiT-style CDM."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml

from lightning_ar import CausalARGenerator, ConditionalDiffusion, GenerationTrace, MARGenerator, OTRefinement
from lightning_ar.checkpoints.loading import CheckpointError, record_class
from lightning_ar.cli import build_cli, main
from lightning_ar.nn.entropic_map import FITTED
from lightning_ar.theory.measures import score_norms

REPO = Path(__file__).resolve().parents[2]
DEBUG, DEBUG_REFINE = str(REPO / "configs/debug.yaml"), str(REPO / "configs/debug_refine.yaml")
TINY = dict(latent_shape=(1, 8, 8), num_classes=10, width=32, encoder_depth=1, decoder_depth=1, num_heads=2,
            head_width=32, head_depth=1, num_sampling_steps=5, dropout=0.0)


def _tiny_ar(**overrides) -> CausalARGenerator:
    torch.manual_seed(0)
    return CausalARGenerator(**{**TINY, **overrides})


def _tiny_cdm(**overrides) -> ConditionalDiffusion:
    torch.manual_seed(0)
    return ConditionalDiffusion(**{**TINY, **overrides})


# ------------------------------------------------------------------------------------------------ causal AR
@pytest.mark.parametrize("order", ["raster", "random"])
def test_kv_cache_and_recompute_give_identical_tokens(order: str) -> None:
    model = _tiny_ar(order=order)
    labels = torch.tensor([0, 3, 7])
    traces = {}
    for use_cache in (True, False):
        traces[use_cache] = GenerationTrace()
        model.use_cache = use_cache
        out = model.generate(labels, cfg=2.0, generator=torch.Generator().manual_seed(0), trace=traces[use_cache])
        traces[use_cache].latents = out
    torch.testing.assert_close(traces[True].latents, traces[False].latents, rtol=0, atol=1e-5)
    steps = traces[True].steps
    assert len(steps) == model.seq_len == 16  # one token per AR step
    assert [int(s.positions[0, 0]) for s in steps] == model.mar.order.tolist()
    assert all(s.null_conditions is not None for s in steps)


def test_causal_conditions_depend_only_on_earlier_tokens() -> None:
    model = _tiny_ar().eval()
    tokens, labels = torch.randn(2, 16, 4), torch.tensor([1, 2])
    changed = tokens.clone()
    changed[:, 5:] = 0.0
    z, z_changed = model.mar(tokens, None, labels), model.mar(changed, None, labels)
    torch.testing.assert_close(z[:, :6], z_changed[:, :6])  # condition of token i sees tokens < i only
    assert (z[:, 6:] - z_changed[:, 6:]).abs().max() > 1e-3


def test_causal_training_step_learns() -> None:
    model = _tiny_ar()
    latents, labels = torch.randn(8, 1, 8, 8), torch.arange(8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for i in range(30):
        loss = model.diffusion_loss(latents, labels, generator=torch.Generator().manual_seed(i % 2))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


def test_ot_refinement_applies_to_the_causal_generator(tmp_path: Path) -> None:
    gen = _tiny_ar(latent_scale=1.0)
    path = tmp_path / "ar.ckpt"
    ckpt = {"state_dict": gen.state_dict(), "hyper_parameters": dict(gen.hparams), "pytorch-lightning_version": "2.6.0"}
    torch.save(ckpt, tmp_path / "unrecorded.ckpt")
    with pytest.raises(CheckpointError, match="unrecorded.ckpt holds no MARGenerator hyper-parameters.*'order'"):
        OTRefinement(str(tmp_path / "unrecorded.ckpt"))  # no class recorded: read as MAR's, refused, not guessed
    record_class(gen, ckpt)  # what on_save_checkpoint writes into every checkpoint Lightning saves
    torch.save(ckpt, path)
    ref = OTRefinement(str(path), bank_capacity=64, heldout_capacity=32, teacher_passes=1, target_size=32)
    assert isinstance(ref.mar_generator, CausalARGenerator) and len(ref.schedule) == 16
    g = torch.Generator().manual_seed(0)
    ref.fill_bank(ref.bank, torch.randn(8, 1, 8, 8), torch.arange(8) % 10, g)
    ref.fill_bank(ref.heldout, torch.randn(8, 1, 8, 8), torch.arange(8) % 10, g)
    for k in (0, 5, 15):  # teacher forcing follows the generator's raster order: step k predicts position k
        _, _, positions = ref.bank.get(k)
        assert set(positions.tolist()) == {k}
    trace = GenerationTrace()
    out = ref.generate(torch.tensor([1, 2]), refine="flow", generator=torch.Generator().manual_seed(0), trace=trace)
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
    moved = [float((s.conditions - s.raw_conditions).abs().max()) for s in trace.steps]
    assert max(moved) > 0  # the flow moved the conditions of some step
    rebuilt = OTRefinement(None, generator_hparams=dict(ref.hparams.generator_hparams))
    assert isinstance(rebuilt.mar_generator, CausalARGenerator)


# ---------------------------------------------------------------------------------------------------- CDM
def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    """Give the zero-initialised AdaLN modulations and output layers weights (an untrained model predicts 0)."""
    torch.manual_seed(1)
    for p in model.parameters():
        if p.ndim > 1:
            torch.nn.init.normal_(p, std=0.1)
    return model


def test_cdm_sampling_is_seeded_and_traced() -> None:
    model = _perturb(_tiny_cdm())
    labels = torch.tensor([0, 1, 2, 3])
    a = model.generate(labels, cfg=2.0, generator=torch.Generator().manual_seed(1))
    b = model.generate(labels, cfg=2.0, generator=torch.Generator().manual_seed(1))
    c = model.generate(labels, cfg=2.0, generator=torch.Generator().manual_seed(2))
    assert a.shape == (4, 1, 8, 8) and torch.equal(a, b) and not torch.equal(a, c)
    trace = GenerationTrace()
    model.generate(labels, cfg=2.0, generator=torch.Generator().manual_seed(1), trace=trace)
    (rec,) = trace.steps  # a CDM has one static condition: one record
    assert rec.conditions.shape == (4, 16, 32) and torch.equal(rec.conditions[:, 0], rec.conditions[:, -1])
    norms = score_norms(model.head, trace, [100, 500], torch.Generator().manual_seed(0))
    assert norms.score.shape == (1, 2) and (norms.score > 0).all()
    assert norms.guidance is not None and (norms.guidance > 0).all()  # class and null conditions differ


def test_cdm_denoiser_sees_all_tokens_and_the_class() -> None:
    model = _perturb(_tiny_cdm()).eval()
    x, t = torch.randn(32, 4), torch.full((32,), 300)
    z = model.static_conditions(torch.tensor([1, 2])).reshape(32, -1)
    out = model.head.net(x, t, z)
    x2 = x.clone()
    x2[20] += 1.0  # a token of the second image: the first image's outputs must not change, the second's must
    out2 = model.head.net(x2, t, z)
    torch.testing.assert_close(out[:16], out2[:16])
    assert (out[16:20] - out2[16:20]).abs().max() > 1e-4
    z_other = model.static_conditions(torch.tensor([1, 5])).reshape(32, -1)
    assert (model.head.net(x, t, z_other)[16:] - out[16:]).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------- configs / budgets
def _instantiate(config: str, tmp_path: Path):
    cli = build_cli(["--config", str(REPO / "configs" / config), "--trainer.default_root_dir", str(tmp_path)],
                    run=False)
    return cli.model


@pytest.mark.parametrize("source", ["digits", "gmm"])
def test_parameter_counts_and_budgets_match_mar(source: str, tmp_path: Path) -> None:
    counts = {}
    for name, cls in (("mar", MARGenerator), ("cdm", ConditionalDiffusion), ("ar", CausalARGenerator)):
        model = _instantiate(f"{source}/{name}.yaml", tmp_path)
        assert isinstance(model, cls)
        counts[name] = sum(p.numel() for p in model.parameters())
    for name in ("cdm", "ar"):
        assert abs(counts[name] / counts["mar"] - 1) < 0.10, counts
    configs = {n: yaml.safe_load((REPO / "configs" / source / f"{n}.yaml").read_text()) for n in ("mar", "cdm", "ar")}
    for name in ("cdm", "ar"):
        cfg, ref = configs[name], configs["mar"]
        for key in ("max_steps", "max_epochs", "gradient_clip_val", "precision"):
            assert cfg["trainer"].get(key) == ref["trainer"].get(key), (name, key)
        assert cfg["data"] == ref["data"]
        for key in ("optimizer", "lr_scheduler"):
            assert cfg["model"]["init_args"][key] == ref["model"]["init_args"][key], (name, key)
        ema = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("EMAWeightAveraging")]
        assert ema == [c for c in ref["trainer"]["callbacks"] if c["class_path"].endswith("EMAWeightAveraging")]


# --------------------------------------------------------------------------------------- through the CLI
def _args(stage: str, configs: list[str], root: Path, version: str, *extra: str) -> list[str]:
    args = [stage]
    for config in configs:
        args += ["--config", config]
    return args + ["--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
                   "--trainer.logger.init_args.version", version, "--trainer.enable_progress_bar", "false", *extra]


def _results(root: Path, name: str, version: str) -> dict:
    return json.loads((root / name / version / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["cdm", "ar"])
def test_variant_trains_and_samples_through_the_cli(variant: str, tmp_path: Path) -> None:
    config = str(REPO / "configs/digits" / f"{variant}.yaml")
    main(_args("fit", [config, DEBUG], tmp_path, "fit"))
    ckpt = tmp_path / variant / "fit" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and (tmp_path / variant / "fit" / "samples" / "val_latest.png").is_file()
    main(_args("test", [config, DEBUG], tmp_path, "test", "--ckpt_path", str(ckpt)))
    row = _results(tmp_path, variant, "test")["default"]
    assert row["num_samples"] > 0 and 0.0 <= row["cond_acc"] <= 1.0 and row["fid"] > 0
    if variant == "ar":  # AR + OT: refine the trained causal generator and test the refinement modes
        refine = [str(REPO / "configs/digits/refine.yaml"), str(REPO / "configs/digits/refine_ar.yaml")]  # + overlay
        main(_args("fit", [*refine, DEBUG_REFINE], tmp_path, "fit", "--model.init_args.generator", str(ckpt)))
        refined = tmp_path / "refine_ar" / "fit" / "checkpoints" / "last.ckpt"
        main(_args("test", [*refine, DEBUG_REFINE], tmp_path, "test", "--ckpt_path", str(refined)))
        results = _results(tmp_path, "refine_ar", "test")
        assert {"none", "flow", "amortized"} <= set(results)
        assert results["flow"]["num_samples"] > 0


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_options_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="model.order"):
        _tiny_ar(order="zigzag")
    with pytest.raises(ValueError, match="num_iter must be 16"):
        _tiny_ar().generate(torch.tensor([0]), num_iter=4)
    with pytest.raises(ValueError, match="labels must be in"):
        _tiny_ar().generate(torch.tensor([10]))
    with pytest.raises(ValueError, match="model.width"):
        _tiny_cdm(width=30, num_heads=4)
    with pytest.raises(ValueError, match="model.sampler"):
        _tiny_cdm(sampler="euler")
    for build in (_tiny_ar, _tiny_cdm):
        with pytest.raises(ValueError, match="model.timestep_spacing must be one of .*'uniform'"):
            build(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="labels must be in"):
        _tiny_cdm().generate(torch.tensor([-1]))
    with pytest.raises(ValueError, match="latent_shape"):
        _tiny_cdm().diffusion_loss(torch.randn(2, 1, 4, 4), torch.tensor([0, 1]))
    with pytest.raises(FileNotFoundError, match="model.generator"):
        OTRefinement(str(tmp_path / "missing.ckpt"))
    with pytest.warns(UserWarning, match="num_iter=2 does not apply"):
        assert _tiny_ar(num_iter=2).hparams.num_iter == 16


# ---------------------------------------------------------------------------------------------- the table
def _paper_table():
    spec = importlib.util.spec_from_file_location("paper_table", REPO / "benchmarks" / "paper_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paper_table_summary_and_options(tmp_path: Path) -> None:
    pt = _paper_table()
    rows = lambda fid: {r: {"fid": fid + i, "kid": 0.1, "cond_acc": 0.5, "sec_per_image": 0.1,  # noqa: E731
                            "fid_floor": 5.0} for i, r in enumerate(pt.ROWS)}
    js, md = pt.write_table({0: rows(10.0), 1: rows(12.0)}, {"seeds": 2, "max_steps": 50, "refine_overlay": None},
                            tmp_path)
    summary = json.loads(js.read_text())["summary"]
    assert summary["CDM"]["fid_mean"] == pytest.approx(11.0) and summary["CDM"]["fid_std"] == pytest.approx(2**0.5)
    assert summary["AR+OT"]["fid_mean"] == pytest.approx(16.0)
    assert "| MAR+OT | 14 ± 1.4 |" in md.read_text()
    pt.main(["--render", str(js)])  # re-render with the samplers read from the shipped configs
    text = md.read_text()
    assert "| MAR+OT | 14 ± 1.4 |" in text and text.count("| ddpm-10 |") == 4 and text.count("| ddpm-100 |") == 2
    for bad in (["--seeds", "0"], ["--max-steps", "0"], ["--configs", str(tmp_path)], ["--bootstrap", "1"]):
        with pytest.raises(SystemExit):
            pt.parse_args(bad)
    pt.main(["--render", str(js), "--no-timing"])
    assert "sec / image" not in md.read_text() and "not valid" in md.read_text()


def test_paper_table_renders_the_committed_older_table_as_training_split_figures() -> None:
    """The 2026-11-29 table (no KID, digits-FID against the training split, no ``fid_reference``) renders (notebook 04
    reads it) and says which split its FID was computed against; a table of today's runs says the test split."""
    pt = _paper_table()
    table = json.loads((REPO / "benchmarks" / "results" / "paper-table-digits-2026-11-29.json").read_text())
    text = pt.format_markdown(table["summary"], table["settings"], table.get("analysis"))
    assert "TRAINING split" in text and "digits-FID (train split)" in text and "| MAR | 16.01 ± 1.1 | - |" in text
    assert "unseen test split" in pt.format_markdown(table["summary"], {**table["settings"], "fid_reference": "test"})


def test_paper_table_compares_paired_from_the_saved_samples(tmp_path: Path) -> None:
    """Rows with known relations: identical rows differ by exactly 0, noise loses to real digits, copies copy."""
    from lightning_ar.data.sources import DigitsSource

    pt = _paper_table()
    source = DigitsSource()
    val, _ = source.split("val")
    train, _ = source.split("train")
    _, labels = source.split("test")
    noise = torch.rand(180, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    images = {"CDM": noise, "MAR": val, "MAR-m0": val, "MAR+OT": val, "AR": train[:180], "AR+OT": train[180:360]}
    for seed in (0, 1):
        for row, x in images.items():
            path, variant = pt.sample_file(tmp_path, seed, row)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({variant: {"latents": x, "labels": labels}}, path)
    analysis = pt.analyse(tmp_path, [0, 1], reps=30)
    comp = {(c["a"], c["b"]): c["metrics"] for c in analysis["comparisons"]}
    assert comp["MAR", "CDM"]["fid"]["verdict"] == "holds" and comp["MAR", "CDM"]["fid"]["high"] < 0
    same = comp["MAR+OT", "MAR"]["fid"]
    assert same["per_seed"] == [0.0, 0.0] and same["verdict"] == "not resolved"
    assert analysis["levels"]["AR"]["copy_fraction"] == [1.0, 1.0] and analysis["floors"]["nn_ratio"] > 0.5
    assert comp["AR", "CDM"]["copy_fraction"]["verdict"] == "holds"  # AR copies more
    rows = {r: {"fid": 1.0, "kid": 0.0, "cond_acc": 1.0, "sec_per_image": 0.1} for r in pt.ROWS}
    _, md = pt.write_table({0: rows, 1: rows}, {"seeds": 2, "max_steps": None, "refine_overlay": None}, tmp_path,
                           analysis)
    text = md.read_text()
    assert "| MAR+OT - MAR | fid | +0, +0 | +0 |" in text and "| real val split (floor) |" in text


def test_paper_table_trains_and_tests_the_remedy_row_with_mask_ratio_min_0(tmp_path: Path, monkeypatch) -> None:
    """MAR-m0 is mar.yaml plus ``mask_ratio_min 0`` in both its fit and its test run, with the seed of the other
    rows (so that it is paired with MAR); MAR itself gets no such option."""
    pt = _paper_table()
    calls = []
    monkeypatch.setattr(pt, "_cli", lambda args, log: calls.append(args))
    monkeypatch.setattr(pt, "_test_results", lambda root, name, version: {})
    opts = pt.parse_args(["--out", str(tmp_path)])
    for row in ("MAR", pt.REMEDY):
        ckpt = pt._generator_task(row, 1, opts)()
        pt._test_task(row, 1, ckpt, opts)()
    (mar_fit, mar_test, m0_fit, m0_test) = [" ".join(c) for c in calls]
    assert "mask_ratio_min" not in mar_fit + mar_test and "/seed1/mar_m0/fit/checkpoints/last.ckpt" in m0_test
    for cmd in (m0_fit, m0_test):
        assert "--model.init_args.mask_ratio_min 0" in cmd and "--seed_everything 1" in cmd and "mar.yaml" in cmd


def test_paper_table_skips_finished_runs_and_marks_only_successes(tmp_path: Path) -> None:
    pt = _paper_table()
    log = tmp_path / "x_fit.log"
    with pytest.raises(RuntimeError, match="failed"):
        pt._cli(["no-such-subcommand"], log)  # a failing run leaves no marker
    assert not (tmp_path / "x_fit.log.done").exists()
    (tmp_path / "x_fit.log.done").write_text("finished earlier\n")
    pt._cli(["no-such-subcommand"], log)  # finished earlier: skipped, so no failure


def _memorisation():
    spec = importlib.util.spec_from_file_location("memorisation", REPO / "benchmarks" / "memorisation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memorisation_separates_copies_from_new_digits() -> None:
    from lightning_ar.data.sources import DigitsSource

    mem = _memorisation()
    train, _ = DigitsSource().split("train")
    test, _ = DigitsSource().split("test")
    copies = mem.memorisation(train[:180], train, test)
    assert copies["nn_ratio"] == 0.0 and copies["copy_fraction"] == 1.0
    unseen = mem.memorisation(test, train, test)
    assert unseen["nn_ratio"] == pytest.approx(1.0) and unseen["copy_fraction"] == pytest.approx(0.05, abs=0.01)
    noisy = mem.memorisation(train[:180] + 0.3 * torch.randn(180, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
                             train, test)
    assert 0.0 < noisy["nn_ratio"] < 1.0 and noisy["copy_fraction"] < 1.0


def test_memorisation_runs_on_a_paper_table_folder(tmp_path: Path, tiny_generator: MARGenerator) -> None:
    import lightning as L

    mem = _memorisation()
    for row, module in (("cdm", _tiny_cdm()), ("mar", tiny_generator), ("ar", _tiny_ar())):
        path = tmp_path / "seed0" / row / "fit" / "checkpoints" / "last.ckpt"
        path.parent.mkdir(parents=True)
        torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                    "pytorch-lightning_version": L.__version__}, path)
    results = mem.main(["--table", str(tmp_path)])
    assert set(results) == {"CDM", "MAR", "AR"} and all(set(r) == {"0"} for r in results.values())
    assert json.loads((tmp_path / "memorisation.json").read_text()) == results
    assert all(r["0"]["nn_ratio"] > 0 for r in results.values())  # untrained generators copy nothing
    with pytest.raises(FileNotFoundError, match="no seed"):
        mem.main(["--table", str(tmp_path / "empty")])


@pytest.mark.parametrize("make", ["mar", "ar", "cdm"])
def test_diffusion_loss_names_latent_shape_for_wrong_data(make: str, tiny_generator: MARGenerator) -> None:
    module = {"mar": lambda: tiny_generator, "ar": _tiny_ar, "cdm": _tiny_cdm}[make]()
    with pytest.raises(ValueError, match=r"data latents have shape \(1, 4, 4\) but model.latent_shape"):
        module.diffusion_loss(torch.randn(2, 1, 4, 4), torch.zeros(2, dtype=torch.long))


@pytest.mark.slow
def test_shipped_gmm_refinement_fits_the_map_and_tests_every_variant(tmp_path: Path) -> None:
    """The shipped ``gmm/refine.yaml`` (with the debug overlays) through the CLI: the bank epoch ends with the map
    fitted on-policy, it is stored in the checkpoint, and ``test`` scores the ``map`` variant beside the others."""
    mar, debug = str(REPO / "configs/gmm/mar.yaml"), str(REPO / "configs/debug.yaml")
    main(_args("fit", [mar, debug], tmp_path, "fit"))
    gen = tmp_path / "mar" / "fit" / "checkpoints" / "last.ckpt"
    refine = str(REPO / "configs/gmm/refine.yaml")
    main(_args("fit", [refine, DEBUG_REFINE], tmp_path, "fit", "--model.init_args.generator", str(gen)))
    refined = tmp_path / "refine" / "fit" / "checkpoints" / "last.ckpt"
    state = torch.load(refined, weights_only=False)["state_dict"]
    assert (state["entropic_map.status"] == FITTED).sum() >= 1  # the map travels in the checkpoint
    main(_args("test", [refine, DEBUG_REFINE], tmp_path, "test", "--ckpt_path", str(refined)))
    results = _results(tmp_path, "refine", "test")
    assert {"none", "flow", "map"} <= set(results)
    assert results["map"]["num_samples"] > 0 and results["map"]["nll"] == results["map"]["nll"]  # finite, not NaN
    # the same shipped config with the ground-truth objective, on-policy (issue 15 item 5a): the refiner epoch trains
    main(_args("fit", [refine, DEBUG_REFINE], tmp_path, "exact", "--model.init_args.generator", str(gen),
               "--model.init_args.refiner_objective", "exact", "--model.init_args.refiner_on_policy", "true"))
    ckpt = torch.load(tmp_path / "refine" / "exact" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["hyper_parameters"]["refiner_objective"] == "exact" and ckpt["hyper_parameters"]["refiner_on_policy"]
    assert ckpt["state_dict"]["refiner.out.weight"].abs().sum() > 0  # no longer the zero-initialised identity
