"""Reliability, soak: repeated fit/checkpoint/resume cycles and generation in one process; RSS must not grow."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_ar import MARGenerator

TINY = dict(latent_shape=(1, 4, 4), num_classes=3, width=16, encoder_depth=1, decoder_depth=1, num_heads=2,
            head_width=16, head_depth=1, num_iter=2, num_sampling_steps=2)
GROWTH_LIMIT_MB = 60


def _rss() -> int:
    """Resident set size of this process in bytes (Linux /proc)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _cycle(root: Path, epochs: int) -> None:
    """One more epoch of training resumed from ``last.ckpt`` (if any), then a generation."""
    data = DataLoader(TensorDataset(torch.randn(32, 1, 4, 4), torch.arange(32) % 3), batch_size=8)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root,
                        callbacks=[EMAWeightAveraging(decay=0.9), ModelCheckpoint(dirpath=root, save_last=True)])
    last = root / "last.ckpt"
    model = MARGenerator(**TINY)
    trainer.fit(model, data, ckpt_path=str(last) if last.is_file() else None)
    model.generate(torch.arange(6) % 3, generator=torch.Generator().manual_seed(0))
    assert trainer.current_epoch == epochs


@pytest.mark.slow
def test_fit_resume_generate_cycles_do_not_grow_memory(tmp_path: Path) -> None:
    rss = _rss()
    for cycle in range(1, 4):  # warm-up: allocator pools, lazy imports
        _cycle(tmp_path, cycle)
    gc.collect()
    before = _rss()
    for cycle in range(4, 16):
        _cycle(tmp_path, cycle)
    gc.collect()
    after = _rss()
    growth = (after - before) / 2**20
    print(f"RSS start {rss / 2**20:.0f} MB, after warm-up {before / 2**20:.0f} MB, after 12 cycles "
          f"{after / 2**20:.0f} MB (+{growth:.1f} MB)")
    assert growth < GROWTH_LIMIT_MB
