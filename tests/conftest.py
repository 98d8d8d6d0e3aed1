"""Shared fixtures: a per-session cache for the digits classifier, tiny generators, a CPU-friendly setup."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from lightning_ar import MARGenerator

TINY = dict(width=32, encoder_depth=1, decoder_depth=1, num_heads=2, head_width=32, head_depth=1, num_iter=4,
            num_sampling_steps=5)


@pytest.fixture(autouse=True, scope="session")
def _session_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the digits classifier of the tests in one temporary cache (trained once per session)."""
    os.environ.setdefault("LIGHTNING_AR_CACHE", str(tmp_path_factory.mktemp("lightning_ar_cache")))
    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for the test (tiny tensors: two threads contend on a busy 2-core machine; and CPU results
    that are compared byte for byte change in the last bits with the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_generator() -> MARGenerator:
    """A tiny digits-shaped generator (1x8x8 latents, patch 2 -> 16 tokens of dim 4)."""
    torch.manual_seed(0)
    return MARGenerator(latent_shape=(1, 8, 8), num_classes=10, latent_scale=1.3, **TINY)


def save_generator_checkpoint(path, source: str = "digits", **overrides) -> str:
    """Write a Lightning checkpoint of an untrained tiny generator for ``source`` (``digits`` or ``gmm``)."""
    import lightning as L

    from lightning_ar import LatentDataModule

    dm = LatentDataModule(source)
    patch = 2 if source == "digits" else 1
    model = MARGenerator(dm.latent_shape, dm.num_classes, dm.latent_scale, **{**TINY, "patch_size": patch,
                                                                              **overrides})
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": L.__version__}, path)
    return str(path)
