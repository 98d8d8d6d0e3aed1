"""Shared fixtures: a per-session cache for the digits classifier, tiny generators, a CPU-friendly setup.

Helpers that tests import live in ``tests/helpers`` (on the path by ``pythonpath`` in ``pyproject.toml``), never here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from helpers.tiny import TINY

from lightning_ar import MARGenerator


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

