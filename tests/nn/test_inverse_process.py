"""The multi-step refinement of issue 15 item 4 (:mod:`lightning_ar.nn.inverse_process`): step-size schedules, the
proximal term, the token-to-condition regression and the inverse-process anchor, against closed forms."""

from __future__ import annotations

import pytest
import torch

from lightning_ar.nn.inverse_process import ProximalMapHook, ProximalOptions, TokenConditionMap
from lightning_ar.nn.refine import FlowOptions, sinkhorn_flow


def _pairs(n: int, generator: torch.Generator):
    """Tokens ``[n, 3]`` of 4 classes at 6 positions and conditions ``[n, 5]`` linear in them plus intercepts."""
    slope = torch.randn(3, 5, generator=generator)
    class_b, pos_b = torch.randn(4, 5, generator=generator), torch.randn(6, 5, generator=generator)
    tokens = torch.randn(n, 3, generator=generator)
    labels, positions = torch.randint(0, 4, (n,), generator=generator), torch.randint(0, 6, (n,), generator=generator)
    clean = tokens @ slope + class_b[labels] + pos_b[positions]
    return tokens, labels, positions, clean


def test_token_condition_map_recovers_a_linear_map_and_streams_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    tokens, labels, positions, clean = _pairs(4000, g)
    noisy = clean + 0.1 * torch.randn(clean.shape, generator=g)
    whole, halves = TokenConditionMap(2, 3, 4, 6, 5), TokenConditionMap(2, 3, 4, 6, 5)
    whole.accumulate(1, tokens, labels, positions, noisy)
    for part in (slice(0, 1500), slice(1500, None)):
        halves.accumulate(1, tokens[part], labels[part], positions[part], noisy[part])
    whole.solve()
    halves.solve()
    assert whole.fitted(1) and not whole.fitted(0)
    pred = whole(1, tokens, labels, positions)
    assert (pred - clean).pow(2).mean() < 1e-3 * clean.var()  # positive control: the map is recovered
    assert torch.allclose(pred, halves(1, tokens, labels, positions), atol=1e-4)
    shuffled = whole(1, tokens[torch.randperm(4000, generator=g)], labels, positions)
    assert (shuffled - clean).pow(2).mean() > 0.3 * clean.var()  # negative control: the token matters
    with pytest.raises(ValueError, match="AR step 0 is not fitted"):
        whole(0, tokens, labels, positions)


def _toward(target: torch.Tensor):
    return lambda z, labels, positions, step: target.expand_as(z)


def test_schedules_and_the_proximal_term_match_their_closed_forms() -> None:
    z0, target, args = torch.zeros(3, 2), torch.ones(1, 2), (torch.zeros(3).long(), torch.zeros(3).long(), 1)
    one = ProximalMapHook(_toward(target), ProximalOptions(steps=1, eta=1.0))
    assert torch.equal(one(z0, *args), target.expand(3, 2))  # one full step is the transport itself
    constant = ProximalMapHook(_toward(target), ProximalOptions(steps=3, eta=0.5))
    assert torch.allclose(constant(z0, *args), torch.full((3, 2), 1 - 0.5 ** 3))
    harmonic = ProximalMapHook(_toward(target), ProximalOptions(steps=3, eta=0.5, schedule="harmonic"))
    remaining = (1 - 0.5) * (1 - 0.25) * (1 - 0.5 / 3)
    assert torch.allclose(harmonic(z0, *args), torch.full((3, 2), 1 - remaining))
    lam = ProximalMapHook(_toward(target), ProximalOptions(steps=200, eta=0.5, lam=1.0))
    assert torch.allclose(lam(z0, *args), torch.full((3, 2), 0.5), atol=1e-5)  # fixed point (T + lam z0) / (1 + lam)
    identity = ProximalMapHook(lambda z, *a: z, ProximalOptions(steps=4, eta=0.7, lam=2.0))
    assert torch.equal(identity(z0 + 3.0, *args), z0 + 3.0)  # nothing to fix: nothing moves
    with pytest.raises(ValueError, match="proximal schedule must be one of"):
        ProximalOptions(schedule="cosine")
    with pytest.raises(ValueError, match="needs the token-to-condition map"):
        ProximalMapHook(_toward(target), ProximalOptions(inverse_weight=1.0))


def test_inverse_anchor_pulls_toward_the_condition_its_token_maps_back_to() -> None:
    g = torch.Generator().manual_seed(1)
    tokens, labels, positions, clean = _pairs(2000, g)
    inverse = TokenConditionMap(2, 3, 4, 6, 5)
    inverse.accumulate(1, tokens, labels, positions, clean)
    inverse.solve()
    drawn = tokens[:8]
    calls = []

    def sample_tokens(z: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        calls.append(len(z))
        return drawn

    hook = ProximalMapHook(lambda z, *a: z, ProximalOptions(steps=1, eta=1.0, inverse_weight=1.0), inverse,
                           sample_tokens)
    out = hook(torch.zeros(8, 5), labels[:8], positions[:8], 1)
    assert torch.allclose(out, clean[:8], atol=1e-3) and calls == [8]  # one re-denoising per step
    assert hook.denoise_seconds > 0 and hook.stats.seconds >= hook.denoise_seconds


def test_flow_harmonic_schedule() -> None:
    g = torch.Generator().manual_seed(2)
    c0, target = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g) + 3.0
    opts = FlowOptions(steps=2, eta=0.5, blur=0.05, scaling=0.5)
    constant = sinkhorn_flow(c0, target, opts, record_trace=False).conditions
    harmonic = sinkhorn_flow(c0, target, opts, schedule="harmonic", record_trace=False).conditions
    first = sinkhorn_flow(c0, target, opts, steps=1, record_trace=False).conditions
    # the harmonic second step is half the constant one, from the same first step
    second_constant, second_harmonic = constant - first, harmonic - first
    assert torch.allclose(second_harmonic, 0.5 * second_constant, atol=1e-4)
    assert FlowOptions(schedule="harmonic").step_size(3) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="flow schedule must be one of"):
        FlowOptions(schedule="cosine")
