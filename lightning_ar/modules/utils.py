"""Small helpers shared by the LightningModules."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` (and all children) in eval mode, restoring each submodule's own mode afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def check_latent_shape(latent_shape: Sequence[int], patch_size: int) -> tuple[int, int, int]:
    """Validate ``model.latent_shape`` ``(C, H, W)`` against ``model.patch_size``; return it as a tuple."""
    shape = tuple(int(s) for s in latent_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"model.latent_shape must be (C, H, W) with positive sizes, got {tuple(latent_shape)}")
    if patch_size < 1 or shape[1] % patch_size or shape[2] % patch_size:
        raise ValueError(f"model.patch_size={patch_size} must divide the latent height and width {shape[1:]}")
    return shape
