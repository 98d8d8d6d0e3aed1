"""``lightning-ar cache``: an ImageFolder encoded by a VAE into a sharded latent cache (see :mod:`.shards`).

Distributed with Lightning's engine: :class:`MomentEncoder` (a LightningModule whose ``predict_step`` encodes a batch
and its mirror image) runs under ``Trainer(strategy=..., devices=..., num_nodes=...)``; the shards still missing are
dealt round-robin to the ranks, each rank encodes whole shards (batches never straddle shards, so the bytes do not
depend on the number of processes; on CPU they do change in the last bits with the torch thread count, as
convolutions do) and :class:`ShardWriter` writes each shard atomically when complete. Re-running
with the same arguments skips the shards already on disk (each is validated; invalid ones are re-encoded) and
finishes the rest. Finally rank 0 computes the latent scale and writes ``meta.json``, the mark of a finished cache.

Re-runs are checked against ``manifest.json`` (:mod:`.manifest`): unchanged inputs resume; other settings are
refused (``--overwrite true`` re-encodes everything); changed images are refused unless ``--update true``, which
re-encodes exactly the shards whose images changed. Each shard's record (image digest, file checksums) decides whether
it is done.

Policy for bad input: an unreadable or corrupted image stops the run with an error naming the file (shards already
written are kept; replace or remove the file and re-run with ``--update true``); an empty class folder or an image root
without class folders stops before any encoding (torchvision's ImageFolder rules). Under DDP the rank that failed first
is named with its own error (:func:`first_error_wins`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, TQDMProgressBar
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from lightning_ar.data.manifest import (
    CacheSettings,
    Manifest,
    describe_changes,
    image_records,
    weights_sha256,
)
from lightning_ar.data.shards import (
    DTYPES,
    META_FILE,
    CacheMeta,
    ShardInfo,
    open_shard,
    shard_files,
    shard_record_file,
    verify_checksums,
    write_shard,
)
from lightning_ar.data.vae import encode_moments, load_vae
from lightning_ar.errors import UsageError
from lightning_ar.io import atomic_write_text
from lightning_ar.progress import progress_bar

if TYPE_CHECKING:
    from diffusers import AutoencoderKL
    from jsonargparse import ArgumentParser

ERROR_GLOB = ".error.rank*"  # error files of failed ranks (see first_error_wins)

def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM/MAR centre crop: BOX-halve while the short side >= 2*size, BICUBIC to short side = size, crop.

    Returns:
        ``[size, size, 3]`` uint8 array.
    """
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image.convert("RGB"))
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def load_image(path: str, image_size: int) -> Tensor:
    """Read, centre-crop and normalise one image: ``[3, size, size]`` float32 in ``[-1, 1]``.

    Raises:
        ValueError: the file is not a readable image (named).
    """
    try:
        with Image.open(path) as img:
            arr = center_crop_arr(img.convert("RGB"), image_size)
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"{path}: unreadable image ({err}); replace or remove it and re-run the cache with "
                         "--update true") from None
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1.0


class ImageItems(Dataset):
    """The sorted ImageFolder list as ``(image [3, S, S], label, index)`` items.

    Raises:
        FileNotFoundError: no class folders, or a class folder without images (named by torchvision).
    """

    def __init__(self, root: str, image_size: int) -> None:
        from torchvision.datasets import ImageFolder

        if not Path(root).is_dir():
            raise FileNotFoundError(f"cache image_root {root!r}: not a directory (expected class subfolders)")
        try:
            folder = ImageFolder(root)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"cache image_root {root!r}: {err}") from None
        self.samples, self.classes, self.image_size = folder.samples, folder.classes, image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        path, label = self.samples[index]
        return load_image(path, self.image_size), label, index


def shard_ranges(num_items: int, shard_size: int) -> list[range]:
    """Item ranges of the shards: shard ``k`` holds items ``[k*S, min((k+1)*S, N))``."""
    return [range(s, min(s + shard_size, num_items)) for s in range(0, num_items, shard_size)]


def shard_done(directory: Path, index: int, count: int, item_shape: tuple[int, ...], dtype: str, digest: str) -> bool:
    """Whether shard ``index`` is on disk, complete, holds exactly the images of ``digest`` (its record says so) and
    its bytes match the checksums of that record (else it is (re)encoded)."""
    info = read_shard_record(directory, index)
    if info is None or info[1] != digest or info[0].count != count:
        return False
    try:
        open_shard(directory, info[0], item_shape, dtype)
        verify_checksums(directory, info[0])
    except (ValueError, FileNotFoundError):
        return False
    return True


