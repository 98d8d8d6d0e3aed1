"""Small helpers shared by the LightningModules."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TypeVar

import numpy as np
import torch

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


def step_seeds(seed: int, step: int, rank: int, count: int = 2) -> list[int]:
    """``count`` independent 63-bit seeds determined by ``(seed, step, rank)`` (numpy's SeedSequence mixes them)."""
    state = np.random.SeedSequence([int(seed), int(step), int(rank)]).generate_state(count, dtype=np.uint64)
    return [int(s) >> 1 for s in state]


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
