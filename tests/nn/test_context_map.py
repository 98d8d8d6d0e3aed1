"""The context-aware entropic map (issue 15, item 2): context features, the bank and the map that carry them, and
the samplers that pass them to a hook."""

from __future__ import annotations

import pytest
import torch

from lightning_ar.nn.context_features import ContextSpec, revealed_context, token_coordinates
from lightning_ar.nn.entropic_map import EntropicMap, MapSettings, within_group_spread
from lightning_ar.nn.refine import ConditionBank
from lightning_ar.nn.refiners import ChainedHooks, MapFitter, MapHook


def test_context_feature_is_the_distance_weighted_mean_of_the_revealed_tokens() -> None:
    tokens = torch.tensor([[[1.0], [2.0], [4.0], [8.0]]])  # (1, 4, 1)
    revealed = torch.tensor([[True, False, True, False]])
    out = revealed_context(tokens, revealed, torch.tensor([[1, 3]]), length_scale=1.0)
    e1, e3 = torch.exp(torch.tensor(-1.0)), torch.exp(torch.tensor(-3.0))
    expected = torch.tensor([(1 * e1 + 4 * e1) / (2 * e1), (1 * e3 + 4 * e1) / (e3 + e1)])
    assert torch.allclose(out[0, :, 0], expected)
    nothing = revealed_context(tokens, torch.zeros(1, 4, dtype=torch.bool), torch.tensor([[0]]))
    assert torch.equal(nothing, torch.zeros(1, 1, 1))  # an empty context reads 0
    assert torch.equal(token_coordinates(4, "grid"), torch.tensor([[0.0, 0], [0, 1], [1, 0], [1, 1]]))
    with pytest.raises(ValueError, match="square number of tokens"):
        token_coordinates(6, "grid")
    with pytest.raises(ValueError, match="length_scale must be > 0"):
        ContextSpec(0.0)


def _cloud(n: int, seed: int, shuffle: bool = False):
    """2-D conditions of 2 classes whose ideal value is a function of a 1-D context feature (plus a little noise);
    ``shuffle`` swaps the conditions within each class: the marginal is unchanged, the conditional is wrong."""
    g = torch.Generator().manual_seed(seed)
    labels, positions = torch.randint(0, 2, (n,), generator=g), torch.zeros(n, dtype=torch.long)
    means = torch.randn(2, 2, generator=torch.Generator().manual_seed(99)) * 5.0
    context = torch.randn(n, 1, generator=g)
    right = means[labels] + context * torch.tensor([1.0, 0.5])  # where each condition belongs
    z = right + 0.2 * torch.randn(n, 2, generator=g)
    if shuffle:
        for c in range(2):
            idx = (labels == c).nonzero()[:, 0]
            z[idx] = z[idx[torch.randperm(len(idx), generator=g)]]
    return (z, labels, positions), context, right


def _map(context_weight: float) -> EntropicMap:
    settings = MapSettings(blur_fraction=0.5, context_weight=context_weight)
    return EntropicMap(2, 3000, 3000, 2, 1, settings, context_dim=1 if context_weight else 0)


def test_context_map_corrects_a_context_shuffle_the_plain_map_cannot() -> None:
    """Positive control: fitted on shuffled conditions, the context-aware map moves them most of the way back to
    where their context puts them; the map on (class, position) alone leaves them (the marginal is already right)."""
    pool, pool_ctx, _ = _cloud(3000, 0, shuffle=True)
    target, target_ctx, _ = _cloud(3000, 1)
    test, test_ctx, right = _cloud(300, 2, shuffle=True)
    before = (test[0] - right).pow(2).sum(1).mean()
    aware = _map(2.0)
    aware.fit_step(1, pool, target, pool_ctx, target_ctx)
    after = (aware(*test, 1, test_ctx) - right).pow(2).sum(1).mean()
    plain = _map(0.0)
    plain.fit_step(1, pool, target)
    unaware = (plain(*test, 1) - right).pow(2).sum(1).mean()
    assert after < 0.25 * before, float(after / before)  # measured 0.11
    assert unaware > 0.9 * before, float(unaware / before)  # measured 1.02