def read_shard_record(directory: Path, index: int) -> tuple[ShardInfo, str] | None:
    """``(ShardInfo with checksums, digest of its images)`` from shard ``index``'s record, ``None`` if unreadable."""
    path = directory / shard_record_file(index)
    try:
        record = json.loads(path.read_text())
        mfile, lfile = shard_files(index)
        info = ShardInfo(mfile, lfile, int(record["count"]), record["moments_sha256"], record["labels_sha256"])
        return info, record["items_sha256"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


def write_shard_record(directory: Path, index: int, info: ShardInfo, digest: str) -> None:
    """Write shard ``index``'s record atomically (after its files: a record means the shard is complete)."""
    record = {"count": info.count, "items_sha256": digest, "moments_sha256": info.moments_sha256,
              "labels_sha256": info.labels_sha256}
    atomic_write_text(directory / shard_record_file(index), json.dumps(record) + "\n")


class ShardBatches(Sampler[list[int]]):
    """Batches of consecutive items inside each given shard (never across shards)."""

    def __init__(self, ranges: list[range], batch_size: int) -> None:
        self.ranges, self.batch_size = ranges, batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for r in self.ranges:
            for start in range(0, len(r), self.batch_size):
                yield list(r[start : start + self.batch_size])

    def __len__(self) -> int:
        return sum(math.ceil(len(r) / self.batch_size) for r in self.ranges)


class ImageShardData(L.LightningDataModule):
    """Predict data of one rank: the missing shards ``k`` with ``k % world_size == rank``, found in ``setup``."""

    def __init__(self, items: ImageItems, manifest: Manifest, out_dir: str, batch_size: int, num_workers: int,
                 item_shape: tuple[int, ...], overwrite: bool = False) -> None:
        super().__init__()
        self.items, self.manifest, self.out_dir = items, manifest, Path(out_dir)
        self.shard_size, self.dtype = manifest.settings.shard_size, manifest.settings.dtype
        self.batch_size, self.num_workers, self.item_shape, self.overwrite = batch_size, num_workers, item_shape, \
            overwrite
        self.todo: dict[int, range] = {}
        self.mine: dict[int, range] = {}

    def missing(self) -> dict[int, range]:
        """Shards not yet complete on disk (or holding other images): index -> item range."""
        ranges = shard_ranges(len(self.items), self.shard_size)
        return {k: r for k, r in enumerate(ranges) if not shard_done(
            self.out_dir, k, len(r), self.item_shape, self.dtype, self.manifest.shard_digest(r.start, r.stop))}

    def setup(self, stage: str) -> None:
        strategy, rank, world = self.trainer.strategy, self.trainer.global_rank, self.trainer.world_size
        if rank == 0:
            prepare_directory(self.out_dir, self.manifest, self.overwrite)
        strategy.barrier("cache-prepared")  # rank 0 has cleaned up and written the manifest
        self.todo = self.missing()
        if rank == 0 and self.todo:
            (self.out_dir / META_FILE).unlink(missing_ok=True)  # the cache is unfinished until all shards exist
        strategy.barrier("cache-scan")  # every rank scans before any rank writes
        self.mine = {k: r for i, (k, r) in enumerate(sorted(self.todo.items())) if i % world == rank}

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.items, batch_sampler=ShardBatches(list(self.mine.values()), self.batch_size),
                          num_workers=self.num_workers)


def prepare_directory(out_dir: Path, manifest: Manifest, overwrite: bool) -> None:
    """Rank 0, before any rank scans: remove what a killed run left (and, with ``overwrite``, the whole old cache);
    write the manifest of this run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = [*out_dir.glob(".shard_*.tmp*"), *out_dir.glob(ERROR_GLOB)]
    if overwrite:
        stale += [*out_dir.glob("shard_*.npy"), *out_dir.glob("shard_*.json"), out_dir / META_FILE]
    for path in stale:
        path.unlink(missing_ok=True)
    manifest.write(out_dir)


class MomentEncoder(L.LightningModule):
    """Encodes images and their mirror images to posterior moments with a frozen diffusers AutoencoderKL."""

    def __init__(self, vae: str) -> None:
        super().__init__()
        self.vae = load_vae(vae).requires_grad_(False)

    def predict_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Returns ``moments [B, 2, 2C, h, w]`` (float32, CPU; index 1 = flipped), ``labels`` and ``indices``."""
        images, labels, indices = batch  # (B, 3, S, S), (B,), (B,)
        both = torch.cat([images, images.flip(-1)])  # (2B, 3, S, S)
        moments = encode_moments(self.vae, both).float()  # (2B, 2C, h, w)
        moments = torch.stack(moments.chunk(2), dim=1)  # (B, 2, 2C, h, w)
        return {"moments": moments.cpu(), "labels": labels.cpu(), "indices": indices.cpu()}


