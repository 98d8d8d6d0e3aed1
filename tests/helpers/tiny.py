"""Tiny generator settings and checkpoints for fast tests."""

from __future__ import annotations

from pathlib import Path

import torch

from lightning_ar import MARGenerator
from lightning_ar.checkpoints.loading import record_class

TINY = dict(width=32, encoder_depth=1, decoder_depth=1, num_heads=2, head_width=32, head_depth=1, num_iter=4,
            num_sampling_steps=5)


def save_generator_checkpoint(path: str | Path, source: str = "digits", **overrides: object) -> str:
    """Write a Lightning checkpoint of an untrained tiny generator for ``source`` (``digits`` or ``gmm``)."""
    import lightning as L

    from lightning_ar import LatentDataModule

    dm = LatentDataModule(source)
    patch = 2 if source == "digits" else 1
    model = MARGenerator(dm.latent_shape, dm.num_classes, dm.latent_scale, **{**TINY, "patch_size": patch,
                                                                              **overrides})
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
            "pytorch-lightning_version": L.__version__}
    record_class(model, ckpt)  # as every checkpoint Lightning saves records it
    torch.save(ckpt, path)
    return str(path)


def random_head(seed: int = 0):
    """A small :class:`~lightning_ar.nn.DiffusionLoss` (tokens of 4, conditions of 8, width 32, 3 blocks) in eval mode
    with every weight drawn from N(0, 0.2): the zero-initialised modulations would make every block the identity."""
    from lightning_ar.nn import DiffusionLoss

    torch.manual_seed(seed)
    head = DiffusionLoss(token_dim=4, cond_dim=8, width=32, depth=3)
    for p in head.parameters():
        p.data.normal_(0, 0.2)
    return head.eval()
