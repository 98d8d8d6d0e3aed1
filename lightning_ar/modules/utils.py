"""Small helpers shared by the LightningModules."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch

from lightning_ar.seeding import seeded_generator

T = TypeVar("T")


def default(value: T | None, fallback: T) -> T:
    """``fallback`` when ``value`` is ``None``, else ``value`` (never ``value or fallback``: 0 is not "unset")."""
    return fallback if value is None else value


def check_finite_hparams(hparams: Mapping[str, object], prefix: str = "model") -> None:
    """Raise ``ValueError`` naming the option if any numeric hyper-parameter (or tuple entry) is NaN or infinite."""
    for name, value in hparams.items():
        values = value if isinstance(value, (tuple, list)) else (value,)
        for v in values:
            if isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isfinite(v):
                raise ValueError(f"{prefix}.{name} must be a finite number, got {value!r}")


def check_latent_shape(latent_shape: Sequence[int], patch_size: int) -> tuple[int, int, int]:
    """Validate ``model.latent_shape`` ``(C, H, W)`` against ``model.patch_size``; return it as a tuple."""
    shape = tuple(int(s) for s in latent_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"model.latent_shape must be (C, H, W) with positive sizes, got {tuple(latent_shape)}")
    if patch_size < 1 or shape[1] % patch_size or shape[2] % patch_size:
        raise ValueError(f"model.patch_size={patch_size} must divide the latent height and width {shape[1:]}")
    return shape


@contextmanager
def fork_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Seed the global RNG of the CPU (and ``device`` when it is CUDA) with ``seed``; restore both afterwards."""
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def check_state_shapes(saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], limit: int = 4) -> str:
    """Describe missing/unexpected keys and shape mismatches between two state dicts ('' when they agree)."""
    problems = [f"{k} {tuple(saved[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                if k in saved and tuple(saved[k].shape) != tuple(v.shape)]
    problems += [f"{k} missing" for k in expected if k not in saved]
    problems += [f"{k} unexpected" for k in saved if k not in expected]
    more = f" (+{len(problems) - limit} more)" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


def predict_block(generate: Callable[..., torch.Tensor], batch: tuple[torch.Tensor, torch.Tensor],
                  device: torch.device) -> dict[str, torch.Tensor]:
    """One latent per ``(label, index)`` of a predict batch, seeded by the batch's first index.

    ``LatentDataModule.predict_dataloader`` hands whole index blocks ``[k*B, (k+1)*B)`` to the processes, so the
    output for an index depends on ``(index, batch_size)`` only, not on the number of processes.

    Args:
        generate: The module's ``generate(labels, generator=...)``.
        batch: ``labels`` ``[B]`` and ``indices`` ``[B]``.
        device: Device of the generator.

    Returns:
        ``latents`` ``[B, C, H, W]``, ``labels`` and ``indices``.
    """
    labels, indices = batch
    return {"latents": generate(labels, generator=seeded_generator(int(indices[0]), device=device)),
            "labels": labels, "indices": indices}


def partial_last_batch(loader: object) -> tuple[int, int] | None:
    """``(items, batch_size)`` of the smaller last batch a training ``DataLoader`` yields each epoch on this process,
    or ``None`` (it drops it, divides evenly, or its sampler has no length)."""
    batch_size = getattr(loader, "batch_size", None)
    if getattr(loader, "drop_last", True) or not batch_size:
        return None
    try:
        rest = len(loader.sampler) % batch_size  # type: ignore[attr-defined]
    except TypeError:
        return None
    return (rest, batch_size) if rest else None