class ShardWriter(BasePredictionWriter):
    """Collects predicted batches per shard and writes each shard atomically once all its items are in."""

    def __init__(self, data: ImageShardData) -> None:
        super().__init__(write_interval="batch")
        self.data, self.buffers, self.written, self.started = data, {}, 0, time.perf_counter()

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: dict[str, Tensor],
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        shard = int(prediction["indices"][0]) // self.data.shard_size
        self.buffers.setdefault(shard, []).append(prediction)
        parts = self.buffers[shard]
        if sum(len(p["labels"]) for p in parts) < len(self.data.mine[shard]):
            return
        moments = torch.cat([p["moments"] for p in parts]).numpy()
        labels = torch.cat([p["labels"] for p in parts]).numpy()
        info = write_shard(self.data.out_dir, shard, moments, labels, self.data.dtype)
        items = self.data.mine[shard]
        write_shard_record(self.data.out_dir, shard, info, self.data.manifest.shard_digest(items.start, items.stop))
        del self.buffers[shard]
        self.written += 1


class ImagesPerSecondBar(TQDMProgressBar):
    """Lightning's progress bar with the images/s of this rank in the predict bar."""

    def on_predict_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int,
                               dataloader_idx: int = 0) -> None:
        if batch_idx == 0:
            self._start, self._seen = time.perf_counter(), 0
        super().on_predict_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        self._seen += len(batch[1])
        rate = self._seen / max(time.perf_counter() - self._start, 1e-9)
        self.predict_progress_bar.set_postfix({"images/s": f"{rate:.1f}"})


def posterior_std(directory: str | Path, shards: list[ShardInfo], item_shape: tuple[int, ...], dtype: str,
                  seed: int, progress: bool = False) -> float:
    """Std of one posterior sample of every cached latent (both flip copies).

    Computed entirely in float64 numpy with one ``numpy.random.default_rng(seed)`` over the shards in order (noise
    ``[2N, C, h, w]`` per shard): the result is the same in any process and with any thread count (torch's
    float32 kernels and reductions are not, and the recorded scale must not depend on how the cache was made).
    ``progress`` shows a bar over the shards.
    """
    rng = np.random.default_rng(seed)
    total, sq, count = 0.0, 0.0, 0
    for info in progress_bar(shards, desc="cache: latent scale", unit="shard", disable=not progress):
        moments, _ = open_shard(directory, info, item_shape, dtype)
        moments = np.asarray(moments, dtype=np.float64).reshape(-1, *item_shape[1:])  # (2N, 2C, h, w)
        mean, logvar = np.split(moments, 2, axis=1)
        sample = mean + np.exp(0.5 * np.clip(logvar, -30.0, 20.0)) * rng.standard_normal(mean.shape)
        total, sq, count = total + float(sample.sum()), sq + float(np.square(sample).sum()), count + sample.size
    mean = total / count
    return math.sqrt(max(sq / count - mean * mean, 0.0) * count / max(count - 1, 1))


