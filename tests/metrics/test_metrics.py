"""Tests of the sample-quality metrics: the digits classifier and its cache, conditional accuracy, the evaluators."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lightning_ar.data.sources import DigitsSource, GMMSource
from lightning_ar.metrics import (
    ConditionalAccuracy,
    DigitsClassifier,
    DigitsEvaluator,
    GMMEvaluator,
    load_or_train_digits_classifier,
    train_digits_classifier,
)
from lightning_ar.metrics import digits_classifier as dc
from lightning_ar.metrics.digits_classifier import classifier_accuracy
from lightning_ar.metrics.gmm import sliced_wasserstein


@pytest.fixture(scope="module")
def digits() -> DigitsSource:
    return DigitsSource()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory, digits: DigitsSource) -> Path:
    """A cache directory holding the trained classifier (trained once per module, a few seconds)."""
    path = tmp_path_factory.mktemp("cache")
    load_or_train_digits_classifier(path, digits)
    return path


@pytest.fixture(scope="module")
def digits_eval(cache_dir: Path, digits: DigitsSource) -> DigitsEvaluator:
    evaluator = DigitsEvaluator(digits, cache_dir=cache_dir)
    evaluator.prepare(torch.device("cpu"))
    return evaluator


def _cache_file(cache_dir: Path) -> Path:
    (path,) = cache_dir.glob("digits_classifier_*.pt")
    return path


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def _cheap_train(calls: list[int]):
    """A stand-in for train_digits_classifier that trains one epoch and counts its calls."""

    def train(source: DigitsSource | None = None, epochs: int = 20, seed: int = 0) -> DigitsClassifier:
        calls.append(1)
        return train_digits_classifier(source, epochs=1, seed=seed)

    return train


# ----------------------------------------------------------------------------------------------- digits classifier


def test_classifier_test_accuracy(cache_dir: Path, digits: DigitsSource) -> None:
    model = load_or_train_digits_classifier(cache_dir, digits)
    assert classifier_accuracy(model, *digits.split("test")) >= 0.97
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    images, _ = digits.split("test")
    assert model.features(images[:5]).shape == (5, model.num_features)
    assert model(images[:5]).shape == (5, 10)


def test_training_is_deterministic_and_keeps_global_state(digits: DigitsSource) -> None:
    rng, threads = torch.random.get_rng_state(), torch.get_num_threads()
    a = train_digits_classifier(digits, epochs=1)
    b = train_digits_classifier(digits, epochs=1)
    assert _same_weights(a, b)
    assert not _same_weights(a, train_digits_classifier(digits, epochs=1, seed=1))
    assert torch.equal(rng, torch.random.get_rng_state())
    assert torch.get_num_threads() == threads


def test_cache_is_reused(cache_dir: Path, digits: DigitsSource, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _cache_file(cache_dir)
    mtime = path.stat().st_mtime_ns
    first = load_or_train_digits_classifier(cache_dir, digits)
    monkeypatch.setattr(dc, "train_digits_classifier", lambda *a, **k: pytest.fail("retrained despite a cache"))
    second = load_or_train_digits_classifier(cache_dir, digits)
    assert _same_weights(first, second)
    assert path.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "other_version"])
def test_corrupt_cache_is_retrained(
    damage: str, cache_dir: Path, digits: DigitsSource, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = _cache_file(cache_dir).read_bytes()
    path = tmp_path / _cache_file(cache_dir).name
    if damage == "other_version":
        torch.save({"version": "old", "state_dict": DigitsClassifier().state_dict()}, path)
    else:
        path.write_bytes({"garbage": b"not a checkpoint", "truncated": good[: len(good) // 2], "empty": b""}[damage])
    calls: list[int] = []
    monkeypatch.setattr(dc, "train_digits_classifier", _cheap_train(calls))
    model = load_or_train_digits_classifier(tmp_path, digits)
    assert calls == [1]
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # rewritten in place, no temp file left
    assert _same_weights(load_or_train_digits_classifier(tmp_path, digits), model) and calls == [1]


def test_interrupted_write_leaves_no_partial_file(
    cache_dir: Path, digits: DigitsSource, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / _cache_file(cache_dir).name
    path.write_bytes(b"old")

    def failing_save(obj: object, f) -> None:
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(dc, "train_digits_classifier", _cheap_train([]))
    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        load_or_train_digits_classifier(tmp_path, digits)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_cache_dir_from_environment(digits: DigitsSource, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dc.CACHE_ENV, str(tmp_path / "env_cache"))
    monkeypatch.setattr(dc, "train_digits_classifier", _cheap_train([]))
    load_or_train_digits_classifier(source=digits)
    (path,) = (tmp_path / "env_cache").iterdir()
    assert dc.RECIPE_VERSION in path.name


# ------------------------------------------------------------------------------------------- conditional accuracy


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric ConditionalAccuracy was called before")
def test_conditional_accuracy_accumulates_logits_and_classes() -> None:
    metric = ConditionalAccuracy()
    assert math.isnan(metric.compute())
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0]])  # predicts 0, 1
    metric.update(logits, torch.tensor([0, 2]))
    metric.update(torch.tensor([1, 1]), torch.tensor([1, 1]))
    assert metric.compute().item() == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="labels"):
        metric.update(logits, torch.tensor([0, 1, 2]))


# ---------------------------------------------------------------------------------------------- digits evaluator


def _digits_scores(evaluator: DigitsEvaluator, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    evaluator.reset()
    for x, y in zip(images.split(64), labels.split(64), strict=True):
        evaluator.update(x, y)
    return evaluator.compute()


def test_digits_reference(digits_eval: DigitsEvaluator) -> None:
    ref = digits_eval.reference()
    assert set(ref) == {"fid_floor", "kid_floor", "cond_acc_floor"}
    assert ref["cond_acc_floor"] >= 0.97
    assert 0.0 < ref["fid_floor"] < 50.0 and abs(ref["kid_floor"]) < 0.1


def test_digits_real_images_score_like_the_floor(digits_eval: DigitsEvaluator, digits: DigitsSource) -> None:
    """The reference is the test split: the test split itself scores ~0, the val split exactly the floors."""
    ref = digits_eval.reference()
    test = _digits_scores(digits_eval, *digits.split("test"))
    assert test["cond_acc"] >= 0.97
    assert test["fid"] == pytest.approx(0.0, abs=1e-3) and test["kid"] < ref["kid_floor"] + 1e-6
    val = _digits_scores(digits_eval, *digits.split("val"))  # other unseen real images of the same count
    assert val["cond_acc"] >= 0.95
    assert val["fid"] == pytest.approx(ref["fid_floor"], rel=1e-4)
    assert val["kid"] == pytest.approx(ref["kid_floor"], rel=1e-4, abs=1e-7)


def test_digits_kid_is_deterministic_and_keeps_the_global_rng(digits_eval: DigitsEvaluator,
                                                             digits: DigitsSource) -> None:
    """Fewer generated images than real ones: KID uses a seeded subset of the real features, not the global RNG."""
    images, labels = digits.split("val")
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = _digits_scores(digits_eval, images[:50], labels[:50])
    assert torch.equal(torch.get_rng_state(), state)
    assert _digits_scores(digits_eval, images[:50], labels[:50]) == first


def test_digits_noise_scores_badly(digits_eval: DigitsEvaluator, digits: DigitsSource) -> None:
    _, labels = digits.split("test")
    noise = torch.rand(len(labels), 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    scores = _digits_scores(digits_eval, noise, labels)
    ref = digits_eval.reference()
    assert scores["fid"] > 20 * ref["fid_floor"] and scores["kid"] > 20 * max(ref["kid_floor"], 1e-3)
    assert scores["cond_acc"] < 0.4
    images, labels = digits.split("test")
    assert _digits_scores(digits_eval, images, (labels + 1) % 10)["cond_acc"] < 0.05  # wrong conditioning labels


def test_digits_reset_keeps_real_statistics(digits_eval: DigitsEvaluator, digits: DigitsSource) -> None:
    first = _digits_scores(digits_eval, *digits.split("val"))
    _digits_scores(digits_eval, *digits.split("test"))
    assert _digits_scores(digits_eval, *digits.split("val")) == pytest.approx(first)


def test_digits_out_of_range_latents_are_clamped(digits_eval: DigitsEvaluator, digits: DigitsSource) -> None:
    images, labels = digits.split("val")
    assert _digits_scores(digits_eval, images * 3, labels) == pytest.approx(
        _digits_scores(digits_eval, (images * 3).clamp(-1, 1), labels)
    )


def test_digits_input_errors(digits_eval: DigitsEvaluator, cache_dir: Path) -> None:
    digits_eval.reset()
    with pytest.raises(ValueError, match=r"latents \[B, 1, 8, 8\]"):
        digits_eval.update(torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels \[B\]"):
        digits_eval.update(torch.zeros(4, 1, 8, 8), torch.zeros(3, dtype=torch.long))
    digits_eval.update(torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long))
    with pytest.raises(RuntimeError, match="at least 2"):
        digits_eval.compute()
    unprepared = DigitsEvaluator(cache_dir=cache_dir)
    with pytest.raises(RuntimeError, match="prepare"):
        unprepared.update(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))


def test_digits_prepared_parts_stay_out_of_state_dict(digits_eval: DigitsEvaluator, cache_dir: Path) -> None:
    """A checkpoint of a module holding a prepared evaluator loads strictly into one holding an unprepared one."""
    assert digits_eval.state_dict() == {} and list(digits_eval.parameters()) == []
    prepared = torch.nn.ModuleDict({"net": torch.nn.Linear(2, 2), "evaluator": digits_eval})
    fresh = torch.nn.ModuleDict({"net": torch.nn.Linear(2, 2), "evaluator": DigitsEvaluator(cache_dir=cache_dir)})
    fresh.load_state_dict(prepared.state_dict())


# ------------------------------------------------------------------------------------------------- GMM evaluator


@pytest.fixture(scope="module")
def gmm() -> GMMSource:
    return GMMSource()


@pytest.fixture(scope="module")
def gmm_eval(gmm: GMMSource) -> GMMEvaluator:
    evaluator = GMMEvaluator(gmm)
    evaluator.prepare(torch.device("cpu"))
    return evaluator


@pytest.fixture(scope="module")
def entropy_per_dim(gmm: GMMSource) -> float:
    cov = gmm.covariance
    return 0.5 * torch.logdet(2 * math.pi * math.e * cov).item() / cov.shape[0]


def _gmm_scores(evaluator: GMMEvaluator, latents: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    evaluator.reset()
    for x, y in zip(latents.split(128), labels.split(128), strict=True):
        evaluator.update(x, y)
    return evaluator.compute()


def _exact(gmm: GMMSource, labels: torch.Tensor, seed: int = 7) -> torch.Tensor:
    return gmm.sample(labels, generator=torch.Generator().manual_seed(seed))


def test_gmm_reference(gmm_eval: GMMEvaluator, entropy_per_dim: float) -> None:
    ref = gmm_eval.reference()
    assert set(ref) == {"nll_floor", "cond_acc_floor", "swd_floor"}
    assert ref["nll_floor"] == pytest.approx(entropy_per_dim, abs=0.02)
    assert ref["cond_acc_floor"] >= 0.95
    assert 0.0 < ref["swd_floor"] < 0.5


def test_gmm_exact_samples_score_like_the_floor(gmm_eval: GMMEvaluator, gmm: GMMSource, entropy_per_dim: float) -> None:
    _, labels = gmm.split("test")
    scores = _gmm_scores(gmm_eval, _exact(gmm, labels), labels)
    ref = gmm_eval.reference()
    assert scores["nll"] == pytest.approx(entropy_per_dim, abs=0.02)
    assert scores["cond_acc"] >= 0.95
    assert scores["swd"] < 1.5 * ref["swd_floor"]
    more = torch.arange(1000) % gmm.num_classes  # unequal counts against the test split
    assert _gmm_scores(gmm_eval, _exact(gmm, more), more)["swd"] < 1.5 * ref["swd_floor"]


def test_gmm_wrong_class_and_shifted_samples_score_worse(
    gmm_eval: GMMEvaluator, gmm: GMMSource, entropy_per_dim: float
) -> None:
    _, labels = gmm.split("test")
    floor = gmm_eval.reference()["swd_floor"]
    wrong = _gmm_scores(gmm_eval, _exact(gmm, (labels + 1) % gmm.num_classes), labels)
    assert wrong["nll"] > entropy_per_dim + 1.0
    assert wrong["cond_acc"] < 0.1
    assert wrong["swd"] > 5 * floor
    shifted = _gmm_scores(gmm_eval, _exact(gmm, labels) + 0.3, labels)
    assert shifted["nll"] > entropy_per_dim + 0.03
    assert shifted["swd"] > 2 * floor


def test_gmm_reference_is_deterministic(gmm: GMMSource, gmm_eval: GMMEvaluator) -> None:
    other = GMMEvaluator(gmm)
    other.prepare("cpu")
    assert other.reference() == gmm_eval.reference()


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric SampleStore was called before")
def test_gmm_input_errors(gmm_eval: GMMEvaluator, gmm: GMMSource) -> None:
    gmm_eval.reset()
    with pytest.raises(ValueError, match=r"latents \[B, 4, 4, 4\]"):
        gmm_eval.update(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels \[B\]"):
        gmm_eval.update(torch.zeros(2, 4, 4, 4), torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(RuntimeError, match="no generated samples"):
        gmm_eval.compute()
    with pytest.raises(RuntimeError, match="prepare"):
        GMMEvaluator(gmm).update(torch.zeros(2, 4, 4, 4), torch.zeros(2, dtype=torch.long))


def test_sliced_wasserstein_of_a_translation() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=gen, dtype=torch.float64)
    shift = torch.randn(6, generator=gen, dtype=torch.float64)
    proj = torch.nn.functional.normalize(torch.randn(16, 6, generator=gen, dtype=torch.float64), dim=1)
    assert sliced_wasserstein(x, x, proj).item() == 0.0
    expected = (proj @ shift).square().mean().sqrt()
    assert sliced_wasserstein(x, x + shift, proj).item() == pytest.approx(expected.item(), rel=1e-9)
    assert sliced_wasserstein(x[:150], x[150:] + shift, proj).item() > 0.5 * expected.item()
