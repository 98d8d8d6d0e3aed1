"""The ground-truth objective of the on-policy amortised refiner: exact targets at the generated context."""

from __future__ import annotations

import pytest
import torch

from lightning_ar.data.sources import GMMSource
from lightning_ar.nn.diffusion_loss import DiffusionLoss
from lightning_ar.nn.refiner_targets import corrupted_context, exact_step_targets, head_denoising_loss
from lightning_ar.theory.ground_truth import exact_trace, mar_step_positions, step_truth


def _residual_power(source: GMMSource, trace, context_trace, step: int, scale: float) -> float:
    """Mean squared whitened residual of ``exact_step_targets`` of ``trace`` judged at ``context_trace``'s context."""
    targets = exact_step_targets(source, trace, step, scale, torch.Generator().manual_seed(step))
    rec = trace.steps[step]
    b, n = rec.positions.shape
    tokens = targets.view(b, n, -1).double() / scale
    seq = context_trace.sequence().double() / scale
    truth = step_truth(source, seq, trace.revealed_before(step), torch.as_tensor(trace.labels), rec.positions, tokens)
    return float(truth.res_outer.diagonal(dim1=-2, dim2=-1).sum(-1).mean() / (n * source.token_dim))


def test_exact_targets_follow_the_conditional_of_the_generated_context() -> None:
    """Positive and negative control: the targets are exact at the trace's own context (whitened power ~1), and
    clearly not exact at another context (the sequences of another draw: power well above 1)."""
    source, scale = GMMSource(), 1.7
    labels = torch.arange(source.num_classes).repeat(64)
    positions = mar_step_positions(len(labels), source.grid ** 2, 4, torch.Generator().manual_seed(0))
    trace = exact_trace(source, labels, positions, torch.Generator().manual_seed(1), latent_scale=scale)
    other = exact_trace(source, labels, positions, torch.Generator().manual_seed(2), latent_scale=scale)
    for step in (1, 2, 3):
        assert abs(_residual_power(source, trace, trace, step, scale) - 1.0) < 0.1
        assert _residual_power(source, trace, other, step, scale) > 1.5
    shape = exact_step_targets(source, trace, 0, scale).shape
    assert shape == (len(labels) * positions[0].shape[1], source.token_dim)


def test_head_denoising_loss_is_differentiable_in_the_conditions_only() -> None:
    head = DiffusionLoss(2, 8, width=16, depth=1, num_train_timesteps=50).requires_grad_(False)
    with torch.no_grad():  # the head's output layers start at zero (no gradient to the condition): perturb them
        for p in head.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    z = torch.randn(5, 8, requires_grad=True)
    loss = head_denoising_loss(head, z, torch.randn(5, 2), repeats=3, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.ndim == 0 and z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is None for p in head.parameters())
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        head_denoising_loss(head, z, torch.randn(5, 2), repeats=0)


def test_corrupted_context_swaps_only_revealed_tokens_at_the_given_rate() -> None:
    real, model = torch.zeros(64, 16, 2), torch.ones(64, 16, 2)
    revealed = torch.arange(16)[None].expand(64, 16) < 8
    assert torch.equal(corrupted_context(real, model, revealed, 0.0), real)
    full = corrupted_context(real, model, revealed, 1.0)
    assert torch.equal(full[:, :8], model[:, :8]) and torch.equal(full[:, 8:], real[:, 8:])
    half = corrupted_context(real, model, revealed, 0.5, torch.Generator().manual_seed(0))
    assert abs(float(half[:, :8].mean()) - 0.5) < 0.05 and float(half[:, 8:].abs().sum()) == 0.0
    with pytest.raises(ValueError, match=r"corruption must be in \[0, 1\]"):
        corrupted_context(real, model, revealed, 1.5)
