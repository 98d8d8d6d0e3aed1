"""Image-quality evaluation at scale: improved precision/recall, the FID/IS/PR evaluator on a tiny feature network
(never Inception: no download), and the ADM ``.npz`` gather of ``predict`` (1 process and 2-process DDP)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lightning_ar.callbacks.adm_npz import check_indices, gather_adm_npz
from lightning_ar.metrics import ImageQualityEvaluator, ImprovedPrecisionRecall, evaluate_npz, precision_recall
from lightning_ar.metrics.image_quality import InceptionFeatures
from lightning_ar.metrics.precision_recall import knn_radii

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


class TinyExtractor(nn.Module):
    """A fixed random CNN: ``uint8`` ``[B, 3, H, W]`` -> ``(features [B, 8], logits [B, 5])``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, stride=2), nn.Linear(8, 5)
        generator = torch.Generator().manual_seed(0)
        for p in self.parameters():
            nn.init.normal_(p, std=0.3, generator=generator)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.conv(images.float() / 127.5 - 1).relu().mean(dim=(2, 3))  # (B, 8)
        return features, self.fc(features)


def _random_images(n: int, seed: int, low: int = 0, high: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, (n, 16, 16, 3), dtype=np.uint8)


def _as_latents(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1] (what a decode returns); quantising it back is exact."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


@pytest.fixture
def reference_npz(tmp_path: Path) -> Path:
    path = tmp_path / "ref.npz"
    np.savez(path, arr_0=_random_images(47, seed=0))
    return path


def _evaluator(reference: Path, **kwargs) -> ImageQualityEvaluator:
    evaluator = ImageQualityEvaluator(None, 10, reference, feature_extractor=TinyExtractor(), batch_size=8, **kwargs)
    evaluator.prepare("cpu")
    return evaluator


# --------------------------------------------------------------------------------------------- precision / recall
def test_identical_sets_have_full_precision_and_recall() -> None:
    x = torch.randn(30, 4, generator=torch.Generator().manual_seed(0))
    assert precision_recall(x, x.clone(), k=3) == (1.0, 1.0)


def test_far_apart_sets_have_zero_precision_and_recall() -> None:
    x = torch.randn(30, 4, generator=torch.Generator().manual_seed(0))
    assert precision_recall(x, x + 100.0, k=3) == (0.0, 0.0)


def test_hand_computed_example() -> None:
    real = torch.tensor([[0.0], [1.0], [3.0], [7.0], [30.0], [31.0]])
    fake = torch.tensor([[2.5], [12.0], [-0.5], [5.5]])
    # k=1 radii: real -> [1, 1, 2, 4, 1, 1]; fake -> [3, 6.5, 3, 3]
    assert torch.allclose(knn_radii(real, k=1), torch.tensor([1.0, 1.0, 2.0, 4.0, 1.0, 1.0]))
    assert torch.allclose(knn_radii(fake, k=1), torch.tensor([3.0, 6.5, 3.0, 3.0]))
    precision, recall = precision_recall(real, fake, k=1)
    assert precision == pytest.approx(3 / 4)  # 12 is outside every real ball
    assert recall == pytest.approx(4 / 6)  # 30 and 31 are outside every generated ball


def test_chunked_distances_match_one_block() -> None:
    generator = torch.Generator().manual_seed(1)
    real, fake = torch.randn(50, 6, generator=generator), torch.randn(40, 6, generator=generator) * 1.3
    assert precision_recall(real, fake, chunk_size=7) == precision_recall(real, fake, chunk_size=4096)
    assert torch.allclose(knn_radii(real, chunk_size=3), knn_radii(real))


def test_metric_keeps_real_features_on_reset() -> None:
    generator = torch.Generator().manual_seed(2)
    real, fake = torch.randn(20, 3, generator=generator), torch.randn(20, 3, generator=generator) + 0.5
    metric = ImprovedPrecisionRecall(k=3, reset_real_features=False)
    metric.update(real, real=True)
    metric.update(real, real=False)
    assert float(metric.compute()["precision"]) == 1.0
    metric.reset()
    metric.update(fake[:10], real=False)
    metric.update(fake[10:], real=False)
    expected = precision_recall(real, fake)
    assert (float(metric.compute()["precision"]), float(metric.compute()["recall"])) == expected


