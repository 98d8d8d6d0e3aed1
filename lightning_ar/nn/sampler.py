"""MAR's sampling loop: reveal tokens over ``num_iter`` AR steps in a random order per sample.

At each step the transformer turns the tokens generated so far into conditions, the tokens scheduled for this step
are sampled by the diffusion head (all of the batch at once), and the mask shrinks along the cosine schedule.
"""

from __future__ import annotations

import math
import numbers
from typing import Literal, Protocol

import torch
from torch import Tensor

from lightning_ar.nn.diffusion_loss import SAMPLERS, DiffusionLoss
from lightning_ar.nn.mar import MaskedAutoregressiveTransformer
from lightning_ar.nn.masking import cosine_schedule, mask_from_orders, random_orders
from lightning_ar.nn.trace import GenerationTrace
from lightning_ar.progress import progress_bar

CfgSchedule = Literal["linear", "constant"]


class ConditionRefiner(Protocol):
    """Hook that moves the conditions of the tokens predicted at one AR step (e.g. the OT refinement)."""

    def __call__(self, z: Tensor, labels: Tensor, positions: Tensor, step: int) -> Tensor:
        """``z`` ``[N, D]``, ``labels`` ``[N]``, ``positions`` ``[N]`` -> refined ``[N, D]``.

        A hook with ``refine_null = True`` also gets ``null(z_null, positions, step)`` for the null branch.
        """
        ...


def cfg_at_step(cfg: float, schedule: CfgSchedule, num_masked_after: int, seq_len: int) -> float:
    """Guidance scale of one step: MAR's linear ramp ``1 + (cfg-1) * (L - mask_len)/L``, or constant."""
    if schedule == "constant":
        return cfg
    return 1.0 + (cfg - 1.0) * (seq_len - num_masked_after) / seq_len


