"""Reading checkpoint files safely, with errors that name the file and the likely cause.

Trust model: a checkpoint is data, never code. Every checkpoint a user hands to this project (``--ckpt_path``,
``model.generator``, ``import-mar --checkpoint``, a VAE checkpoint) is read with ``torch.load(weights_only=True)``,
which unpickles tensors, containers and primitive values only (plus the few types allow-listed below); a file that
needs anything else is refused instead of executing pickled code.
"""

from __future__ import annotations

import argparse
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lightning_ar.errors import UsageError

# Types besides tensors and plain containers that checkpoints read here may hold: MAR's official checkpoints store
# their argparse arguments.
SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)

# Where a checkpoint records the class that wrote it (besides LightningCLI's ``hyper_parameters._class_path``).
CLASS_KEY = "lightning_ar_class"


class CheckpointError(UsageError):
    """A checkpoint file that cannot be used: missing, truncated, not a checkpoint, or another model's."""


def load_checkpoint_file(path: str | Path, what: str = "checkpoint", map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with errors naming ``what`` (the option), the file and the cause.

    Args:
        path: The file.
        what: The option or argument it was given as (e.g. ``--ckpt_path``), for the messages.
        map_location: Passed to ``torch.load``.

    Returns:
        The unpickled object.

    Raises:
        CheckpointError: no such file, truncated or not a torch file, or it needs types beyond plain data (unsafe).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what}: {path} does not exist (or is not a file)")
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = [line.strip() for line in str(err).splitlines() if "unsupported global" in line.lower()]
        if found:
            raise CheckpointError(
                f"{what}: {path} holds pickled objects beyond tensors and plain values; it is refused because "
                f"loading it could run code from the file (see the README's trust model). {found[0][:300]}"
            ) from None
        raise _unreadable(what, path, err) from None
    except (RuntimeError, EOFError, KeyError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise _unreadable(what, path, err) from None


def _unreadable(what: str, path: Path, err: BaseException) -> CheckpointError:
    size = path.stat().st_size
    return CheckpointError(
        f"{what}: {path} ({size} bytes) is not a readable torch checkpoint: truncated (an interrupted write?) "
        f"or not a checkpoint at all ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})"
    )



def load_lightning_checkpoint(path: str | Path, what: str = "--ckpt_path") -> dict[str, Any]:
    """A Lightning checkpoint dict (``state_dict`` + ``hyper_parameters``), read safely.

    Raises:
        CheckpointError: missing, unreadable, or not a Lightning checkpoint (e.g. an official MAR ``.pth``).
    """
    ckpt = load_checkpoint_file(path, what)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        hint = " (an official MAR checkpoint? convert it with `lightning-ar import-mar`)" if isinstance(
            ckpt, dict) and ("model" in ckpt or "model_ema" in ckpt) else ""
        raise CheckpointError(f"{what}: {path} is not a Lightning checkpoint: no 'state_dict' (found {keys}){hint}")
    return ckpt


def class_path_of(obj_or_cls: Any) -> str:
    """``module.QualName`` of a class or of an object's class."""
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    return f"{cls.__module__}.{cls.__qualname__}"


def resolve_class(path: str) -> type | None:
    """The class named by a dotted path (``lightning_ar.MARGenerator``), or ``None`` if it cannot be imported."""
    import importlib

    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def checkpoint_class(ckpt: dict[str, Any]) -> str | None:
    """The class that wrote a checkpoint: LightningCLI's ``_class_path`` or this project's own record."""
    hparams = ckpt.get("hyper_parameters") or {}
    return hparams.get("_class_path") or ckpt.get(CLASS_KEY)


def record_class(module: Any, checkpoint: dict[str, Any]) -> None:
    """Store the class of ``module`` in ``checkpoint`` (called from ``on_save_checkpoint``)."""
    checkpoint[CLASS_KEY] = class_path_of(module)


def build_from_checkpoint(
    path: str | Path, what: str, allowed: tuple[type, ...], fallback: Callable[[dict[str, Any]], type]
) -> Any:
    """Rebuild the LightningModule saved in ``path`` (read safely) with its hyper-parameters and weights.

    Args:
        path: A Lightning checkpoint.
        what: The option it was given as, for messages.
        allowed: Classes it may hold.
        fallback: Class for a checkpoint that records none (called with its hyper-parameters).

    Raises:
        CheckpointError: unreadable, another class than ``allowed``, or hyper-parameters that do not fit the class.
    """
    saved = load_lightning_checkpoint(path, what)
    hparams = {k: v for k, v in (saved.get("hyper_parameters") or {}).items() if not k.startswith("_")}
    recorded = checkpoint_class(saved)
    cls = resolve_class(recorded) if recorded else fallback(hparams)
    if cls not in allowed:
        raise CheckpointError(f"{what}: {path} holds a {recorded}, not one of {[c.__name__ for c in allowed]}")
    try:
        model = cls(**hparams)
    except TypeError as err:
        raise CheckpointError(f"{what}: {path} holds no {cls.__name__} hyper-parameters ({err})") from None
    model.on_load_checkpoint(saved)  # the class's own checks (shapes, latent scale) with clear messages
    model.load_state_dict(saved["state_dict"])
    return model
