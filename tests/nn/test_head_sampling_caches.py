"""The head's sampling fast path: modulations from one stacked matrix product, and the per-schedule values kept
between sampling calls (DDPM coefficients, timestep embeddings, stacked weights) rebuilt whenever the weights change."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.tiny import random_head

from lightning_ar.nn import DiffusionLoss, SamplingOptions


def test_stacked_modulations_equal_each_layers_own() -> None:
    net = random_head().net
    c, x = torch.randn(20, 32), torch.randn(20, 4)
    stacked = net.modulations(c)
    own = [block.modulation(c) for block in net.blocks] + [net.final.modulation(c)]
    assert [tuple(m.shape) for m in stacked] == [(20, 96)] * 3 + [(20, 64)]
    for a, b in zip(stacked, own):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    h = net.input_proj(x)
    for block in net.blocks:
        h = block(h, c)
    torch.testing.assert_close(net.forward_embedded(x, c), net.final(h, c), rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the cached (autograd-off) path gives what the autograd path gives
        torch.testing.assert_close(net.forward_embedded(x, c), net.final(h, c), rtol=1e-5, atol=1e-6)


def test_stacked_modulations_carry_gradients_to_every_layer() -> None:
    net = random_head().net
    net.forward_embedded(torch.randn(6, 4), torch.randn(6, 32)).square().sum().backward()
    for layer in [block.modulation[-1] for block in net.blocks] + [net.final.modulation[-1]]:
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_cached_sampling_follows_weight_changes(sampler: str) -> None:
    """Negative control built in: a head whose caches were filled by other weights must sample exactly like a
    fresh copy once its weights change (in place, as an optimizer step, or by load_state_dict)."""
    head, z = random_head(0), torch.randn(10, 8)
    opts = SamplingOptions(num_sampling_steps=20, sampler=sampler)

    def sample(h: DiffusionLoss) -> torch.Tensor:
        return h.sample(z, torch.randn(10, 8, generator=torch.Generator().manual_seed(3)), opts, cfg=2.0,
                        generator=torch.Generator().manual_seed(1))

    first = sample(head)
    assert torch.equal(first, sample(head))  # the caches reproduce the uncached first call exactly
    with torch.no_grad():
        for p in head.parameters():
            p.mul_(1.1)  # in place: what an optimizer step or an EMA swap does
    changed = sample(head)
    assert not torch.equal(changed, first)
    assert torch.equal(changed, sample(copy.deepcopy(head)))
    head.load_state_dict(random_head(5).state_dict())
    assert torch.equal(sample(head), sample(random_head(5)))