def test_context_map_passes_the_null_test_and_refines_each_condition_on_its_own() -> None:
    pool, pool_ctx, _ = _cloud(3000, 3)
    target, target_ctx, _ = _cloud(3000, 1)
    test, test_ctx, _ = _cloud(300, 4)
    m = _map(2.0)
    m.fit_step(1, pool, target, pool_ctx, target_ctx)
    out = m(*test, 1, test_ctx)
    moved = float((out - test[0]).pow(2).sum(1).mean().sqrt()) / within_group_spread(test[0], test[1])
    assert moved < 0.1, moved  # measured 0.05
    alone = torch.cat([m(test[0][i: i + 1], test[1][i: i + 1], test[2][i: i + 1], 1, test_ctx[i: i + 1])
                       for i in range(64)])
    assert torch.allclose(alone, out[:64], atol=1e-5)
    copy = EntropicMap(2, 3000, 3000, 2, 1, MapSettings(), context_dim=1)  # the stored context scale is used
    copy.load_state_dict(m.state_dict())
    assert torch.allclose(copy(*test, 1, test_ctx), out)


def test_context_map_and_bank_refuse_missing_context() -> None:
    (z, labels, positions), ctx, _ = _cloud(50, 0)
    m = _map(1.0)
    with pytest.raises(ValueError, match="needs the pool's and the target's context features"):
        m.fit_step(1, (z, labels, positions), (z, labels, positions))
    m.fit_step(1, (z, labels, positions), (z, labels, positions), ctx, ctx)
    with pytest.raises(ValueError, match=r"pass the conditions' context features \[N, 1\]"):
        m(z, labels, positions, 1)
    with pytest.raises(ValueError, match="needs the ContextSpec"):
        MapHook(m)
    bank = ConditionBank(2, 100, 2, context_dim=1)
    with pytest.raises(ValueError, match="stores context features of dimension 1"):
        bank.add(0, z, labels, positions)
    bank.add(0, z, labels, positions, context=ctx)
    assert torch.equal(bank.context_of(0), ctx) and torch.equal(bank.get(0).conditions, z)
    with pytest.raises(ValueError, match="stores context features of dimension 0"):
        ConditionBank(2, 100, 2).add(0, z, labels, positions, context=ctx)
    with pytest.raises(ValueError, match="bank with context features of dimension 1"):
        MapFitter(m, ConditionBank(2, 100, 2), 100, context_spec=ContextSpec())


class _Recorder:
    """A hook that takes context features and records them."""

    refine_null = False

    def __init__(self) -> None:
        self.context_spec = ContextSpec(1.0)
        self.seen: list[tuple[int, torch.Tensor]] = []

    def __call__(self, z, labels, positions, step, context=None):
        self.seen.append((step, context))
        return z


class _Plain:
    refine_null = False

    def __call__(self, z, labels, positions, step):
        return z


@pytest.mark.parametrize("causal", [False, True])
def test_samplers_pass_each_condition_its_context_feature(causal: bool) -> None:
    """Both samplers hand a hook with a ``context_spec`` one feature row per condition: 0 at the first step (nothing
    revealed), the weighted mean of the tokens generated so far later; a chain passes it only to hooks that take it."""
    from lightning_ar.nn.causal import CausalTransformer, sample_causal_tokens
    from lightning_ar.nn.diffusion_loss import DiffusionLoss
    from lightning_ar.nn.mar import MaskedAutoregressiveTransformer
    from lightning_ar.nn.sampler import sample_tokens
    from lightning_ar.nn.sampling_options import SamplingOptions
    from lightning_ar.nn.sampling_run import SamplingRun
    from lightning_ar.nn.trace import GenerationTrace
    from lightning_ar.nn.transformer_spec import TransformerSpec

    torch.manual_seed(0)
    spec = TransformerSpec(width=16, encoder_depth=1, decoder_depth=1, num_heads=2)
    model = (CausalTransformer if causal else MaskedAutoregressiveTransformer)(2, 9, 3, spec).eval()
    head = DiffusionLoss(token_dim=2, cond_dim=16, width=16, depth=1).eval()
    sample = sample_causal_tokens if causal else sample_tokens
    recorder, trace = _Recorder(), GenerationTrace()
    labels = torch.arange(3)
    options = SamplingOptions(num_iter=None if causal else 4, num_sampling_steps=5)
    tokens = sample(model, head, labels, options, SamplingRun(torch.Generator().manual_seed(0), trace,
                                                             ChainedHooks(_Plain(), recorder)))
    first_step, first = recorder.seen[0]
    assert first_step == 0 and torch.equal(first, torch.zeros_like(first))
    step, last = recorder.seen[-1]
    record = trace.steps[step]
    positions = record.positions.to(torch.long)  # (B, n)
    revealed = torch.ones(tokens.shape[:2], dtype=torch.bool)
    revealed.scatter_(1, positions, False)  # all but the last step's tokens were known before it
    expected = revealed_context(tokens, revealed, positions).reshape(-1, tokens.shape[-1])
    assert last.shape == (positions.numel(), tokens.shape[-1]) and torch.allclose(last, expected, atol=1e-5)
