"""Latent cache: ImageFolder -> shards (DDP, killed, resumed) -> validation -> LatentDataModule -> a few fit steps."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_ar.cli import main
from lightning_ar.data.cache import ImageItems, cache_images, cache_parser, center_crop_arr, load_image
from lightning_ar.data.cache_source import item_generator
from lightning_ar.data.datamodule import LatentDataModule
from lightning_ar.data.shards import CacheMeta, ShardReader, validate_cache, write_shard
from lightning_ar.data.vae import encode_moments, load_vae, sample_posterior

REPO = Path(__file__).resolve().parents[1]
DIGITS, DEBUG = str(REPO / "configs/digits/mar.yaml"), str(REPO / "configs/debug.yaml")
SIZE, SHARD, N = 16, 2, 9  # 16x16 crops -> 4x8x8 latents; 9 images in shards of 2 -> 5 shards
SIZES = [(20, 17), (70, 40), (16, 16), (33, 50)]  # (70, 40) takes the BOX-halving branch of the crop


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    """A tiny random diffusers AutoencoderKL (saved) and an ImageFolder of 9 PNGs of mixed sizes in 3 classes."""
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                  layers_per_block=1, sample_size=SIZE).save_pretrained(root / "vae")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["ant", "bee", "cat"]):
        (root / "images" / name).mkdir(parents=True)
        for i in range(3):
            w, h = SIZES[(c + i) % len(SIZES)]
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / name / f"{i}.png")
    return root


def _options(assets: Path, out: Path) -> dict:
    return dict(image_root=str(assets / "images"), out_dir=str(out), vae=str(assets / "vae"), image_size=SIZE,
                batch_size=2, num_workers=0, shard_size=SHARD, accelerator="cpu", seed=0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """One torch thread in this module, as in its subprocess runs (OMP_NUM_THREADS=1): CPU convolutions, and so the
    cached moments compared byte for byte, change in the last bits with the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache_dir(assets: Path) -> Path:
    """A cache written by one in-process run (no DDP)."""
    out = assets / "cache_single"
    cache_images(**_options(assets, out), devices=1, strategy="auto")
    return out


def test_shipped_cache_config_parses() -> None:
    cfg = cache_parser().parse_args(["--config", str(REPO / "configs/imagenet256/cache.yaml"), "--out_dir", "/x"])
    assert cfg.image_size == 256 and cfg.strategy == "ddp" and cfg.devices == "auto" and cfg.out_dir == "/x"


def test_center_crop_shape_and_content() -> None:
    img = Image.new("RGB", (70, 40), (10, 200, 30))
    arr = center_crop_arr(img, SIZE)
    assert arr.shape == (SIZE, SIZE, 3) and arr.dtype == np.uint8
    assert np.abs(arr.astype(int) - [10, 200, 30]).max() <= 1
    ramp = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8)[None, :, None], (32, 1, 3)))  # 64 wide, 32 high
    crop = center_crop_arr(ramp, SIZE)[0, :, 0].astype(int)  # horizontal centre of the ramp survives
    assert crop[0] > 10 and crop[-1] < 54 and np.all(np.diff(crop) >= 0)


def test_cache_layout_labels_flips_and_scale(assets: Path, cache_dir: Path) -> None:
    meta = validate_cache(cache_dir, check_values=True)
    assert (meta.num_items, len(meta.shards), meta.latent_shape) == (N, math.ceil(N / SHARD), (4, 8, 8))
    assert meta.class_names == ["ant", "bee", "cat"] and meta.flip_copies and meta.image_size == SIZE
    reader = ShardReader(cache_dir)
    assert reader.labels().tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    vae = load_vae(str(assets / "vae"))
    items = ImageItems(str(assets / "images"), SIZE)
    images = torch.stack([items[i][0] for i in (0, 4, 8)])
    stored = torch.from_numpy(np.stack([reader[i][0] for i in (0, 4, 8)]))  # (3, 2, 8, 8, 8)
    assert torch.allclose(stored[:, 0], encode_moments(vae, images), atol=1e-5)
    assert torch.allclose(stored[:, 1], encode_moments(vae, images.flip(-1)), atol=1e-5)
    assert not torch.allclose(stored[:, 0], stored[:, 1], atol=1e-3)
    rng, samples = np.random.default_rng(0), []
    for info in meta.shards:  # the documented recipe: one numpy generator, shards in order, both flip copies
        moments = np.load(cache_dir / info.file).astype(np.float64).reshape(-1, 8, 8, 8)  # (2N, 2C, h, w)
        mean, logvar = moments[:, :4], moments[:, 4:]
        samples.append(mean + np.exp(0.5 * logvar) * rng.standard_normal(mean.shape))
    assert meta.latent_scale == pytest.approx(1.0 / np.concatenate(samples).std(ddof=1), rel=1e-9)


