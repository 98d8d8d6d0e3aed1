"""MAR's sampling loop: reveal tokens over ``num_iter`` AR steps in a random order per sample.

At each step the transformer turns the tokens generated so far into conditions, the tokens scheduled for this step
are sampled by the diffusion head (all of the batch at once), and the mask shrinks along the cosine schedule.
"""

from __future__ import annotations

import time
from typing import Protocol

import torch
from torch import Tensor

from lightning_ar.nn.context_features import ContextSpec
from lightning_ar.nn.diffusion_loss import DiffusionLoss
from lightning_ar.nn.mar import MaskedAutoregressiveTransformer
from lightning_ar.nn.masking import cosine_schedule, mask_from_orders, random_orders
from lightning_ar.nn.sampling_options import CfgSchedule, SamplingOptions, check_labels
from lightning_ar.nn.sampling_run import SamplingRun
from lightning_ar.progress import progress_bar


class ConditionRefiner(Protocol):
    """Hook that moves the conditions of the tokens predicted at one AR step (e.g. the OT refinement).

    ``refine_null``: whether the samplers also pass the null (CFG) branch to :meth:`null`. ``context_spec``
    (optional; ``None`` when absent): a :class:`~lightning_ar.nn.context_features.ContextSpec`; when set, the
    samplers compute each condition's context feature from the step's revealed tokens and pass it as ``context``.
    """

    refine_null: bool

    def __call__(self, z: Tensor, labels: Tensor, positions: Tensor, step: int) -> Tensor:
        """``z`` ``[N, D]``, ``labels`` ``[N]``, ``positions`` ``[N]`` -> refined ``[N, D]`` (hooks with a
        ``context_spec`` also take ``context=`` ``[N, Fc]``)."""
        ...

    def null(self, z_null: Tensor, positions: Tensor, step: int) -> Tensor:
        """Null-branch conditions ``[N, D]`` at ``positions`` ``[N]`` -> refined ``[N, D]`` (with ``refine_null``)."""
        ...


def cfg_at_step(cfg: float, schedule: CfgSchedule, num_masked_after: int, seq_len: int) -> float:
    """Guidance scale of one step: MAR's linear ramp ``1 + (cfg-1) * (L - mask_len)/L``, or constant."""
    if schedule == "constant":
        return cfg
    return 1.0 + (cfg - 1.0) * (seq_len - num_masked_after) / seq_len


def context_spec_of(refiner: ConditionRefiner | None) -> ContextSpec | None:
    """The hook's context feature spec (``None``: it takes no context; hooks may omit the attribute)."""
    return getattr(refiner, "context_spec", None)


def call_hook(hook: ConditionRefiner, z: Tensor, labels: Tensor, positions: Tensor, step: int,
              context: Tensor | None = None) -> Tensor:
    """``hook(z, labels, positions, step)``, with ``context=`` ``[N, Fc]`` for a hook with a ``context_spec``."""
    if context is not None and context_spec_of(hook) is not None:
        return hook(z, labels, positions, step, context=context)
    return hook(z, labels, positions, step)


def refine_conditions_of_step(refiner: ConditionRefiner | None, z: Tensor, z_null: Tensor | None, labels: Tensor,
                              positions: Tensor, step: int, timed: bool = True, context: Tensor | None = None
                              ) -> tuple[Tensor, Tensor | None, float]:
    """Apply a refinement hook to one step's conditional ``z`` ``[N, D]`` (and, if it asks for it, null ``z_null``
    ``[N, D]``) conditions of classes ``labels`` ``[N]`` at ``positions`` ``[N]`` (with ``context`` ``[N, Fc]``,
    the conditions' context features, for a hook with a ``context_spec``).

    Returns:
        ``(z, z_null, seconds)``: the refined conditions and the wall time spent in the hook (0 without one or with
        ``timed=False``; when timed on CUDA the device is synchronised before and after, so queued work is not
        attributed to it: the samplers time only when they record a trace, so plain sampling never synchronises).
    """
    if refiner is None:
        return z, z_null, 0.0
    if timed:
        _sync(z.device)
    start = time.perf_counter()
    z = call_hook(refiner, z, labels, positions, step, context)
    if z_null is not None and refiner.refine_null:
        z_null = refiner.null(z_null, positions, step)
    if not timed:
        return z, z_null, 0.0
    _sync(z.device)
    return z, z_null, time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _conditions(mar: MaskedAutoregressiveTransformer, tokens: Tensor, mask: Tensor, labels: Tensor, guided: bool,
                num_masked: int):
    """Conditional ``[B, L, D]`` and null ``[B, L, D]`` (or ``None``) conditions in one batched pass."""
    if not guided:
        return mar(tokens, mask, labels, num_masked=num_masked), None
    z = mar(torch.cat([tokens, tokens]), torch.cat([mask, mask]), torch.cat([labels, torch.full_like(labels, -1)]),
            num_masked=num_masked)
    return z.chunk(2)


