"""On-disk latent cache: ``meta.json`` plus shards of VAE posterior moments with horizontal-flip copies.

Layout of a cache directory::

    meta.json                  CacheMeta (format version, shapes, dtype, shard list, classes, VAE, latent scale)
    manifest.json              what went in: settings and the image list (see :mod:`.manifest`)
    shard_00000.npy            moments [N, 2, 2C, h, w] (index 1 of dim 1: the horizontally flipped image)
    shard_00000.labels.npy     labels [N] int64
    shard_00000.json           the shard's record: digest of its images, SHA-256 of both files (written last)

Moments are mean then log-variance along the channel axis (diffusers' ``DiagonalGaussianDistribution.parameters``).
Plain ``.npy`` files so that numpy can memory-map them; every file is written atomically (temporary file + rename),
so a shard is either complete or absent; ``meta.json`` lists every shard with the SHA-256 of its files, which
``validate_cache(check_values=True)`` verifies. :class:`ShardReader` opens the memory maps lazily, once per process,
so it can be pickled into DataLoader workers and used under a ``DistributedSampler``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lightning_ar.data.manifest import file_sha256
from lightning_ar.io import atomic_output

FORMAT_VERSION = 2  # 2: shard checksums; version 1 caches (no checksums) are still read
READABLE_VERSIONS = (1, 2)
META_FILE = "meta.json"
DTYPES = ("float16", "float32")


def shard_files(index: int) -> tuple[str, str]:
    """File names ``(moments, labels)`` of shard ``index``."""
    return f"shard_{index:05d}.npy", f"shard_{index:05d}.labels.npy"


def shard_record_file(index: int) -> str:
    """File name of shard ``index``'s record (its image digest and file checksums)."""
    return f"shard_{index:05d}.json"


@dataclass
class ShardInfo:
    """One shard: its moments file, labels file, number of items and the SHA-256 of both files (``None`` in caches
    written before checksums existed)."""

    file: str
    labels: str
    count: int
    moments_sha256: str | None = None
    labels_sha256: str | None = None


@dataclass
class CacheMeta:
    """Contents of ``meta.json``.

    Attributes:
        latent_shape: ``(C, h, w)`` of one latent (the moments have ``2C`` channels).
        dtype: Storage dtype of the moments (``float16`` or ``float32``).
        num_items: Number of images (each stored with its flip copy).
        shard_size: Items per shard (the last shard may hold fewer).
        shards: Shard list in item order.
        class_names: ImageFolder class names; label ``i`` is ``class_names[i]``.
        vae: Hub id or local directory of the VAE that encoded the images.
        image_size: Side of the centre-cropped images.
        latent_scale: ``1 / std`` of posterior samples of all cached latents.
        flip_copies: Always true: every item holds the moments of the image and of its mirror image.
        version: Format version.
    """

    latent_shape: tuple[int, int, int]
    dtype: str
    num_items: int
    shard_size: int
    shards: list[ShardInfo]
    class_names: list[str]
    vae: str
    image_size: int
    latent_scale: float
    flip_copies: bool = True
    version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def item_shape(self) -> tuple[int, int, int, int]:
        """Shape ``(2, 2C, h, w)`` of one item's moments."""
        c, h, w = self.latent_shape
        return (2, 2 * c, h, w)

    def write(self, directory: str | Path) -> None:
        """Write ``directory/meta.json`` atomically."""
        with atomic_output(Path(directory) / META_FILE) as tmp:
            tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
            os.chmod(tmp, 0o644)

    @classmethod
    def read(cls, directory: str | Path) -> CacheMeta:
        """Read ``directory/meta.json``.

        Raises:
            FileNotFoundError: no ``meta.json`` (an unfinished cache, or not a cache at all).
            ValueError: unreadable, missing keys, or an unknown format version.
        """
        path = Path(directory) / META_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no meta.json; not a latent cache, or `lightning-ar cache` did not finish")
        try:
            raw = json.loads(path.read_text())
            raw["shards"] = [ShardInfo(**s) for s in raw["shards"]]
            raw["latent_shape"] = tuple(raw["latent_shape"])
            meta = cls(**raw)
        except (json.JSONDecodeError, TypeError, KeyError) as err:
            raise ValueError(f"{path}: not a valid cache meta.json ({err})") from None
        if meta.version not in READABLE_VERSIONS:
            raise ValueError(f"{path}: format version {meta.version}, this code reads versions {READABLE_VERSIONS}")
        for info in meta.shards:
            for name in (info.file, info.labels):
                if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                    raise ValueError(f"{path}: shard file {name!r} is not a plain file name inside the cache "
                                     "directory; meta.json is corrupt or was edited")
        if meta.dtype not in DTYPES:
            raise ValueError(f"{path}: dtype must be one of {DTYPES}, got {meta.dtype!r}")
        return meta


