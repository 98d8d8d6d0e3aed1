"""The manifest of a latent cache: what went into it, so that a re-run can tell unchanged inputs from changed ones.

``manifest.json`` (written when a cache run starts) records the cache-format version, the encoding settings (VAE id
and a hash of its weights, image size, shard size, dtype) and every image (path relative to the image root, label,
size in bytes, modification time). Each finished shard has a sidecar ``shard_NNNNN.json`` with the digest of the
images it holds and the SHA-256 of its two files; a shard counts as done only when its sidecar matches both the
manifest and the bytes on disk.

A re-run compares the manifest with the current inputs (:func:`describe_changes`): unchanged inputs resume; other
settings are refused (``--overwrite`` re-encodes everything); changed images are refused too, unless ``--update``
re-encodes exactly the shards whose images changed (e.g. after removing a bad image).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lightning_ar.io import atomic_write_text

MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 2


@dataclass(frozen=True)
class CacheSettings:
    """What the bytes of every shard depend on, besides the images."""

    vae: str
    vae_sha256: str
    image_size: int
    shard_size: int
    dtype: str
    version: int = MANIFEST_VERSION


@dataclass
class Manifest:
    """Settings plus the image list ``[relative path, label, size, mtime_ns]`` in item order."""

    settings: CacheSettings
    items: list[list]

    def shard_digest(self, start: int, stop: int) -> str:
        """SHA-256 of the items ``[start, stop)`` (their paths, labels, sizes and times) and the settings."""
        payload = json.dumps([asdict(self.settings), self.items[start:stop]])
        return hashlib.sha256(payload.encode()).hexdigest()

    def write(self, directory: Path) -> None:
        atomic_write_text(directory / MANIFEST_FILE, json.dumps(
            {"settings": asdict(self.settings), "items": self.items}) + "\n")

    @classmethod
    def read(cls, directory: Path) -> Manifest | None:
        """The manifest of ``directory`` (``None`` if it has none); a malformed one raises ``ValueError``."""
        path = directory / MANIFEST_FILE
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text())
            return cls(CacheSettings(**raw["settings"]), [list(item) for item in raw["items"]])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a valid cache manifest ({err}); re-run with --overwrite") from None


def image_records(root: str, samples: Sequence[tuple[str, int]]) -> list[list]:
    """``[relative path, label, size, mtime_ns]`` of each ``(path, label)`` of an ImageFolder."""
    records = []
    for path, label in samples:
        stat = os.stat(path)
        records.append([os.path.relpath(path, root), int(label), int(stat.st_size), int(stat.st_mtime_ns)])
    return records


def weights_sha256(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe_changes(old: Manifest, new: Manifest, limit: int = 3) -> tuple[list[str], list[str]]:
    """``(setting changes, image changes)`` between two manifests, each a list of readable lines ([] if equal)."""
    settings = [f"{key}: {value!r} -> {getattr(new.settings, key)!r}" for key, value in asdict(old.settings).items()
                if getattr(new.settings, key) != value]
    before = {item[0]: item for item in old.items}
    after = {item[0]: item for item in new.items}
    added = [p for p in after if p not in before]
    removed = [p for p in before if p not in after]
    modified = [p for p in after if p in before and after[p] != before[p]]
    images = [f"{len(paths)} image(s) {what} (e.g. {', '.join(paths[:limit])})"
              for what, paths in (("added", added), ("removed", removed), ("modified or relabelled", modified))
              if paths]
    return settings, images
