"""Optimizer parameter groups shared by the LightningModules, and MAR's learning-rate recipe read from the run.

MAR's recipe (SPEC 2.1) is ``lr = base_lr x global batch / 256`` with a linear warmup over a number of *epochs*, then a
constant rate. Both depend on the run: the global batch on the world size, the per-process batch size and gradient
accumulation; the warmup steps on the optimizer steps per epoch, i.e. on the dataset length and the global batch.
:func:`run_geometry` reads them from the Trainer when ``configure_optimizers`` runs, so a config carries the recipe
(``base_lr``, ``warmup_epochs``) and no number that changes with the number of devices.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

REFERENCE_BATCH = 256  # lr = base_lr x global batch / 256 (MAR, MAE, DiT)


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


@dataclass(frozen=True)
class RunGeometry:
    """What the learning-rate recipe reads from a run.

    Attributes:
        world_size: Processes (devices x nodes).
        batch_size: Samples per process per batch.
        accumulate_grad_batches: Batches per optimizer step.
        steps_per_epoch: Optimizer steps per epoch (every process takes the same number).
    """

    world_size: int
    batch_size: int
    accumulate_grad_batches: int
    steps_per_epoch: int

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step over all processes."""
        return self.world_size * self.batch_size * self.accumulate_grad_batches


def run_geometry(trainer: Any) -> RunGeometry:
    """The :class:`RunGeometry` of a Trainer in ``fit`` (call from ``configure_optimizers``).

    Steps per epoch are ``ceil(trainer.num_training_batches / accumulate_grad_batches)``, Lightning's own count after
    the train data is set up (sharded by the world size, batched, ``limit_train_batches`` applied); the batch size is
    the train loader's (or the data module's ``batch_size``).

    Raises:
        ValueError: no train data with a length, or no batch size to read.
    """
    _ = trainer.estimated_stepping_batches  # public API: sets up the train dataloader when not yet done
    batches = trainer.num_training_batches
    if not math.isfinite(batches) or batches < 1:
        raise ValueError("model.base_lr/warmup_epochs need a train dataloader with a finite length "
                         f"(Lightning counts {batches} batches per epoch)")
    loader = trainer.train_dataloader
    batch_size = getattr(loader, "batch_size", None) or getattr(trainer.datamodule, "batch_size", None)
    if not batch_size:
        raise ValueError("model.base_lr needs the per-process batch size: neither the train dataloader nor the data "
                         "module has a batch_size")
    accumulate = trainer.accumulate_grad_batches
    return RunGeometry(trainer.world_size, int(batch_size), accumulate, math.ceil(batches / accumulate))


class LinearWarmup:
    """``LambdaLR`` factor ``min(1, step / warmup_steps)``: MAR's per-iteration linear warmup from 0, then 1.

    Args:
        warmup_steps: Optimizer steps of the warmup (``>= 1``).
    """

    def __init__(self, warmup_steps: int) -> None:
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps}")
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        return min(1.0, step / self.warmup_steps)


def check_lr_recipe(base_lr: float | None, warmup_epochs: float | None, lr_scheduler: Any) -> None:
    """Raise ``ValueError`` naming the option for a non-positive ``base_lr``, a negative ``warmup_epochs``, or
    ``warmup_epochs`` together with an injected ``lr_scheduler``."""
    if base_lr is not None and not base_lr > 0:
        raise ValueError(f"model.base_lr must be > 0, got {base_lr}")
    if warmup_epochs is not None and not warmup_epochs >= 0:
        raise ValueError(f"model.warmup_epochs must be >= 0, got {warmup_epochs}")
    if warmup_epochs is not None and lr_scheduler is not None:
        raise ValueError("model.warmup_epochs and model.lr_scheduler exclude each other: warmup_epochs builds the "
                         "warmup schedule from the run; drop one of them")


def apply_lr_recipe(optimizer: torch.optim.Optimizer, base_lr: float | None, warmup_epochs: float | None,
                    geometry: RunGeometry) -> Any | None:
    """Set every group's lr to ``base_lr x global_batch / 256`` (when ``base_lr``) and return a warmup scheduler over
    ``round(warmup_epochs x steps_per_epoch)`` steps (when ``warmup_epochs > 0``; else ``None``)."""
    messages = []
    if base_lr is not None:
        lr = base_lr * geometry.global_batch / REFERENCE_BATCH
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.defaults["lr"] = lr
        messages.append(f"lr {lr:.4g} = base_lr {base_lr:g} x global batch {geometry.global_batch} "
                        f"({geometry.world_size} x {geometry.batch_size} x {geometry.accumulate_grad_batches}) / 256")
    scheduler = None
    steps = round((warmup_epochs or 0) * geometry.steps_per_epoch)
    if steps > 0:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LinearWarmup(steps))
        messages.append(f"linear warmup over {steps} steps = {warmup_epochs:g} epochs x "
                        f"{geometry.steps_per_epoch} steps per epoch, then constant")
    if messages:
        rank_zero_info("Learning-rate recipe: " + "; ".join(messages))
    return scheduler


def configure_adamw(
    module: nn.Module,
    no_decay_modules: Iterable[nn.Module],
    optimizer_factory: Callable[[list[dict]], torch.optim.Optimizer] | None,
    lr_scheduler_factory: Callable[[torch.optim.Optimizer], Any] | None,
    base_lr: float | None = None,
    warmup_epochs: float | None = None,
    geometry: RunGeometry | None = None,
) -> Any:
    """What ``configure_optimizers`` returns: the (injected or default) optimizer over :func:`adamw_param_groups`,
    with the injected LR scheduler (or the warmup of ``warmup_epochs``) stepped every optimizer step.

    ``base_lr``/``warmup_epochs`` apply MAR's recipe with the run's ``geometry`` (see :func:`apply_lr_recipe`);
    without them the optimizer and scheduler are exactly the injected ones.
    """
    groups = adamw_param_groups(module, no_decay_modules)
    optimizer = optimizer_factory(groups) if optimizer_factory else default_optimizer(groups)
    scheduler = None
    if base_lr is not None or warmup_epochs is not None:
        if geometry is None:
            raise ValueError("model.base_lr/warmup_epochs need the run's geometry (a Trainer in fit)")
        scheduler = apply_lr_recipe(optimizer, base_lr, warmup_epochs, geometry)
    if lr_scheduler_factory is not None:
        scheduler = lr_scheduler_factory(optimizer)
    if scheduler is None:
        return optimizer
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