def test_precision_recall_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="differ in dimension"):
        precision_recall(torch.zeros(5, 2), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="at least 4 rows"):
        precision_recall(torch.randn(3, 2), torch.randn(5, 2))


# ------------------------------------------------------------------------------------------------------ evaluator
def test_reference_images_score_perfectly_and_others_do_not(reference_npz: Path) -> None:
    evaluator = _evaluator(reference_npz)
    reference = np.load(reference_npz)["arr_0"]
    evaluator.update(_as_latents(reference), torch.zeros(len(reference), dtype=torch.long))
    same = evaluator.compute()
    assert same["fid"] < 1e-3 and same["precision"] == 1.0 and same["recall"] == 1.0
    assert set(same) == {"fid", "is", "is_std", "precision", "recall"}
    evaluator.reset()  # keeps the reference statistics
    dark = _random_images(40, seed=5, high=60)
    evaluator.update(_as_latents(dark), torch.zeros(len(dark), dtype=torch.long))
    other = evaluator.compute()
    assert other["fid"] > 100 * max(same["fid"], 1e-4) and other["precision"] == 0.0
    floors = evaluator.reference()
    assert set(floors) == {"fid_floor", "precision_floor", "recall_floor", "is_floor"}
    assert 0 < floors["precision_floor"] <= 1 and floors["fid_floor"] < other["fid"]
    assert not evaluator.state_dict()  # prepared parts stay out of checkpoints


def test_grayscale_decode_is_repeated_to_rgb(reference_npz: Path) -> None:
    evaluator = ImageQualityEvaluator(lambda z: z[:, :1], 10, reference_npz, feature_extractor=TinyExtractor())
    evaluator.prepare("cpu")
    gray = _as_latents(_random_images(8, seed=3))
    evaluator.update(gray, torch.arange(8))
    rgb = ImageQualityEvaluator(None, 10, reference_npz, feature_extractor=TinyExtractor())
    rgb.prepare("cpu")
    rgb.update(gray[:, :1].expand(-1, 3, -1, -1), torch.arange(8))
    assert evaluator.compute()["fid"] == pytest.approx(rgb.compute()["fid"])


def test_image_folder_reference_equals_npz(reference_npz: Path, tmp_path: Path) -> None:
    folder = tmp_path / "folder" / "class_a"
    folder.mkdir(parents=True)
    for i, image in enumerate(np.load(reference_npz)["arr_0"]):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    assert _evaluator(tmp_path / "folder").reference() == pytest.approx(_evaluator(reference_npz).reference())


def test_evaluate_npz_matches_in_memory_scoring(reference_npz: Path, tmp_path: Path) -> None:
    samples = _random_images(20, seed=7)
    np.savez_compressed(tmp_path / "samples.npz", arr_0=samples, arr_1=np.zeros(20, dtype=np.int64))  # streamed
    evaluator = _evaluator(reference_npz)
    evaluator.update(_as_latents(samples), torch.zeros(20, dtype=torch.long))
    results = evaluate_npz(tmp_path / "samples.npz", reference_npz, feature_extractor=TinyExtractor(), batch_size=8)
    assert results.pop("fid_reference") == f"features of the 47 images of {reference_npz}"
    assert results == pytest.approx({**evaluator.compute(), **evaluator.reference(), "num_samples": 20.0})


# ------------------------------------------------------------------------------ FID by the published protocol
def _numpy_fid(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The Frechet distance as ADM's evaluator computes it (scipy's sqrtm), independent of the package."""
    from scipy import linalg

    covmean = linalg.sqrtm(sigma1 @ sigma2)
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean).real)


def _features(images: np.ndarray) -> np.ndarray:
    """TinyExtractor features of uint8 NHWC images, float64 ``[N, 8]``."""
    with torch.no_grad():
        return TinyExtractor()(torch.from_numpy(images).permute(0, 3, 1, 2))[0].double().numpy()


def _stats(seed: int, dim: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """A mean and a full-rank covariance unlike the reference images' own."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(dim, dim)) * 0.2
    return rng.normal(size=dim) * 0.3, a @ a.T + 0.05 * np.eye(dim)