@torch.no_grad()
def sample_tokens(
    mar: MaskedAutoregressiveTransformer,
    head: DiffusionLoss,
    labels: Tensor,
    options: SamplingOptions,
    run: SamplingRun | None = None,
) -> Tensor:
    """Generate token sequences for ``labels``.

    Args:
        mar: The transformer (in eval mode).
        head: The diffusion head.
        labels: ``[B]`` class labels.
        options: AR steps (``1..L``), guidance and its schedule (``cfg == 1`` computes no null branch), and the
            head's sampler, steps and temperature.
        run: The call's generator (on ``labels``' device, for orders and all noise), trace (one record per AR step),
            refiner (applied to the conditional-branch conditions of each step) and progress bar.

    Returns:
        ``[B, L, token_dim]`` tokens.
    """
    check_labels(labels, mar.num_classes)
    run = run or SamplingRun()
    generator, trace, refiner = run.generator, run.trace, run.refiner
    spec = context_spec_of(refiner)
    if options.num_iter is None:
        raise ValueError("num_iter must be an integer in [1, L] for MAR sampling, got None")
    options.check_for(mar.seq_len, head.num_train_timesteps)
    num_iter, cfg, cfg_schedule = options.num_iter, options.cfg, options.cfg_schedule
    b, seq_len, device = labels.shape[0], mar.seq_len, labels.device
    tokens = torch.zeros(b, seq_len, head.token_dim, device=device)
    mask = torch.ones(b, seq_len, dtype=torch.bool, device=device)
    orders = random_orders(b, seq_len, generator, device)
    if trace is not None:
        trace.labels = trace._store(labels)
    schedule = cosine_schedule(seq_len, num_iter)
    for k in progress_bar(range(num_iter), desc="AR steps", disable=not run.progress, leave=False):
        masked = seq_len if k == 0 else schedule[k - 1]  # every row masks this many before step k
        z, z_null = _conditions(mar, tokens, mask, labels, cfg != 1.0, masked)  # (B, L, D) each
        mask_next = mask_from_orders(orders, schedule[k])
        to_pred = mask & ~mask_next  # (B, L)
        n = int(to_pred[0].sum())
        positions = to_pred.nonzero()[:, 1].view(b, n)  # (B, n)
        z_raw = z[to_pred]  # (B*n, D)
        context = spec(tokens, ~mask, positions) if spec is not None else None  # (B*n, Fc)
        z_k, z_null_k, seconds = refine_conditions_of_step(
            refiner, z_raw, z_null[to_pred] if z_null is not None else None, labels.repeat_interleave(n),
            positions.reshape(-1), k, timed=trace is not None, context=context)
        cfg_k = cfg_at_step(cfg, cfg_schedule, schedule[k], seq_len)
        sampled = head.sample(z_k, z_null_k, options, cfg=cfg_k, generator=generator)
        tokens[to_pred] = sampled.to(tokens.dtype)
        mask = mask_next
        if trace is not None:
            trace.record(
                k, schedule[k], cfg_k, seconds,
                positions=positions, conditions=z_k.view(b, n, -1), tokens=sampled.view(b, n, -1),
                raw_conditions=z_raw.view(b, n, -1) if refiner is not None else None,
                null_conditions=z_null_k.view(b, n, -1) if z_null_k is not None else None,
            )
    return tokens
