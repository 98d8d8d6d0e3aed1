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

REPO = Path(__file__).resolve().parents[2]
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
    args = ["cache", *[f"--{k}={v}" for k, v in opts.items()], "--devices=2", "--strategy=ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "KILL_AFTER_SHARDS": "1"}
    killer = [sys.executable, str(REPO / "tests" / "helpers" / "kill_after_shards.py")]  # patches ShardWriter
    killed = subprocess.run([*killer, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
                            start_new_session=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "meta.json").exists()
    assert 1 <= len(list(out.glob("shard_*.labels.npy"))) < math.ceil(N / SHARD)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        validate_cache(out)
    del env["KILL_AFTER_SHARDS"]
    done = subprocess.run([sys.executable, "-m", "lightning_ar.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300, start_new_session=True)
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


# ------------------------------------------------------------------------------------- re-runs: manifest, checksums
def _images_copy(assets: Path, tmp_path: Path) -> Path:
    images = tmp_path / "images"
    shutil.copytree(assets / "images", images, copy_function=shutil.copy2)  # copy2 keeps the modification times
    return images


def _run_cache(assets: Path, images: Path, out: Path, **overrides) -> None:
    cache_images(**{**_options(assets, out), "image_root": str(images), **overrides}, devices=1, strategy="auto")


def _same_files(a: Path, b: Path, skip: tuple[str, ...] = ()) -> None:
    names = sorted(p.name for p in a.iterdir() if p.name not in skip)
    assert names == sorted(p.name for p in b.iterdir() if p.name not in skip)
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_added_image_is_refused_and_update_reencodes_only_what_changed(assets: Path, tmp_path: Path) -> None:
    """Before: the re-run reported success with several items holding other images' latents or labels."""
    from lightning_ar.errors import UsageError

    images, out = _images_copy(assets, tmp_path), tmp_path / "cache"
    _run_cache(assets, images, out)
    shutil.copy2(images / "ant" / "0.png", images / "ant" / "0b.png")  # item 1 now: every later item shifts
    with pytest.raises(UsageError, match=r"1 image\(s\) added \(e\.g\. ant/0b\.png\).*--update.*--overwrite"):
        _run_cache(assets, images, out)
    kept = (out / "shard_00000.npy").stat().st_mtime_ns  # items 0-1: ant/0.png, ant/0b.png -> shard 0 changed too
    _run_cache(assets, images, out, update=True)
    fresh = tmp_path / "fresh"
    _run_cache(assets, images, fresh)
    _same_files(out, fresh)  # exactly the cache of the new image list (the manifest included)
    assert validate_cache(out, check_values=True).num_items == N + 1
    assert (out / "shard_00000.npy").stat().st_mtime_ns != kept


def test_removed_image_then_update_keeps_the_shards_before_it(assets: Path, tmp_path: Path) -> None:
    images, out = _images_copy(assets, tmp_path), tmp_path / "cache"
    _run_cache(assets, images, out)
    (images / "cat" / "2.png").unlink()  # the last item: only the last shard changes (and shard 4 disappears)
    before = {k: (out / f"shard_0000{k}.npy").stat().st_mtime_ns for k in range(4)}
    _run_cache(assets, images, out, update=True)
    assert all((out / f"shard_0000{k}.npy").stat().st_mtime_ns == t for k, t in before.items())
    fresh = tmp_path / "fresh"
    _run_cache(assets, images, fresh)
    _same_files(out, fresh)  # and no stray shard 4 is left
    assert not (out / "shard_00004.npy").exists()


def test_other_vae_or_settings_are_refused_and_overwrite_reencodes(assets: Path, cache_dir: Path,
                                                                   tmp_path: Path) -> None:
    """Before: a re-run with another --vae re-encoded nothing but recorded the new VAE in meta.json."""
    from diffusers import AutoencoderKL

    from lightning_ar.errors import UsageError

    out = tmp_path / "cache"
    shutil.copytree(cache_dir, out)
    torch.manual_seed(1)
    AutoencoderKL.from_pretrained(assets / "vae").save_pretrained(tmp_path / "same_weights")
    other = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                          layers_per_block=1, sample_size=SIZE)
    other.save_pretrained(tmp_path / "other_vae")
    with pytest.raises(UsageError, match=r"other settings \(vae: .*vae_sha256: .*--overwrite"):
        _run_cache(assets, assets / "images", out, vae=str(tmp_path / "other_vae"))
    with pytest.raises(UsageError, match=r"other settings \(dtype: 'float32' -> 'float16'\)"):
        _run_cache(assets, assets / "images", out, dtype="float16")
    _run_cache(assets, assets / "images", out, vae=str(tmp_path / "other_vae"), overwrite=True)
    assert CacheMeta.read(out).vae == str(tmp_path / "other_vae")
    assert (out / "shard_00000.npy").read_bytes() != (cache_dir / "shard_00000.npy").read_bytes()


def test_cache_without_manifest_is_refused(cache_dir: Path, tmp_path: Path, assets: Path) -> None:
    from lightning_ar.errors import UsageError

    out = tmp_path / "cache"
    shutil.copytree(cache_dir, out)
    (out / "manifest.json").unlink()
    with pytest.raises(UsageError, match="no manifest.json"):
        _run_cache(assets, assets / "images", out)


def test_flipped_bytes_are_caught_by_checksums_and_reencoded(assets: Path, cache_dir: Path, tmp_path: Path) -> None:
    """Before: finite flipped bytes were read even with check_values, and a NaN written into a shard made a re-run of
    `cache` record latent_scale NaN and report success."""
    out = tmp_path / "cache"
    shutil.copytree(cache_dir, out)
    data = bytearray((out / "shard_00001.npy").read_bytes())
    data[-7] ^= 0x10  # a low mantissa bit of the last float: still finite
    (out / "shard_00001.npy").write_bytes(bytes(data))
    validate_cache(out)  # headers only: fine
    with pytest.raises(ValueError, match=r"shard_00001\.npy: checksum mismatch"):
        validate_cache(out, check_values=True)
    moments = np.load(cache_dir / "shard_00002.npy")
    moments[0, 0, 0, 0, 0] = np.nan
    np.save(out / "shard_00002.npy", moments)
    _run_cache(assets, assets / "images", out)  # both damaged shards fail their records and are encoded again
    _same_files(out, cache_dir)
    assert math.isfinite(validate_cache(out, check_values=True).latent_scale)


def test_meta_paths_must_stay_inside_the_cache(cache_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cache"
    shutil.copytree(cache_dir, out)
    meta = json.loads((out / "meta.json").read_text())
    meta["shards"][0]["file"] = "../../etc/passwd"
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"not a plain file name inside the cache directory"):
        validate_cache(out)


def test_non_finite_latent_scale_is_refused(assets: Path, tmp_path: Path) -> None:
    import lightning_ar.data.cache as cache_module

    out = tmp_path / "cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cache_module, "posterior_std", lambda *args, **kwargs: float("nan"))
        with pytest.raises(RuntimeError, match="no latent scale exists"):
            _run_cache(assets, assets / "images", out)
    assert not (out / "meta.json").exists()


@pytest.mark.slow
def test_ddp_bad_image_names_it_then_update_equals_a_single_run(assets: Path, tmp_path: Path) -> None:
    """Under 2 processes: the failing rank's real error is what the run reports (not the other rank's broken pipe);
    removing the bad image and re-running with --update gives exactly the cache of the remaining images."""
    images, out = _images_copy(assets, tmp_path), tmp_path / "cache_ddp"
    (images / "ant" / "2.png").write_bytes(b"not a png")  # item 2: shard 1, rank 1
    opts = {**_options(assets, out), "image_root": str(images)}
    argv = [sys.executable, "-m", "lightning_ar.cli", "cache", *[f"--{k}={v}" for k, v in opts.items()],
            "--devices=2", "--strategy=ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    failed = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
                            start_new_session=True)
    assert failed.returncode != 0
    rank0 = [line for line in failed.stderr.splitlines() if line.startswith("[rank0]: RuntimeError: rank")]
    assert rank0 and "rank 1 failed first: ValueError: " in rank0[-1] and "ant/2.png: unreadable image" in rank0[-1]
    (images / "ant" / "2.png").unlink()
    done = subprocess.run([*argv, "--update=true"], env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
                          start_new_session=True)
    assert done.returncode == 0, done.stderr[-3000:]
    single = tmp_path / "single"
    _run_cache(assets, images, single)
    _same_files(out, single)
