"""``--ckpt_path last`` that finds the last checkpoint whatever the logger version, or says why it cannot.

With a logger, Lightning puts checkpoints under ``<save_dir>/<name>/version_<n>/checkpoints`` and gives every new run
the next version, so a plain ``--ckpt_path last`` looks in the new, empty version and (with a warning only) trains
from step 0. :func:`resume_last` instead points the first logger at the newest version that holds a last checkpoint
(logs and checkpoints of the resumed run continue there), and raises when there is nothing to resume.
"""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_ar.errors import UsageError

_VERSION = re.compile(r"^version_(\d+)$")


class NothingToResumeError(UsageError):
    """``--ckpt_path last`` was given but no last checkpoint exists where this run would write one."""


def lightning_last_checkpoints(trainer: L.Trainer) -> list[Path]:
    """The ``last*.ckpt`` files the trainer's ``ModelCheckpoint`` callbacks would resume from (Lightning's search)."""
    found: set[str] = set()
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint):
            found |= callback._find_last_checkpoints(trainer)  # what Trainer(ckpt_path="last") itself calls
    return sorted((Path(p) for p in found if Path(p).exists()), key=lambda p: p.stat().st_mtime)


def _versions_with_checkpoints(logger: TensorBoardLogger | CSVLogger) -> list[tuple[float, int]]:
    """``(mtime of the newest last*.ckpt, n)`` for every ``version_<n>`` under the logger's root that holds one."""
    root = Path(logger.root_dir)
    if not root.is_dir():
        return []
    versions = []
    for child in root.iterdir():
        match = _VERSION.match(child.name)
        lasts = [p for p in (child / "checkpoints").glob("last*.ckpt") if p.exists()] if match else []
        if lasts:
            versions.append((max(p.stat().st_mtime for p in lasts), int(match.group(1))))
    return sorted(versions)


def resume_last(trainer: L.Trainer) -> Path:
    """Prepare ``trainer`` to resume with ``ckpt_path="last"`` and return the checkpoint it will load.

    When the first logger is a TensorBoard or CSV logger without an explicit version, it is set to the newest version
    holding a last checkpoint; then Lightning's own search (``ModelCheckpoint`` directories) decides.

    Raises:
        NothingToResumeError: no last checkpoint exists (named: where it was looked for).
    """
    logger = trainer.loggers[0] if trainer.loggers else None
    if isinstance(logger, (TensorBoardLogger, CSVLogger)) and logger._version is None:
        versions = _versions_with_checkpoints(logger)
        if versions:
            logger._version = versions[-1][1]  # the public version property has no setter
    found = lightning_last_checkpoints(trainer)  # (reading a logger's version without one picks the next)
    if not found:
        where = Path(logger.root_dir) / "version_*" / "checkpoints" if isinstance(
            logger, (TensorBoardLogger, CSVLogger)) else "the ModelCheckpoint directories"
        raise NothingToResumeError(
            f"--ckpt_path last: no last checkpoint to resume from (looked in {where}); start the run without "
            "--ckpt_path, or give the checkpoint file itself"
        )
    return found[-1]
