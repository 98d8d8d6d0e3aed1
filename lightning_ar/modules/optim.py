"""Optimizer parameter groups shared by the LightningModules."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def adamw_param_groups(module: nn.Module, no_decay_modules: Iterable[nn.Module] = ()) -> list[dict]:
    """Split trainable parameters into a decayed group and a ``weight_decay=0`` group.

    No decay for: parameters with fewer than 2 dimensions (biases, norm weights), names ending in ``bias`` and
    every parameter of ``no_decay_modules`` (MAR exempts its diffusion head).

    Returns:
        ``[{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]``; the first group takes the optimizer's
        own ``weight_decay``.
    """
    exempt = {id(p) for m in no_decay_modules for p in m.parameters()}
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or name.endswith("bias") or id(param) in exempt:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


def default_optimizer(groups: list[dict]) -> torch.optim.Optimizer:
    """MAR's optimizer: AdamW, lr 1e-4, betas (0.9, 0.95), weight decay 0.02."""
    return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.02)