def test_resume_skips_complete_shards_and_redoes_broken_ones(assets: Path, cache_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    shutil.copytree(cache_dir, out)
    (out / "meta.json").unlink()
    (out / "shard_00001.npy").unlink()
    (out / "shard_00003.npy").write_bytes((cache_dir / "shard_00003.npy").read_bytes()[:200])
    kept = (out / "shard_00000.npy").stat().st_mtime_ns
    cache_images(**_options(assets, out), devices=1, strategy="auto")
    assert (out / "shard_00000.npy").stat().st_mtime_ns == kept
    for f in sorted(cache_dir.iterdir()):
        assert (out / f.name).read_bytes() == f.read_bytes(), f.name


@pytest.mark.slow
def test_ddp_cache_killed_then_resumed_equals_single_run(assets: Path, cache_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache_ddp"
    opts = _options(assets, out)
    argv = [sys.executable, "-m", "lightning_ar.cli", "cache", *[f"--{k}={v}" for k, v in opts.items()],
            "--devices=2", "--strategy=ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "LIGHTNING_AR_CACHE_TEST_KILL_AFTER": "1"}
    killed = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
                            start_new_session=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "meta.json").exists()
    assert 1 <= len(list(out.glob("shard_*.labels.npy"))) < math.ceil(N / SHARD)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        validate_cache(out)
    del env["LIGHTNING_AR_CACHE_TEST_KILL_AFTER"]
    done = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
                          start_new_session=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"cached {N} images to {out} (" in done.stdout and "latent scale" in done.stdout
    validate_cache(out, check_values=True)
    names = sorted(p.name for p in out.iterdir())  # no temporaries of the killed run are left
    assert names == sorted(p.name for p in cache_dir.iterdir())
    for name in names:  # identical bytes, meta.json (and so the latent scale) included
        assert (out / name).read_bytes() == (cache_dir / name).read_bytes(), name


def _broken(cache_dir: Path, tmp_path: Path, how: str) -> Path:
    out = tmp_path / how
    shutil.copytree(cache_dir, out)
    meta = json.loads((out / "meta.json").read_text())
    if how == "truncated":
        (out / "shard_00002.npy").write_bytes((cache_dir / "shard_00002.npy").read_bytes()[:-100])
    elif how == "missing":
        (out / "shard_00004.labels.npy").unlink()
    elif how == "count":
        meta["num_items"] = N + 1
    elif how == "shard_count":
        meta["shards"][1]["count"], meta["num_items"] = 1, N - 1
    elif how == "dtype":
        meta["dtype"] = "float16"
    elif how == "no_meta":
        (out / "meta.json").unlink()
    elif how == "nan":
        moments = np.load(cache_dir / "shard_00001.npy")
        moments[0, 1, 0, 0, 0] = np.nan
        np.save(out / "shard_00001.npy", moments)
    if how in ("count", "shard_count", "dtype"):
        (out / "meta.json").write_text(json.dumps(meta))
    return out


@pytest.mark.parametrize(
    ("how", "error", "match"),
    [("truncated", ValueError, r"shard_00002\.npy: unreadable or truncated"),
     ("missing", FileNotFoundError, r"shard_00004\.labels\.npy: shard file missing"),
     ("count", ValueError, r"meta\.json: num_items is 10 but the shards hold 9"),
     ("shard_count", ValueError, r"shard_00001\.npy: moments of shape \(2, "),
     ("dtype", ValueError, r"shard_00000\.npy: dtype float32, meta\.json expects float16"),
     ("no_meta", FileNotFoundError, r"no meta\.json"),
     ("nan", ValueError, r"shard_00001\.npy: 1 NaN/Inf")],
)
def test_validation_names_the_problem(cache_dir: Path, tmp_path: Path, how: str, error: type, match: str) -> None:
    out = _broken(cache_dir, tmp_path, how)
    with pytest.raises(error, match=match):
        validate_cache(out, check_values=True)
    if how == "nan":
        validate_cache(out)  # values are only read on request
        with pytest.raises(ValueError, match="NaN"):
            LatentDataModule(cache_dir=str(out), check_values=True)


def test_writer_refuses_non_finite_values(tmp_path: Path) -> None:
    moments = np.zeros((2, 2, 8, 4, 4), np.float32)
    moments[1, 0, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="shard_00000.npy: 1 NaN/Inf"):
        write_shard(tmp_path, 0, moments, np.zeros(2, np.int64), "float32")
    big = np.full((1, 2, 8, 4, 4), 1e6, np.float32)  # finite in float32, Inf once stored as float16
    with pytest.raises(ValueError, match="NaN/Inf"):
        write_shard(tmp_path, 1, big, np.zeros(1, np.int64), "float16")
    assert not list(tmp_path.iterdir())


def test_bad_images_and_folders_are_named(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "a" / "ok.png")
    with pytest.raises(FileNotFoundError, match="image_root.*b"):
        ImageItems(str(tmp_path), SIZE)  # empty class folder b
    (tmp_path / "b" / "bad.png").write_bytes(b"not a png")
    items = ImageItems(str(tmp_path), SIZE)
    with pytest.raises(ValueError, match=r"bad\.png: unreadable image"):
        items[1]
    assert load_image(str(tmp_path / "a" / "ok.png"), SIZE).shape == (3, SIZE, SIZE)


def test_datamodule_reads_cache_reproducibly(assets: Path, cache_dir: Path) -> None:
    dm = LatentDataModule(cache_dir=str(cache_dir), batch_size=4, val_fraction=0.34, num_workers=1, seed=3)
    meta = CacheMeta.read(cache_dir)
    assert (dm.latent_shape, dm.num_classes, dm.latent_scale) == ((4, 8, 8), 3, meta.latent_scale)
    assert LatentDataModule(cache_dir=str(cache_dir), latent_scale=0.5).latent_scale == 0.5
    ds = dm._dataset("train")
    assert len(ds) == 6 and len(dm._dataset("val")) == 3
    assert set(ds.indices.tolist()).isdisjoint(dm._dataset("val").indices.tolist())
    x, y = ds[(2, 1)]
    item = int(ds.indices[1])
    gen = item_generator(3, 2, item)
    flip = int(torch.randint(2, (1,), generator=gen))
    moments = torch.from_numpy(ShardReader(cache_dir)[item][0])
    expected = sample_posterior(moments[flip : flip + 1], gen)[0] * meta.latent_scale
    assert torch.equal(x, expected) and int(y) == ShardReader(cache_dir)[item][1]
    assert torch.equal(ds[(2, 1)][0], x) and not torch.equal(ds[(3, 1)][0], x)
    loader = dm.train_dataloader()  # one worker process: the reader re-opens its memory maps there
    loader.sampler.set_epoch(2)
    batches = [b for b in loader]
    again = [b for b in loader]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    assert sum(len(b[1]) for b in batches) == 6 and batches[0][0].shape[1:] == (4, 8, 8)
    images = dm.decode(batches[0][0] / dm.latent_scale)
    assert images.shape == (4, 3, SIZE, SIZE) and images.abs().max() <= 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"source": "digits"}, "data.source and data.cache_dir exclude each other"),
     ({"val_fraction": 0.9}, "data.val_fraction"),
     ({"cache_dir": "/no/such/cache"}, "data.cache_dir '/no/such/cache'")],
)
def test_datamodule_rejects_bad_cache_options(cache_dir: Path, kwargs: dict, match: str) -> None:
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        LatentDataModule(**{"cache_dir": str(cache_dir), **kwargs})


def test_cache_only_options_need_a_cache() -> None:
    with pytest.raises(ValueError, match="data.vae applies only with data.cache_dir"):
        LatentDataModule("gmm", vae="some/vae")


def test_fit_a_few_steps_from_the_cache(cache_dir: Path, tmp_path: Path) -> None:
    main([
        "fit", "--config", DIGITS, "--config", DEBUG, "--data.source", "null", "--data.cache_dir", str(cache_dir),
        "--data.val_fraction", "0.34", "--data.batch_size", "4", "--trainer.limit_val_batches", "1",
        "--trainer.max_epochs", "2",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false", "--trainer.callbacks",
        "lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.dirpath", str(tmp_path / "ckpt"),
        "--trainer.callbacks.save_last", "true", "--trainer.enable_progress_bar", "false",
    ])
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 3
    hparams = ckpt["hyper_parameters"]
    assert tuple(hparams["latent_shape"]) == (4, 8, 8) and hparams["num_classes"] == 3
    assert hparams["latent_scale"] == CacheMeta.read(cache_dir).latent_scale
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