def test_frechet_distance_matches_scipy() -> None:
    from lightning_ar.metrics import frechet_distance

    (mu1, s1), (mu2, s2) = _stats(1, dim=16), _stats(2, dim=16)
    got = float(frechet_distance(*(torch.from_numpy(x) for x in (mu1, s1, mu2, s2))))
    assert got == pytest.approx(_numpy_fid(mu1, s1, mu2, s2), rel=1e-9)
    assert float(frechet_distance(*(torch.from_numpy(x) for x in (mu1, s1, mu1, s1)))) == pytest.approx(0, abs=1e-9)


@pytest.fixture
def adm_reference(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray]:
    """An ADM-style reference batch: ``arr_0`` images plus stored ``mu``/``sigma`` unlike the images' own."""
    images, (mu, sigma) = _random_images(47, seed=0), _stats(3)
    np.savez(tmp_path / "adm_ref.npz", arr_0=images, mu=mu, sigma=sigma)
    return tmp_path / "adm_ref.npz", images, mu, sigma


def test_fid_uses_the_stored_statistics_of_an_adm_reference(adm_reference, tmp_path: Path) -> None:
    path, images, mu, sigma = adm_reference
    generated = _random_images(30, seed=11, low=20)
    evaluator = _evaluator(path)
    evaluator.update(_as_latents(generated), torch.zeros(30, dtype=torch.long))
    got = evaluator.compute()
    feats = _features(generated)
    assert got["fid"] == pytest.approx(_numpy_fid(mu, sigma, feats.mean(0), np.cov(feats, rowvar=False)), rel=1e-7)
    assert evaluator.fid_reference == f"mu/sigma of {path}"
    # precision/recall, IS and the floors still come from arr_0: as with an arr_0-only copy of the reference
    np.savez(tmp_path / "images_only.npz", arr_0=images)
    images_only = _evaluator(tmp_path / "images_only.npz")
    images_only.update(_as_latents(generated), torch.zeros(30, dtype=torch.long))
    plain = images_only.compute()
    assert {k: got[k] for k in ("precision", "recall", "is", "is_std")} == pytest.approx(
        {k: plain[k] for k in ("precision", "recall", "is", "is_std")})
    assert evaluator.reference() == pytest.approx(images_only.reference())
    own = _features(images)
    assert plain["fid"] == pytest.approx(_numpy_fid(own.mean(0), np.cov(own, rowvar=False), feats.mean(0),
                                                    np.cov(feats, rowvar=False)), rel=1e-5)
    assert images_only.fid_reference == f"features of the 47 images of {tmp_path / 'images_only.npz'}"
    assert abs(got["fid"] - plain["fid"]) > 0.1 * plain["fid"]  # the stored statistics were used, not arr_0


def test_same_images_with_other_statistics_give_another_fid(adm_reference, tmp_path: Path) -> None:
    path, images, _, _ = adm_reference
    other_mu, other_sigma = _stats(4)
    np.savez(tmp_path / "other.npz", arr_0=images, mu=other_mu, sigma=other_sigma)
    generated = _as_latents(_random_images(30, seed=11, low=20))
    fids = []
    for reference in (path, tmp_path / "other.npz"):
        evaluator = _evaluator(reference)
        evaluator.update(generated, torch.zeros(30, dtype=torch.long))
        fids.append(evaluator.compute()["fid"])
    feats = _features(_random_images(30, seed=11, low=20))
    expected = _numpy_fid(other_mu, other_sigma, feats.mean(0), np.cov(feats, rowvar=False))
    assert fids[1] == pytest.approx(expected, rel=1e-7) and abs(fids[0] - fids[1]) > 0.05 * fids[1]


