"""The ImageNet path end to end on tiny local stand-ins (no download): ``cache`` an ImageFolder with a diffusers VAE,
``fit`` the MAR-B config from the cache, ``test`` it with the Inception FID/IS/PR evaluator against an ADM reference
``.npz``, ``predict`` an ADM samples ``.npz`` (README "ImageNet scale" step 5) and score it with ``evaluate``.

Stand-ins: a random 3-level AutoencoderKL (32x32 images -> 4x8x8 latents), 3 classes x 4 random 32x32 PNGs, and a
randomly initialised torch-fidelity InceptionV3 whose batch-norm statistics are calibrated on random images (so that
its features have unit-order scale instead of vanishing through 90 layers).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.inception import random_inception_weights
from PIL import Image

from lightning_ar.cli import main
from lightning_ar.data.shards import validate_cache

REPO = Path(__file__).resolve().parents[2]
MAR_BASE, DEBUG = str(REPO / "configs/imagenet256/mar_base.yaml"), str(REPO / "configs/debug.yaml")
SIZE, CLASSES, PER_CLASS, PREDICT_PER_CLASS = 32, ("ant", "bee", "cat"), 4, 2
METRICS = ("fid", "is", "is_std", "precision", "recall")
FLOORS = ("fid_floor", "is_floor", "precision_floor", "recall_floor")

pytestmark = pytest.mark.slow  # ~35 s for the module on one CPU thread (Inception at 299x299, ~80 images)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``vae/``, ``images/<class>/*.png``, ``ref.npz`` (ADM reference of those images) and ``inception.pth``."""
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("imagenet_path")
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=4,
                  layers_per_block=1, sample_size=SIZE).save_pretrained(root / "vae")
    rng, reference = np.random.default_rng(0), []
    for name in CLASSES:
        (root / "images" / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            reference.append(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
            Image.fromarray(reference[-1]).save(root / "images" / name / f"{i}.png")
    np.savez(root / "ref.npz", arr_0=np.stack(reference))  # (12, 32, 32, 3) uint8: ADM reference batch
    random_inception_weights(root / "inception.pth", SIZE)
    return root


@pytest.fixture(scope="module")
def cache(assets: Path) -> Path:
    """``lightning-ar cache`` of the ImageFolder, in-process on one CPU device."""
    out = assets / "cache"
    main(["cache", "--config", str(REPO / "configs/imagenet256/cache.yaml"), "--image_root", str(assets / "images"),
          "--out_dir", str(out), "--vae", str(assets / "vae"), "--image_size", str(SIZE), "--batch_size", "4",
          "--num_workers", "0", "--shard_size", "5", "--devices", "1", "--strategy", "auto", "--accelerator", "cpu",
          "--precision", "32-true"])
    return out


def _stage(stage: str, cache: Path, run_dir: Path, callbacks: str | None, *extra: str, logger: str = "false") -> None:
    """Run ``lightning-ar <stage>`` on the MAR-B ImageNet config shrunk to a tiny CPU model on the cache.

    ``callbacks``: YAML of the callback list replacing the config's (``None``: keep MAR-B's); ``logger``: YAML of
    ``trainer.logger``.
    """
    overlay = run_dir / f"{stage}.yaml"
    overlay.write_text(
        "trainer:\n  accelerator: cpu\n  devices: 1\n  strategy: auto\n  precision: 32-true\n"
        "  enable_progress_bar: false\n  max_steps: 2\n  limit_train_batches: 2\n  limit_val_batches: 0.0\n"
        "  limit_test_batches: 1.0\n  limit_predict_batches: 1.0\n"
        f"  default_root_dir: {run_dir}\n  logger: {logger}\n"
        + ("" if callbacks is None else f"  callbacks:{callbacks}\n")
        + "model:\n  init_args:\n    patch_size: 2\n    buffer_size: 4\n"
        "data:\n  batch_size: 3\n  num_workers: 0\n  val_fraction: 0.5\n"
    )
    main([stage, "--config", MAR_BASE, "--config", DEBUG, "--config", str(overlay), "--data.cache_dir", str(cache),
          *extra])


@pytest.fixture(scope="module")
def checkpoint(assets: Path, cache: Path) -> Path:
    """``fit`` for 2 steps from the cache (EMA on, as in the MAR-B config); returns ``last.ckpt``."""
    run = assets / "fit"
    run.mkdir()
    callbacks = ("\n    - class_path: lightning.pytorch.callbacks.EMAWeightAveraging\n      init_args: {decay: 0.9}"
                 "\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
                 f"      init_args: {{dirpath: {run / 'ckpt'}, save_last: true, save_top_k: 0}}")
    _stage("fit", cache, run, callbacks)
    return run / "ckpt" / "last.ckpt"


def _finite(row: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        assert key in row and math.isfinite(row[key]), (key, row.get(key))


def test_cache_and_fit_link_the_cache_into_the_model(assets: Path, cache: Path, checkpoint: Path) -> None:
    meta = validate_cache(cache, check_values=True)
    assert (meta.num_items, meta.latent_shape, meta.class_names) == (12, (4, 8, 8), list(CLASSES))
    assert [s.count for s in meta.shards] == [5, 5, 2] and meta.image_size == SIZE
    state = torch.load(checkpoint, weights_only=False)
    assert state["global_step"] == 2
    hparams = state["hyper_parameters"]
    assert (tuple(hparams["latent_shape"]), hparams["num_classes"]) == ((4, 8, 8), 3)
    assert hparams["latent_scale"] == meta.latent_scale and hparams["patch_size"] == 2
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def test_test_scores_decoded_samples_with_inception(assets: Path, cache: Path, checkpoint: Path) -> None:
    run = assets / "test"
    run.mkdir()
    callbacks = ("\n    - class_path: lightning_ar.callbacks.GenerationMetrics\n"
                 f"      init_args: {{results_dir: {run / 'results'}}}")
    _stage("test", cache, run, callbacks, "--ckpt_path", str(checkpoint),
           "--data.reference", str(assets / "ref.npz"), "--data.inception_weights", str(assets / "inception.pth"))
    results = json.loads((run / "results" / "results.json").read_text())
    row = results["default"]
    _finite(row, METRICS + FLOORS)
    assert row["num_samples"] == 6  # the held-out half of 12 items, one sample per label
    assert 0 <= row["precision"] <= 1 and 0 <= row["recall"] <= 1 and row["fid"] >= 0 and row["is"] >= 1
    table = (run / "results" / "results.md").read_text()
    assert all(f" {key} " in table for key in METRICS + FLOORS)


def test_predict_writes_adm_npz_that_evaluate_scores(assets: Path, cache: Path, checkpoint: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    run = assets / "predict"
    run.mkdir()
    # README "ImageNet scale" step 5: MAR-B's own callbacks and logger (moved under run/), plus the ADM writer
    _stage("predict", cache, run, None, "--ckpt_path", str(checkpoint), "--data.predict_per_class",
           str(PREDICT_PER_CLASS), "--trainer.callbacks+=lightning_ar.callbacks.AdmNpzWriter",
           logger=f"{{class_path: lightning.pytorch.loggers.TensorBoardLogger, init_args: {{save_dir: {run}}}}}")
    samples = run / "mar_base" / "version_0" / "predictions" / "samples.npz"  # default: <log_dir>/predictions
    n = len(CLASSES) * PREDICT_PER_CLASS
    with np.load(samples) as data:
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (n, SIZE, SIZE, 3)
        assert data["arr_1"].tolist() == data["labels"].tolist() == [i // PREDICT_PER_CLASS for i in range(n)]
        assert len(np.unique(data["arr_0"].reshape(n, -1), axis=0)) == n  # distinct samples, not one repeated
    capsys.readouterr()
    main(["evaluate", str(samples), "--reference", str(assets / "ref.npz"), "--inception-weights",
          str(assets / "inception.pth"), "--batch-size", "8", "--device", "cpu", "--output", str(run / "eval.json")])
    printed, written = json.loads(capsys.readouterr().out), json.loads((run / "eval.json").read_text())
    assert printed == written and written["num_samples"] == n
    _finite(written, METRICS + FLOORS)
    itself = _self_scores(assets)  # the floors depend on the reference only
    assert written["fid_floor"] == pytest.approx(itself["fid_floor"]) and itself["fid"] == pytest.approx(0, abs=1e-3)
    assert itself["precision"] == itself["recall"] == 1.0


def _self_scores(assets: Path) -> dict[str, float]:
    """The reference scored against itself with the same local weights (a sanity check of the feature path)."""
    from lightning_ar.metrics import evaluate_npz

    return evaluate_npz(assets / "ref.npz", assets / "ref.npz", assets / "inception.pth", batch_size=12, device="cpu")