def check_sampling_args(
    labels: Tensor,
    num_classes: int,
    seq_len: int,
    num_iter: int,
    sampler: str,
    cfg_schedule: str,
    temperature: float,
    *,
    cfg: float = 1.0,
    num_sampling_steps: int = 1,
) -> None:
    """Raise ``ValueError`` naming the argument when a sampling argument has the wrong type or is out of range.

    Args:
        labels: ``[B]`` integer class labels (``B >= 1``).
        num_classes: Number of classes of the model.
        seq_len: Number of tokens.
        num_iter: AR steps, an integer in ``[1, seq_len]``.
        sampler: One of :data:`SAMPLERS`.
        cfg_schedule: ``linear`` or ``constant``.
        temperature: A finite number ``> 0``.
        cfg: A finite guidance scale.
        num_sampling_steps: Denoising steps of the head, an integer ``>= 1`` (the head checks its upper bound).
    """
    if not isinstance(labels, Tensor) or labels.ndim != 1 or labels.dtype not in (torch.int32, torch.int64):
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        dtype = labels.dtype if isinstance(labels, Tensor) else None
        raise ValueError(f"labels must be a 1-D integer tensor [B], got dtype {dtype} shape {shape}")
    if labels.numel() == 0:
        raise ValueError("labels must hold at least one label, got an empty tensor")
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes - 1}] (num_classes={num_classes}), got {labels.tolist()}")
    if not _is_int(num_iter) or not 1 <= num_iter <= seq_len:
        raise ValueError(f"num_iter must be an integer in [1, {seq_len}] (the number of tokens), got {num_iter!r}")
    if not _is_int(num_sampling_steps) or num_sampling_steps < 1:
        raise ValueError(f"num_sampling_steps must be an integer >= 1, got {num_sampling_steps!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if cfg_schedule not in ("linear", "constant"):
        raise ValueError(f"cfg_schedule must be 'linear' or 'constant', got {cfg_schedule!r}")
    if not _is_real(temperature) or not math.isfinite(temperature) or not temperature > 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not _is_real(cfg) or not math.isfinite(cfg):
        raise ValueError(f"cfg must be a finite number, got {cfg!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _conditions(mar: MaskedAutoregressiveTransformer, tokens: Tensor, mask: Tensor, labels: Tensor, guided: bool):
    """Conditional ``[B, L, D]`` and null ``[B, L, D]`` (or ``None``) conditions in one batched pass."""
    if not guided:
        return mar(tokens, mask, labels), None
    z = mar(torch.cat([tokens, tokens]), torch.cat([mask, mask]), torch.cat([labels, torch.full_like(labels, -1)]))
    return z.chunk(2)


@torch.no_grad()
def sample_tokens(
    mar: MaskedAutoregressiveTransformer,
    head: DiffusionLoss,
    labels: Tensor,
    num_iter: int,
    cfg: float = 1.0,
    cfg_schedule: CfgSchedule = "linear",
    temperature: float = 1.0,
    num_sampling_steps: int = 100,
    sampler: str = "ddpm",
    generator: torch.Generator | None = None,
    trace: GenerationTrace | None = None,
    refiner: ConditionRefiner | None = None,
    progress: bool = False,
) -> Tensor:
    """Generate token sequences for ``labels``.

    Args:
        mar: The transformer (in eval mode).
        head: The diffusion head.
        labels: ``[B]`` class labels.
        num_iter: Number of AR steps (``1..L``).
        cfg: Guidance scale; ``1`` disables guidance (no null branch is computed).
        cfg_schedule: ``"linear"`` (MAR) or ``"constant"``.
        temperature: Noise temperature of the head sampler.
        num_sampling_steps: Denoising steps of the head per AR step.
        sampler: ``"ddpm"``, ``"ddim"`` or ``"dpm++"``.
        generator: RNG on ``labels``' device, for orders and all noise.
        trace: Filled with one record per AR step when given.
        refiner: Optional hook applied to the conditional-branch conditions of each step.
        progress: Show a progress bar over AR steps.

    Returns:
        ``[B, L, token_dim]`` tokens.
    """
    check_sampling_args(labels, mar.num_classes, mar.seq_len, num_iter, sampler, cfg_schedule, temperature, cfg=cfg,
                        num_sampling_steps=num_sampling_steps)
    b, seq_len, device = labels.shape[0], mar.seq_len, labels.device
    tokens = torch.zeros(b, seq_len, head.token_dim, device=device)
    mask = torch.ones(b, seq_len, dtype=torch.bool, device=device)
    orders = random_orders(b, seq_len, generator, device)
    if trace is not None:
        trace.labels = trace._store(labels)
    schedule = cosine_schedule(seq_len, num_iter)
    for k in progress_bar(range(num_iter), desc="AR steps", disable=not progress, leave=False):
        z, z_null = _conditions(mar, tokens, mask, labels, guided=cfg != 1.0)  # (B, L, D) each
        mask_next = mask_from_orders(orders, schedule[k])
        to_pred = mask & ~mask_next  # (B, L)
        n = int(to_pred[0].sum())
        positions = to_pred.nonzero()[:, 1].view(b, n)  # (B, n)
        z_k = z[to_pred]  # (B*n, D)
        z_raw = z_k
        if refiner is not None:
            z_k = refiner(z_k, labels.repeat_interleave(n), positions.reshape(-1), k)
        z_null_k = z_null[to_pred] if z_null is not None else None
        if z_null_k is not None and getattr(refiner, "refine_null", False):
            z_null_k = refiner.null(z_null_k, positions.reshape(-1), k)
        cfg_k = cfg_at_step(cfg, cfg_schedule, schedule[k], seq_len)
        sampled = head.sample(z_k, z_null_k, cfg_k, temperature, sampler, num_sampling_steps, generator)
        tokens[to_pred] = sampled.to(tokens.dtype)
        mask = mask_next
        if trace is not None:
            trace.record(
                k, schedule[k], cfg_k,
                positions=positions, conditions=z_k.view(b, n, -1), tokens=sampled.view(b, n, -1),
                raw_conditions=z_raw.view(b, n, -1) if refiner is not None else None,
                null_conditions=z_null_k.view(b, n, -1) if z_null_k is not None else None,
            )
    return tokens
