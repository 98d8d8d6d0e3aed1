"""``AdmNpzWriter``: ``predict`` samples of all processes gathered into one ADM-format ``samples.npz``.

ADM format (guided-diffusion, and what its evaluator and :func:`lightning_ar.metrics.evaluate_npz` read):
``arr_0`` ``uint8`` ``[N, H, W, 3]`` (NHWC, RGB) ordered by sample index, ``arr_1`` the ``int64`` labels ``[N]`` (as
guided-diffusion's class-conditional sampler writes them) and the same labels again as ``labels``. Grayscale samples
(e.g. 1-channel digits) are repeated to 3 equal channels, since ADM's evaluator needs RGB.

The gather streams: images are placed by index into a memory-mapped ``.npy`` beside the output and zipped into the
``.npz`` (ZIP64, uncompressed), so 50k ImageNet samples never sit in RAM at once.
"""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from typing_extensions import override

from lightning_ar.callbacks.sample_writer import SampleWriter, atomic_save_npz, to_uint8_nhwc
from lightning_ar.io import atomic_output
from lightning_ar.metrics.image_io import check_adm_images

PART_GLOB = "samples_rank*_batch*.npz"


def _listing(values: np.ndarray, limit: int = 20) -> str:
    shown = ", ".join(str(int(v)) for v in values[:limit])
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def check_indices(indices: np.ndarray, num_samples: int) -> None:
    """Raise ``ValueError`` unless ``indices`` holds every index of ``0..num_samples-1`` exactly once."""
    bad = indices[(indices < 0) | (indices >= num_samples)]
    counts = np.bincount(indices[(indices >= 0) & (indices < num_samples)], minlength=num_samples)
    duplicates, missing = np.flatnonzero(counts > 1), np.flatnonzero(counts == 0)
    problems = [f"{name}: {_listing(values)}" for name, values in
                (("out of range", np.unique(bad)), ("duplicated", duplicates), ("missing", missing)) if len(values)]
    if problems:
        raise ValueError(f"samples must hold each index 0..{num_samples - 1} exactly once; " + "; ".join(problems))


def part_files(part_dir: str | Path) -> list[Path]:
    """The per-process batch files written by :class:`SampleWriter` in ``part_dir``."""
    files = sorted(Path(part_dir).glob(PART_GLOB))
    if not files:
        raise FileNotFoundError(f"no sample files {PART_GLOB} in {part_dir}")
    return files


def _scan(files: list[Path]) -> tuple[np.ndarray, tuple[int, ...]]:
    """All indices ``[N]`` of the part files and their image shape ``(H, W, C)`` (checked equal)."""
    indices, shape = [], None
    for path in files:
        with np.load(path) as data:
            indices.append(data["indices"].astype(np.int64))
            this = data["images"].shape[1:]
        if shape is not None and this != shape:
            raise ValueError(f"{path}: images {this} differ from the other sample files' {shape}")
        shape = this
    return np.concatenate(indices), shape


def _zip_members(out: Path, arr0_npy: Path, labels: np.ndarray) -> None:
    """Write ``out`` atomically as an ``.npz`` with members ``arr_0`` (from a ``.npy`` file), ``arr_1``, ``labels``."""
    with atomic_output(out) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.write(arr0_npy, "arr_0.npy")
        for name in ("arr_1", "labels"):
            with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, labels)


def gather_adm_npz(part_dir: str | Path, out: str | Path, num_samples: int | None = None) -> int:
    """Gather the :class:`SampleWriter` files of ``part_dir`` into the ADM ``.npz`` ``out`` (ordered by index).

    Args:
        part_dir: Folder of ``samples_rank<R>_batch<NNNNN>.npz`` files.
        out: The ``.npz`` to write (atomically).
        num_samples: Indices expected (``0..num_samples-1``); ``None``: as many as there are samples.

    Returns:
        The number of samples written.

    Raises:
        ValueError: Indices duplicated, missing or out of range (all listed), or images of different shapes.
    """
    files = part_files(part_dir)
    indices, (h, w, c) = _scan(files)
    n = len(indices) if num_samples is None else num_samples
    check_indices(indices, n)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    labels = np.zeros(n, dtype=np.int64)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".gather_") as tmp:
        npy = Path(tmp) / "arr_0.npy"
        images = np.lib.format.open_memmap(npy, mode="w+", dtype=np.uint8, shape=(n, h, w, 3))
        for path in files:
            with np.load(path) as data:
                index = data["indices"].astype(np.int64)
                images[index] = check_adm_images(data["images"], str(path))
                labels[index] = data["labels"]
        images.flush()
        del images
        _zip_members(out, npy, labels)
    return n