def test_stats_only_npz_and_reference_stats_override(adm_reference, tmp_path: Path) -> None:
    path, images, mu, sigma = adm_reference
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)  # e.g. MAR's fid_stats/adm_in256_stats.npz
    np.savez(tmp_path / "images_only.npz", arr_0=images)
    generated = _random_images(30, seed=11, low=20)
    np.savez(tmp_path / "samples.npz", arr_0=generated)
    full = evaluate_npz(tmp_path / "samples.npz", path, feature_extractor=TinyExtractor(), batch_size=8)
    stats_only = evaluate_npz(tmp_path / "samples.npz", reference_stats=tmp_path / "stats.npz",
                              feature_extractor=TinyExtractor(), batch_size=8)
    assert set(stats_only) == {"fid", "is", "is_std", "num_samples", "fid_reference"}  # no images: no PR, floors
    assert stats_only["fid"] == pytest.approx(full["fid"], rel=1e-9)
    assert stats_only["fid_reference"] == f"mu/sigma of {tmp_path / 'stats.npz'}"
    combined = evaluate_npz(tmp_path / "samples.npz", tmp_path / "images_only.npz", feature_extractor=TinyExtractor(),
                            batch_size=8, reference_stats=tmp_path / "stats.npz")
    assert {k: v for k, v in combined.items() if k != "fid_reference"} == pytest.approx(
        {k: v for k, v in full.items() if k != "fid_reference"})
    # a stats-only file given as --reference works too
    assert evaluate_npz(tmp_path / "samples.npz", tmp_path / "stats.npz", feature_extractor=TinyExtractor(),
                        batch_size=8)["fid"] == pytest.approx(full["fid"], rel=1e-9)


def test_reference_stats_errors_name_the_problem(tmp_path: Path, reference_npz: Path) -> None:
    np.savez(tmp_path / "mu_only.npz", mu=np.zeros(8))
    with pytest.raises(ValueError, match="neither arr_0 images nor mu/sigma"):
        ImageQualityEvaluator(None, 1, tmp_path / "mu_only.npz")
    with pytest.raises(ValueError, match=r"reference_stats .*no sigma"):
        ImageQualityEvaluator(None, 1, reference_npz, feature_extractor=TinyExtractor(),
                              reference_stats=tmp_path / "mu_only.npz").prepare("cpu")
    np.savez(tmp_path / "wide.npz", mu=np.zeros(16), sigma=np.eye(16))
    with pytest.raises(ValueError, match="mu has 16 features but the feature extractor gives 8"):
        ImageQualityEvaluator(None, 1, reference_stats=tmp_path / "wide.npz",
                              feature_extractor=TinyExtractor()).prepare("cpu")
    np.savez(tmp_path / "bad_shape.npz", mu=np.zeros(8), sigma=np.eye(7))
    with pytest.raises(ValueError, match=r"expected mu \[F\] and sigma \[F, F\]"):
        ImageQualityEvaluator(None, 1, reference_stats=tmp_path / "bad_shape.npz",
                              feature_extractor=TinyExtractor()).prepare("cpu")
    with pytest.raises(FileNotFoundError, match="reference_stats"):
        ImageQualityEvaluator(None, 1, reference_stats=tmp_path / "absent.npz")
    with pytest.raises(ValueError, match="reference_stats"):
        ImageQualityEvaluator(None, 1)
    from lightning_ar.metrics.evaluate import evaluate_main

    with pytest.raises(SystemExit):
        evaluate_main([str(reference_npz)])  # neither --reference nor --reference-stats


def test_evaluator_errors_name_the_problem(reference_npz: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="reference"):
        ImageQualityEvaluator(None, 10, tmp_path / "missing.npz")
    with pytest.raises(FileNotFoundError, match="samples"):
        evaluate_npz(tmp_path / "missing.npz", reference_npz, feature_extractor=TinyExtractor())
    with pytest.raises(FileNotFoundError, match="inception_weights"):
        InceptionFeatures(weights_path=tmp_path / "missing.pth")  # checked before any download
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros((4, 3, 16, 16), dtype=np.float32))
    with pytest.raises(ValueError, match="uint8"):
        ImageQualityEvaluator(None, 10, tmp_path / "bad.npz", feature_extractor=TinyExtractor()).prepare("cpu")
    evaluator = ImageQualityEvaluator(None, 10, reference_npz, feature_extractor=TinyExtractor())
    with pytest.raises(RuntimeError, match="prepare"):
        evaluator.compute()
    evaluator.prepare("cpu")
    with pytest.raises(ValueError, match="labels"):
        evaluator.update(torch.zeros(2, 3, 16, 16), torch.tensor([0, 10]))


