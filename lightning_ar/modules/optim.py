"""Optimizer parameter groups shared by the LightningModules."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

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


def configure_adamw(
    module: nn.Module,
    no_decay_modules: Iterable[nn.Module],
    optimizer_factory: Callable[[list[dict]], torch.optim.Optimizer] | None,
    lr_scheduler_factory: Callable[[torch.optim.Optimizer], Any] | None,
) -> Any:
    """What ``configure_optimizers`` returns: the (injected or default) optimizer over :func:`adamw_param_groups`,
    with the injected LR scheduler stepped every optimizer step."""
    groups = adamw_param_groups(module, no_decay_modules)
    optimizer = optimizer_factory(groups) if optimizer_factory else default_optimizer(groups)
    if lr_scheduler_factory is None:
        return optimizer
    scheduler = lr_scheduler_factory(optimizer)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
