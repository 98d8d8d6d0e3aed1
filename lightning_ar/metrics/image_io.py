"""Image sets for evaluation: ADM ``.npz`` batches and image folders, read as ``uint8`` ``[B, 3, H, W]`` tensors.

ADM format (guided-diffusion's samplers and reference batches): ``arr_0`` is ``uint8`` ``[N, H, W, 3]`` (NHWC, RGB).
Grayscale images (1 channel) are repeated to 3 equal channels, as PIL's ``convert("RGB")`` does.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np
import torch
from torch import Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def quantize(images: Tensor) -> Tensor:
    """Images in ``[-1, 1]`` (any shape) to ``uint8`` pixels ``round((x + 1) * 127.5)``, values clamped first: the one
    quantisation of this project (written samples, ADM batches, Inception inputs)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_uint8_rgb(images: Tensor) -> Tensor:
    """Images ``[B, 1 or 3, H, W]`` in ``[-1, 1]`` to ``uint8`` ``[B, 3, H, W]`` (:func:`quantize`)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected decoded images [B, 1 or 3, H, W], got {tuple(images.shape)}")
    pixels = quantize(images)
    return pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels


def check_adm_images(array: np.ndarray, name: str) -> np.ndarray:
    """Validate ``uint8`` ``[N, H, W, 3]`` (a 1-channel array is repeated to 3 channels)."""
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[-1] not in (1, 3):
        raise ValueError(f"{name}: expected arr_0 uint8 [N, H, W, 3] (ADM format), got {array.dtype} {array.shape}")
    return np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array


def _read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    major, _ = np.lib.format.read_magic(f)
    if major == 1:
        return np.lib.format.read_array_header_1_0(f)
    if major == 2:
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy format version {major}")


@contextmanager
def _open_arr0(path: str | Path, name: str) -> Iterator[IO[bytes]]:
    """The ``arr_0.npy`` member of an ADM ``.npz``, opened for reading (errors name ``name`` and the file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{name}: no file at {path}")
    with zipfile.ZipFile(path) as zf:
        if "arr_0.npy" not in zf.namelist():
            raise ValueError(f"{name}: {path} has no arr_0 (ADM format); members: {zf.namelist()}")
        with zf.open("arr_0.npy") as f:
            yield f


def npz_image_count(path: str | Path, name: str = "npz") -> int:
    """``N`` of ``arr_0`` ``[N, H, W, 3]`` in an ADM ``.npz`` (read from the array header only)."""
    with _open_arr0(path, name) as f:
        return int(_read_npy_header(f)[0][0])


def reference_image_count(reference: str | Path) -> int:
    """Number of images of a reference ``.npz`` (``arr_0``) or image folder."""
    reference = Path(reference)
    return len(image_files(reference)) if reference.is_dir() else npz_image_count(reference, "reference")


def iter_npz_images(path: str | Path, batch_size: int, name: str = "npz") -> Iterator[np.ndarray]:
    """Stream ``arr_0`` of an ADM ``.npz`` (``np.savez`` or ``np.savez_compressed``) in ``uint8`` ``[B, H, W, 3]``
    batches; memory stays ``O(batch_size)`` however large the file."""
    with _open_arr0(path, name) as f:
        shape, fortran, dtype = _read_npy_header(f)
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3) or fortran:
            raise ValueError(f"{name} {path}: expected arr_0 uint8 [N, H, W, 3] (ADM format), got {dtype} {shape}")
        row_bytes = int(np.prod(shape[1:]))
        for start in range(0, shape[0], batch_size):
            n = min(batch_size, shape[0] - start)
            batch = np.frombuffer(f.read(n * row_bytes), dtype=np.uint8).reshape(n, *shape[1:])
            yield check_adm_images(batch, f"{name} {path}")


def image_files(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted, any of :data:`IMAGE_SUFFIXES`)."""
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"reference folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _read_images(paths: list[Path], size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image

    arrays = []
    for path in paths:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))  # (H, W, 3)
        if size is not None and array.shape[:2] != size:
            raise ValueError(f"reference image {path} is {array.shape[:2]}, others are {size}: "
                             "center-crop/resize the folder to one size or use an ADM reference .npz")
        arrays.append(array)
    return np.stack(arrays)


def iter_reference_batches(reference: str | Path, batch_size: int, rank: int = 0,
                           world_size: int = 1) -> Iterator[Tensor]:
    """Yield this process's share (``rank::world_size``) of a reference ``.npz`` or image folder.

    Yields:
        ``uint8`` ``[B, 3, H, W]`` batches.
    """
    reference = Path(reference)
    if reference.is_dir():
        files = image_files(reference)
        size = _read_images(files[:1], None).shape[1:3]
        shard = files[rank::world_size]
        batches = (_read_images(shard[i:i + batch_size], size) for i in range(0, len(shard), batch_size))
    else:  # stream world_size * batch_size rows at a time and keep this process's rows
        batches = (rows[rank::world_size] for rows in iter_npz_images(reference, batch_size * world_size, "reference"))
    for batch in batches:
        if len(batch) == 0:
            continue
        yield torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)  # (B, H, W, 3) -> (B, 3, H, W)