def test_inception_loads_local_weights_without_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", lambda *a, **k: pytest.fail("download attempted"))
    torch.save({}, tmp_path / "empty.pth")
    with monkeypatch.context() as patch:  # a randomly initialised network stands in for the real weights file
        patch.setattr(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                       feature_extractor_weights_path=str(tmp_path / "empty.pth"))
    torch.save(net.state_dict(), tmp_path / "weights.pth")
    inception = InceptionFeatures(weights_path=tmp_path / "weights.pth").train()
    assert not inception.training
    features, logits = inception(torch.from_numpy(_random_images(2, seed=0)).permute(0, 3, 1, 2))
    assert features.shape == (2, 2048) and logits.shape == (2, 1008)


DDP_EVAL = """
import json, sys
import numpy as np, torch, torch.distributed as dist, torch.multiprocessing as mp
sys.path.insert(0, {tests!r})
from test_image_quality import TinyExtractor
from lightning_ar.metrics import ImageQualityEvaluator

def run(rank):
    dist.init_process_group("gloo", init_method="file://{tmp}/pg", rank=rank, world_size=2)
    ev = ImageQualityEvaluator(None, 1, {ref!r}, feature_extractor=TinyExtractor(), batch_size=8)
    ev.prepare("cpu")
    images = torch.from_numpy(np.load({gen!r})["arr_0"]).permute(0, 3, 1, 2)
    ev.update_images(images[rank::2])
    results = {{**ev.compute(), **ev.reference()}}
    if rank == 0:
        json.dump(results, open("{tmp}/ddp.json", "w"))
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(run, nprocs=2)
"""


@pytest.mark.slow
def test_evaluator_under_ddp_matches_one_process(reference_npz: Path, tmp_path: Path) -> None:
    generated = _random_images(31, seed=9, low=30)
    np.savez(tmp_path / "gen.npz", arr_0=generated)
    script = tmp_path / "ddp_eval.py"
    script.write_text(DDP_EVAL.format(tests=str(REPO / "tests" / "metrics"), tmp=tmp_path, ref=str(reference_npz),
                                      gen=str(tmp_path / "gen.npz")))
    subprocess.run([sys.executable, str(script)], env=ENV, check=True, timeout=180)
    ddp = json.loads((tmp_path / "ddp.json").read_text())
    single = _evaluator(reference_npz, distributed=False)
    single.update(_as_latents(generated), torch.zeros(31, dtype=torch.long))
    expected = {**single.compute(), **single.reference()}
    is_keys = {"is", "is_std"}  # IS splits depend on the gathered order
    assert {k: v for k, v in ddp.items() if k not in is_keys} == pytest.approx(
        {k: v for k, v in expected.items() if k not in is_keys}, rel=1e-4, abs=1e-5)
    assert ddp["is"] == pytest.approx(expected["is"], rel=1e-2)


# ---------------------------------------------------------------------------------------------------- ADM gather
def _write_part(folder: Path, name: str, indices: list[int], channels: int = 1) -> None:
    images = np.stack([np.full((4, 4, channels), i, dtype=np.uint8) for i in indices])
    np.savez(folder / name, images=images, labels=np.array(indices) % 3, indices=np.array(indices),
             latents=np.zeros((len(indices), 1, 4, 4), dtype=np.float32))


def test_gather_orders_by_index_and_repeats_gray_to_rgb(tmp_path: Path) -> None:
    _write_part(tmp_path, "samples_rank1_batch00000.npz", [1, 3, 5])
    _write_part(tmp_path, "samples_rank0_batch00000.npz", [0, 2, 4])
    assert gather_adm_npz(tmp_path, tmp_path / "samples.npz") == 6
    data = np.load(tmp_path / "samples.npz")
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (6, 4, 4, 3)
    assert data["arr_0"][:, 0, 0].tolist() == [[i] * 3 for i in range(6)]
    assert data["labels"].tolist() == data["arr_1"].tolist() == [0, 1, 2, 0, 1, 2]


def test_gather_lists_duplicates_and_gaps(tmp_path: Path) -> None:
    _write_part(tmp_path, "samples_rank0_batch00000.npz", [0, 1, 2])
    _write_part(tmp_path, "samples_rank1_batch00000.npz", [2, 4])
    with pytest.raises(ValueError, match=r"duplicated: 2; missing: 3, 5"):
        gather_adm_npz(tmp_path, tmp_path / "samples.npz", num_samples=6)
    assert not (tmp_path / "samples.npz").exists()
    with pytest.raises(ValueError, match="out of range: 7"):
        check_indices(np.array([0, 7]), 2)


