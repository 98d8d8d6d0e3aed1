"""``AtomicCheckpointIO``: checkpoint files that are either complete or absent, also when the process is killed.

Lightning's ``TorchCheckpointIO`` writes local files through an fsspec transaction, which stages the file in the
system temporary directory and *moves* it into place; across file systems that move is a copy, so a run killed (or a
disk filling up) during the copy leaves a truncated ``.ckpt`` where the checkpoint should be. This plug-in writes a
temporary file in the checkpoint's own directory, flushes it to disk and renames it over the target with
``os.replace`` (atomic on POSIX and Windows). Remote paths (``s3://``, ...) keep Lightning's behaviour.

The ``lightning-ar`` CLI installs it when the configured strategy uses the plain ``TorchCheckpointIO``; in your own
``Trainer`` pass ``plugins=[AtomicCheckpointIO()]``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import fsspec
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are temporary file + fsync + ``os.replace`` in the target directory."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or fsspec.utils.get_protocol(str(path)) != "file":
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