def latent_shape_of(vae: AutoencoderKL, image_size: int) -> tuple[int, int, int]:
    """``(C, h, w)`` of the latents of a diffusers AutoencoderKL for ``image_size`` images."""
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    if image_size % down:
        raise ValueError(f"cache image_size {image_size} must be divisible by the VAE's downsampling factor {down}")
    return (vae.config.latent_channels, image_size // down, image_size // down)


def _check_options(image_size: int, batch_size: int, shard_size: int, num_workers: int, dtype: str) -> None:
    for name, value in (("image_size", image_size), ("batch_size", batch_size), ("shard_size", shard_size)):
        if value < 1:
            raise ValueError(f"cache {name} must be >= 1, got {value}")
    if num_workers < 0:
        raise ValueError(f"cache num_workers must be >= 0, got {num_workers}")
    if dtype not in DTYPES:
        raise ValueError(f"cache dtype must be one of {DTYPES}, got {dtype!r}")


def finish_cache(out_dir: Path, items: ImageItems, manifest: Manifest, latent_shape: tuple[int, int, int],
                 seed: int) -> CacheMeta:
    """Validate every shard against its record, drop shards beyond the last (left by a larger earlier run), compute
    the latent scale and write ``meta.json`` (rank 0, after all shards exist). Both passes read the whole cache
    (hours of I/O for ImageNet at scale): each shows a progress bar over the shards.

    Raises:
        RuntimeError: a shard or its record is missing or damaged, or the latent scale is not a finite number.
    """
    c, h, w = latent_shape
    settings, shards = manifest.settings, []
    ranges = shard_ranges(len(items), settings.shard_size)
    for k, r in progress_bar(enumerate(ranges), total=len(ranges), desc="cache: validate", unit="shard"):
        record = read_shard_record(out_dir, k)
        if record is None or record[1] != manifest.shard_digest(r.start, r.stop):
            raise RuntimeError(f"cache {out_dir}: shard {k} has no valid record after encoding; re-run to finish")
        open_shard(out_dir, record[0], (2, 2 * c, h, w), settings.dtype, check_values=False)
        shards.append(record[0])
    remove_stray_shards(out_dir, len(ranges))
    std = posterior_std(out_dir, shards, (2, 2 * c, h, w), settings.dtype, seed, progress=True)
    if not (math.isfinite(std) and std > 0):
        raise RuntimeError(f"cache {out_dir}: the latents' standard deviation is {std}, so no latent scale exists; "
                           "a shard holds non-finite or constant values (check the VAE); nothing was recorded")
    meta = CacheMeta(latent_shape=latent_shape, dtype=settings.dtype, num_items=len(items),
                     shard_size=settings.shard_size, shards=shards, class_names=list(items.classes),
                     vae=settings.vae, image_size=settings.image_size, latent_scale=1.0 / std)
    meta.write(out_dir)
    return meta


def remove_stray_shards(out_dir: Path, num_shards: int) -> None:
    """Delete the files of shards with index ``>= num_shards`` (from an earlier run over more images)."""
    for path in out_dir.glob("shard_*"):
        index = path.name.split(".")[0].removeprefix("shard_")
        if index.isdigit() and int(index) >= num_shards:
            path.unlink(missing_ok=True)


def check_manifest(out_dir: Path, current: Manifest, overwrite: bool, update: bool) -> list[str]:
    """Compare the cache's manifest with this run's inputs (every rank, read only); return the image changes that
    ``update`` will re-encode.

    Raises:
        UsageError: other settings, or changed images without ``update``, or shards without a manifest (each
            message says what changed and what to do), unless ``overwrite``.
    """
    old = Manifest.read(out_dir)
    if overwrite:
        return []
    if old is None:
        if any(out_dir.glob("shard_*.npy")) or (out_dir / META_FILE).exists():
            raise UsageError(f"cache {out_dir} holds shards but no manifest.json (made by an older version, or not "
                             "by `lightning-ar cache`): its contents cannot be checked; re-run with --overwrite")
        return []
    settings, images = describe_changes(old, current)
    if settings:
        raise UsageError(f"cache {out_dir} was made with other settings ({'; '.join(settings)}); none of its shards "
                         "fit: re-run with --overwrite to re-encode everything, or use another --out_dir")
    if images and not update:
        raise UsageError(f"cache {out_dir}: the images changed since it was made ({'; '.join(images)}), so shards "
                         "would hold other images' latents: re-run with --update to re-encode the shards whose "
                         "images changed, or with --overwrite to re-encode all")
    return images


def cache_images(
    image_root: str,
    out_dir: str,
    vae: str,
    image_size: int = 256,
    batch_size: int = 64,
    num_workers: int = 4,
    shard_size: int = 10000,
    dtype: Literal["float16", "float32"] = "float32",
    devices: int | str = "auto",
    num_nodes: int = 1,
    accelerator: str = "auto",
    strategy: str = "ddp",
    precision: str = "32-true",
    seed: int = 0,
    overwrite: bool = False,
    update: bool = False,
) -> CacheMeta | None:
    """Encode an ImageFolder into a latent cache (resumable; see the module docstring).

    Args:
        image_root: ImageFolder root: one subfolder of images per class (sorted names are the labels).
        out_dir: Cache directory (created; shards already complete there, for the same images, are kept).
        vae: Diffusers AutoencoderKL: hub id or local directory (e.g. made by ``lightning-ar convert-vae``).
        image_size: Side of the ADM centre crop.
        batch_size: Images per encoder batch (each is encoded with its mirror image).
        num_workers: DataLoader workers per process for image decoding.
        shard_size: Images per shard file.
        dtype: Storage dtype of the moments: ``float16`` or ``float32``.
        devices: Devices per node (Lightning Trainer ``devices``).
        num_nodes: Number of nodes.
        accelerator: Lightning accelerator (``auto``, ``cpu``, ``gpu``, ...).
        strategy: Lightning strategy (``ddp``; ``auto`` for one process).
        precision: Lightning precision of the encoder (e.g. ``bf16-mixed`` on GPUs).
        seed: Seed of the posterior samples that give the latent scale.
        overwrite: Delete what ``out_dir`` holds and encode everything anew.
        update: Accept changed images (added, removed, modified): re-encode exactly the shards whose images changed.

    Returns:
        The meta of the finished cache on global rank 0, ``None`` on other ranks.

    Raises:
        UsageError: ``out_dir`` was made with other settings or other images (see :func:`check_manifest`).
    """
    _check_options(image_size, batch_size, shard_size, num_workers, dtype)
    items = ImageItems(image_root, image_size)
    encoder = MomentEncoder(vae)
    settings = CacheSettings(vae, weights_sha256(encoder.vae), image_size, shard_size, dtype)
    manifest = Manifest(settings, image_records(image_root, items.samples))
    changes = check_manifest(Path(out_dir), manifest, overwrite, update)
    c, h, w = latent_shape = latent_shape_of(encoder.vae, image_size)
    data = ImageShardData(items, manifest, out_dir, batch_size, num_workers, (2, 2 * c, h, w), overwrite)
    writer = ShardWriter(data)
    trainer = L.Trainer(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                        precision=precision, logger=False, enable_checkpointing=False, enable_model_summary=False,
                        use_distributed_sampler=False, callbacks=[writer, ImagesPerSecondBar()])
    if changes and trainer.global_rank == 0:
        print(f"cache {out_dir}: {'; '.join(changes)}; re-encoding the shards whose images changed (--update)")
    with first_error_wins(trainer, Path(out_dir)):
        trainer.predict(encoder, datamodule=data, return_predictions=False)
        trainer.strategy.barrier("cache-written")
    if trainer.global_rank != 0:
        return None
    left = sum(len(r) for r in data.missing().values())
    if left:
        raise RuntimeError(f"cache {out_dir}: {left} images still missing after encoding; re-run to finish")
    rate = sum(len(r) for r in data.todo.values()) / max(time.perf_counter() - writer.started, 1e-9)
    meta = finish_cache(Path(out_dir), items, manifest, latent_shape, seed)
    print(f"cached {meta.num_items} images to {out_dir} ({rate:.1f} images/s), latent scale {meta.latent_scale:.6g}")
    return meta


@contextmanager
def first_error_wins(trainer: L.Trainer, out_dir: Path, wait: float = 10.0) -> Iterator[None]:
    """Make the first failing rank's error the one every rank raises.

    A rank that fails writes its error to ``out_dir/.error.rank<r>``; the other ranks then fail too, at the next
    collective, with an uninformative communication error. Each failing rank waits up to ``wait`` seconds for the
    error files and raises the earliest one (with its rank), so the user reads the real cause.
    """
    try:
        yield
    except BaseException as err:
        rank = trainer.global_rank
        mine = out_dir / f".error.rank{rank}"
        atomic_write_text(mine, f"{type(err).__name__}: {err}\n")
        if trainer.world_size > 1:
            deadline = time.monotonic() + wait
            while len(list(out_dir.glob(ERROR_GLOB))) < 2 and time.monotonic() < deadline:
                time.sleep(0.2)
        first = min(out_dir.glob(ERROR_GLOB), key=lambda p: p.stat().st_mtime_ns, default=mine)
        if first == mine:
            raise
        raise RuntimeError(f"rank {first.name.removeprefix('.error.rank')} failed first: "
                           f"{first.read_text().strip()}") from err


def cache_parser() -> ArgumentParser:
    """The jsonargparse parser of ``lightning-ar cache`` (``--config`` YAML plus one flag per option)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="lightning-ar cache", description=cache_images.__doc__.split("\n")[0],
                            parser_mode="omegaconf")
    parser.add_argument("--config", action=ActionConfigFile, help="YAML file with any of the options below")
    parser.add_function_arguments(cache_images)
    return parser


def cache_main(argv: list[str]) -> None:
    """``lightning-ar cache [--config cache.yaml] [--image_root ...] ...``: parse the options and run."""
    cfg = cache_parser().parse_args(argv)
    options = {k: v for k, v in cfg.as_dict().items() if k not in ("config", "__path__")}
    cache_images(**options)
