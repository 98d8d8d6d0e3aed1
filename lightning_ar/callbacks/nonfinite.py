"""``NonFiniteLoss``: detect a NaN/Inf loss (or gradient) at the step it occurs; skip that step or stop training.

Add it from YAML (``trainer.callbacks``)::

    - class_path: lightning_ar.callbacks.NonFiniteLoss
      init_args:
        policy: skip      # or stop

``skip``: the gradients of that step are dropped before the optimizer runs, so weights, optimizer moments and step
counts are untouched (the LR scheduler still advances one step); ``train/nonfinite_skipped`` counts the skipped
steps. ``stop``: raises :class:`NonFiniteLossError` naming the step and the last good checkpoint (nothing is saved
after the bad step). Under DDP the decision is taken jointly (any process non-finite -> all skip/stop).
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

Policy = Literal["skip", "stop"]


class NonFiniteLossError(RuntimeError):
    """Training stopped on a non-finite loss (policy ``stop``)."""


def _grads_finite(module: torch.nn.Module) -> bool:
    """Whether every gradient is finite, with one host synchronisation (NaN and Inf propagate through ``amax``)."""
    grads = [p.grad.detach().abs().amax() for p in module.parameters() if p.grad is not None and p.grad.numel()]
    return not grads or bool(torch.isfinite(torch.stack(grads).float()).all())


def last_good_checkpoint(trainer: L.Trainer) -> str:
    """Path of the newest checkpoint written by a ``ModelCheckpoint`` of ``trainer`` (or ``'none saved'``)."""
    paths = [c.last_model_path or c.best_model_path for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
    paths = [p for p in paths if p]
    return paths[0] if paths else "none saved"


class NonFiniteLoss(Callback):
    """Check every training loss and gradient for NaN/Inf; ``policy`` ``skip`` (count, log) or ``stop`` (raise).

    Args:
        policy: ``skip`` or ``stop``.
    """

    def __init__(self, policy: Policy = "skip") -> None:
        if policy not in ("skip", "stop"):
            raise ValueError(f"NonFiniteLoss.policy must be 'skip' or 'stop', got {policy!r}")
        self.policy, self.skipped, self._loss_finite = policy, 0, True

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        self._loss_finite = bool(torch.isfinite(loss.detach()).all())

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        bad = not (self._loss_finite and _grads_finite(pl_module))
        if not trainer.strategy.reduce_boolean_decision(bad, all=False):
            return
        step = trainer.global_step
        optimizer.zero_grad(set_to_none=True)  # the optimizer skips parameters without gradients
        if self.policy == "stop":
            raise NonFiniteLossError(
                f"non-finite training loss or gradient at step {step} (epoch {trainer.current_epoch}); "
                f"training stopped; last good checkpoint: {last_good_checkpoint(trainer)}"
            )
        self.skipped += 1
        rank_zero_warn(f"non-finite training loss or gradient at step {step}: step skipped ({self.skipped} so far)")
        pl_module.log("train/nonfinite_skipped", float(self.skipped), on_step=True, on_epoch=False,
                      reduce_fx="max", batch_size=1)

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