def check_finite(array: np.ndarray, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` if ``array`` holds NaN or Inf."""
    bad = ~np.isfinite(array)
    if bad.any():
        raise ValueError(f"{name}: {int(bad.sum())} NaN/Inf values in the moments (first at flat index "
                         f"{int(np.flatnonzero(bad.reshape(-1))[0])})")


def write_shard(directory: str | Path, index: int, moments: np.ndarray, labels: np.ndarray, dtype: str) -> ShardInfo:
    """Write shard ``index`` atomically: moments ``[N, 2, 2C, h, w]`` (cast to ``dtype``) and labels ``[N]``.

    Raises:
        ValueError: NaN/Inf in the moments (after the cast), or inconsistent shapes.
    """
    directory = Path(directory)
    mfile, lfile = shard_files(index)
    moments = np.ascontiguousarray(moments, dtype=dtype)
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    if moments.ndim != 5 or moments.shape[1] != 2 or labels.shape != (moments.shape[0],):
        raise ValueError(f"shard {index}: expected moments [N, 2, 2C, h, w] and labels [N], got "
                         f"{moments.shape} and {labels.shape}")
    check_finite(moments, str(directory / mfile))
    checksums = {}
    for name, array in ((lfile, labels), (mfile, moments)):
        with atomic_output(directory / name) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, array)
            os.chmod(tmp, 0o644)
            checksums[name] = file_sha256(tmp)
    return ShardInfo(file=mfile, labels=lfile, count=int(moments.shape[0]), moments_sha256=checksums[mfile],
                     labels_sha256=checksums[lfile])


def verify_checksums(directory: str | Path, info: ShardInfo) -> None:
    """Raise ``ValueError`` naming the file if a shard file's SHA-256 differs from the recorded one."""
    for name, expected in ((info.file, info.moments_sha256), (info.labels, info.labels_sha256)):
        if expected is not None and file_sha256(Path(directory) / name) != expected:
            raise ValueError(f"{Path(directory) / name}: checksum mismatch (the file changed after it was written: "
                             "disk corruption or an edit); re-encode it with `lightning-ar cache ... --update`")


def _load(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: shard file missing")
    try:
        return np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path}: unreadable or truncated .npy file ({err})") from None


def open_shard(
    directory: str | Path, info: ShardInfo, item_shape: tuple[int, ...], dtype: str, check_values: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Memory-map one shard and check it against what ``meta.json`` (or the writer) expects.

    Returns:
        ``(moments [N, 2, 2C, h, w], labels [N])`` as read-only memory maps.

    Raises:
        FileNotFoundError: a file of the shard is missing.
        ValueError: truncated file, item count, shape or dtype different from the expected ones, NaN/Inf values
            (only with ``check_values``).
    """
    directory = Path(directory)
    moments, labels = _load(directory / info.file), _load(directory / info.labels)
    expected = (info.count, *item_shape)
    if moments.shape != expected:
        raise ValueError(f"{directory / info.file}: moments of shape {moments.shape}, meta.json expects {expected}")
    if moments.dtype != np.dtype(dtype):
        raise ValueError(f"{directory / info.file}: dtype {moments.dtype}, meta.json expects {dtype}")
    if labels.shape != (info.count,) or labels.dtype != np.int64:
        raise ValueError(f"{directory / info.labels}: labels {labels.dtype}{list(labels.shape)}, "
                         f"expected int64[{info.count}]")
    if check_values:
        check_finite(np.asarray(moments), str(directory / info.file))
    return moments, labels


def validate_cache(directory: str | Path, check_values: bool = False) -> CacheMeta:
    """Check a whole cache against its ``meta.json`` and return the meta.

    Args:
        directory: The cache directory.
        check_values: Also read every byte: verify each shard's SHA-256 and reject NaN/Inf values.

    Raises:
        FileNotFoundError: missing ``meta.json`` or shard file (named).
        ValueError: a shard or ``meta.json`` that disagrees with the data (named).
    """
    meta = CacheMeta.read(directory)
    path = Path(directory) / META_FILE
    total = sum(s.count for s in meta.shards)
    if total != meta.num_items:
        raise ValueError(f"{path}: num_items is {meta.num_items} but the shards hold {total} items")
    if any(s.count > meta.shard_size for s in meta.shards):
        raise ValueError(f"{path}: a shard holds more than shard_size={meta.shard_size} items")
    if not (math.isfinite(meta.latent_scale) and meta.latent_scale > 0):
        raise ValueError(f"{path}: latent_scale must be a finite number > 0, got {meta.latent_scale}")
    for info in meta.shards:
        moments, labels = open_shard(directory, info, meta.item_shape(), meta.dtype)
        if check_values:
            check_finite(np.asarray(moments), str(Path(directory) / info.file))
            verify_checksums(directory, info)
        if len(labels) and (labels.min() < 0 or labels.max() >= meta.num_classes):
            raise ValueError(f"{Path(directory) / info.labels}: labels outside [0, {meta.num_classes})")
    return meta


class ShardReader:
    """Random access to the items of a validated cache; memory maps open lazily once per process.

    Args:
        directory: The cache directory.
        check_values: Reject NaN/Inf values when validating (reads the whole cache once).
    """

    def __init__(self, directory: str | Path, check_values: bool = False) -> None:
        self.directory = Path(directory)
        self.meta = validate_cache(self.directory, check_values)
        self.offsets = np.cumsum([0] + [s.count for s in self.meta.shards])  # (S + 1,)
        self._arrays: list[tuple[np.ndarray, np.ndarray]] | None = None
        self._pid: int | None = None

    def __len__(self) -> int:
        return self.meta.num_items

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_arrays": None, "_pid": None}

    def _open(self) -> list[tuple[np.ndarray, np.ndarray]]:
        if self._arrays is None or self._pid != os.getpid():
            shape, dtype = self.meta.item_shape(), self.meta.dtype
            self._arrays = [open_shard(self.directory, s, shape, dtype) for s in self.meta.shards]
            self._pid = os.getpid()
        return self._arrays

    def locate(self, index: int) -> tuple[int, int]:
        """Item ``index`` to ``(shard, position in shard)``."""
        if not 0 <= index < len(self):
            raise IndexError(f"cache item {index} out of range [0, {len(self)})")
        shard = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return shard, index - int(self.offsets[shard])

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        """Moments ``[2, 2C, h, w]`` (float32 copy) and label of item ``index``."""
        shard, pos = self.locate(index)
        moments, labels = self._open()[shard]
        return np.array(moments[pos], dtype=np.float32), int(labels[pos])

    def labels(self) -> np.ndarray:
        """All labels ``[N]`` (int64)."""
        return np.concatenate([np.asarray(lab) for _, lab in self._open()]) if self.meta.shards else np.zeros(0, int)