def write_pngs(images: np.ndarray, labels: np.ndarray, indices: np.ndarray, png_dir: str | Path) -> None:
    """Write ``uint8`` ``[B, H, W, 3]`` images as ``<png_dir>/<index:06d>_label<label>.png`` (atomically)."""
    from PIL import Image

    for image, label, index in zip(check_adm_images(images, "png export"), labels, indices):
        path = Path(png_dir) / f"{int(index):06d}_label{int(label)}.png"
        with atomic_output(path) as tmp:
            Image.fromarray(image).save(tmp, format="PNG")


class AdmNpzWriter(SampleWriter):
    """A :class:`SampleWriter` that, at the end of ``predict``, gathers all processes' files into an ADM ``.npz``.

    During ``predict`` every process writes its batch files (see :class:`SampleWriter`) and, with ``png_dir``, one
    PNG per sample. After a barrier, process 0 reads all batch files, checks that every requested index ``0..N-1``
    appears exactly once (Lightning's predict sampler under DDP, ``UnrepeatedDistributedSamplerWrapper``, gives each
    process ``rank::world_size`` without padding, so no index repeats) and writes ``<output_dir>/<npz_name>``; an
    error there is raised on every process. ``N`` is the predict data set's length when all its batches run, else
    the number of samples written (a ``limit_predict_batches`` run). Batch files of an earlier run in ``output_dir``
    are deleted when ``predict`` starts.

    Args:
        output_dir: Folder of batch files and of the ``.npz`` (default: ``<log_dir>/predictions``).
        npz_name: File name of the gathered ``.npz``.
        png_dir: Also export each sample as a PNG there (``<index:06d>_label<label>.png``).
        keep_parts: Keep the per-batch files (they hold the latents) after the gather.
    """

    def __init__(self, output_dir: str | None = None, npz_name: str = "samples.npz", png_dir: str | None = None,
                 keep_parts: bool = True) -> None:
        super().__init__(output_dir)
        self.npz_name, self.png_dir, self.keep_parts = npz_name, png_dir, keep_parts
        self._expected: int | None = None

    @override
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loaders = trainer.predict_dataloaders
        loaders = list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
        if len(loaders) != 1:
            raise ValueError(f"AdmNpzWriter supports one predict dataloader, got {len(loaders)}")
        full = trainer.num_predict_batches[0] >= len(loaders[0])
        self._expected = len(loaders[0].dataset) if full else None
        super().on_predict_start(trainer, pl_module)  # resolves the output folder on every process
        if trainer.is_global_zero:
            for stale in self._resolved.glob(PART_GLOB):
                stale.unlink()
        trainer.strategy.barrier("AdmNpzWriter.clean")

    @override
    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: dict[str, Any],
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        images = to_uint8_nhwc(trainer.datamodule.decode(prediction["latents"]))
        labels, indices = prediction["labels"].cpu().numpy(), prediction["indices"].cpu().numpy()
        path = self._dir(trainer) / f"samples_rank{trainer.global_rank}_batch{batch_idx:05d}.npz"
        atomic_save_npz(path, latents=prediction["latents"].float().cpu().numpy(), images=images, labels=labels,
                        indices=indices)
        if self.png_dir:
            write_pngs(images, labels, indices, self.png_dir)

    @override
    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.strategy.barrier("AdmNpzWriter.gather")
        error = None
        if trainer.is_global_zero:
            error = self._gather_on_rank_zero()
        error = trainer.strategy.broadcast(error, src=0)
        if error is not None:
            raise ValueError(f"AdmNpzWriter: {error}")

    def _gather_on_rank_zero(self) -> str | None:
        """Write the ``.npz``; return the error message instead of raising (so that every process can raise it)."""
        part_dir = self._resolved
        try:
            gather_adm_npz(part_dir, part_dir / self.npz_name, self._expected)
        except (ValueError, FileNotFoundError) as err:
            return str(err)
        if not self.keep_parts:
            for path in part_files(part_dir):
                path.unlink()
        return None