def _predict_args(tmp_path: Path, *extra: str) -> list[str]:
    """A predict run of an untrained tiny digits generator whose only callback is the ADM writer."""
    from helpers.tiny import save_generator_checkpoint

    ckpt = save_generator_checkpoint(tmp_path / "gen.ckpt")
    state = torch.load(ckpt, weights_only=False)
    state["hyper_parameters"]["_class_path"] = "lightning_ar.MARGenerator"  # as LightningCLI's own checkpoints
    torch.save(state, ckpt)
    overlay = tmp_path / "predict.yaml"
    overlay.write_text(
        "trainer:\n  logger: false\n  enable_progress_bar: false\n  limit_predict_batches: 1.0\n  callbacks:\n"
        "    - class_path: lightning_ar.callbacks.AdmNpzWriter\n      init_args:\n"
        f"        output_dir: {tmp_path / 'out'}\n        png_dir: {tmp_path / 'png'}\n"
        "data:\n  batch_size: 4\n"
    )
    return ["predict", "--config", str(REPO / "configs/digits/mar.yaml"), "--config", str(REPO / "configs/debug.yaml"),
            "--config", str(overlay), "--ckpt_path", ckpt, "--trainer.default_root_dir", str(tmp_path), *extra]


def _check_adm_npz(tmp_path: Path, n: int) -> None:
    data = np.load(tmp_path / "out" / "samples.npz")
    assert set(data.files) == {"arr_0", "arr_1", "labels"}
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (n, 8, 8, 3)
    per_class = n // 10
    assert data["labels"].tolist() == [i // per_class for i in range(n)]  # LabelDataset order, by index
    assert len(list((tmp_path / "png").glob("*_label*.png"))) == n


def test_cli_predict_writes_adm_npz(tmp_path: Path) -> None:
    from lightning_ar.cli import main

    main(_predict_args(tmp_path, "--data.predict_per_class", "1"))
    _check_adm_npz(tmp_path, 10)


@pytest.mark.slow
def test_ddp_predict_gathers_every_index_once(tmp_path: Path) -> None:
    args = _predict_args(tmp_path, "--data.predict_per_class", "3", "--trainer.strategy", "ddp",
                         "--trainer.devices", "2", "--trainer.accelerator", "cpu")
    subprocess.run([sys.executable, "-m", "lightning_ar.cli", *args], env=ENV, check=True, timeout=300,
                   cwd=tmp_path, capture_output=True)
    _check_adm_npz(tmp_path, 30)
    ranks = {p.name.split("_")[1] for p in (tmp_path / "out").glob("samples_rank*.npz")}
    assert ranks == {"rank0", "rank1"}  # both processes generated


def test_inception_score_is_torchmetrics_and_finite_when_a_class_underflows() -> None:
    """The float64 IS equals torchmetrics' where torchmetrics is finite, and stays finite (0 log 0 = 0) when a
    class's probability underflows in every image: there torchmetrics returns NaN for valid images."""
    from torchmetrics.image.inception import InceptionScore

    from lightning_ar.metrics.inception import Precomputed, StableInceptionScore, seeded_inception_score

    def both(logits: torch.Tensor) -> tuple[tuple[float, float], tuple[float, float]]:
        scores = []
        for cls in (InceptionScore, StableInceptionScore):
            metric = cls(feature=Precomputed(logits.shape[1]), splits=2)
            metric.update(logits)
            scores.append(seeded_inception_score(metric, 0))
        return scores[0], scores[1]

    mild = torch.randn(40, 12, generator=torch.Generator().manual_seed(0))
    reference, stable = both(mild)
    assert stable == pytest.approx(reference, rel=1e-5)
    confident = mild.clone()
    confident[:, 3] = -1e4  # p(class 3) = 0 in float32 in every image
    reference, stable = both(confident)
    assert np.isnan(reference[0]) and np.isfinite(stable[0]) and stable[0] >= 1.0
    assert stable == pytest.approx(both(mild[:, [i for i in range(12) if i != 3]])[1], rel=1e-5)  # class 3 ignored
