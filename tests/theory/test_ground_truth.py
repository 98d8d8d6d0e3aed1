"""Ground truth on gmm: exact conditionals against brute force, the per-step errors and their controls."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_ar import GenerationTrace, GMMSource
from lightning_ar.theory.ground_truth import (
    entropy_per_dim,
    exact_trace,
    gaussian_kl,
    mar_step_positions,
    sequence_excess,
    trace_truth,
)


@pytest.fixture(scope="module")
def small() -> GMMSource:
    return GMMSource(num_classes=3, grid=3, token_dim=3, rho=0.7, sizes=(30, 10, 10))


def _brute_force(source: GMMSource, x: torch.Tensor, revealed: torch.Tensor, label: int):
    """Condition the full ``(L*D) x (L*D)`` covariance directly: mean and covariance of the unrevealed block."""
    d = source.token_dim
    full, mu, xf = source.covariance, source.means[label].flatten(), x.flatten()
    r = revealed.repeat_interleave(d)
    u = ~r
    if not r.any():
        return mu[u], full[u][:, u]
    gain = full[u][:, r] @ torch.linalg.inv(full[r][:, r])
    return mu[u] + gain @ (xf[r] - mu[r]), full[u][:, u] - gain @ full[r][:, u]


def test_conditional_matches_brute_force_conditioning(small: GMMSource) -> None:
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    x = small.to_tokens(small.sample(labels, gen)).double()
    revealed = torch.rand(6, 9, generator=gen) < 0.5
    revealed[0], revealed[1] = False, True  # nothing revealed / only one hidden token
    revealed[1, 4] = False
    for b in range(6):
        hidden = (~revealed[b]).nonzero().squeeze(1)
        cond, joint = small.conditional(x, revealed, labels, positions=hidden[None].expand(6, -1))
        mean, cov = _brute_force(small, x[b], revealed[b], int(labels[b]))
        torch.testing.assert_close(cond.mean[b][~revealed[b]].flatten(), mean, rtol=0, atol=1e-10)
        torch.testing.assert_close(joint[b], cov, rtol=0, atol=1e-10)
        torch.testing.assert_close(cond.mean[b][revealed[b]], x[b][revealed[b]])  # revealed: the token itself
        assert cond.cov[b][revealed[b]].abs().max() == 0 if revealed[b].any() else True
        for j, pos in enumerate(hidden.tolist()):  # per-token covariance = the diagonal block of the joint
            d = small.token_dim
            torch.testing.assert_close(cond.cov[b, pos], cov[j * d : (j + 1) * d, j * d : (j + 1) * d], rtol=0,
                                       atol=1e-10)


def test_class_posterior_matches_brute_force(small: GMMSource) -> None:
    gen = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 1, 2])
    x = small.to_tokens(small.sample(labels, gen)).double()
    revealed = torch.rand(3, 9, generator=gen) < 0.4
    post = small.class_posterior(x, revealed)
    d = small.token_dim
    for b in range(3):
        r = revealed[b].repeat_interleave(d)
        dist = [torch.distributions.MultivariateNormal(small.means[c].flatten()[r], small.covariance[r][:, r])
                for c in range(3)]
        logp = torch.stack([m.log_prob(x[b].flatten()[r]) for m in dist])
        torch.testing.assert_close(post[b], logp.softmax(0), rtol=0, atol=1e-10)


def test_per_step_excess_sums_to_the_sequence_nll_minus_entropy(small: GMMSource) -> None:
    """Chain rule: the per-step joint excesses add up to -log p(X) - H for any tokens (here: off-distribution)."""
    gen = torch.Generator().manual_seed(2)
    labels = torch.arange(40) % 3
    positions = mar_step_positions(40, 9, 4, gen)
    trace = exact_trace(small, labels, positions, gen, joint=False, latent_scale=2.0)
    for rec in trace.steps:  # distort the tokens so that the excess is far from zero
        rec.tokens = rec.tokens * 1.3 + 0.2
    steps = trace_truth(small, trace, latent_scale=2.0)
    latents = small.to_latents(trace.sequence().double() / 2.0)
    direct = -small.log_prob(latents, labels) / 27 - entropy_per_dim(small)
    torch.testing.assert_close(sequence_excess(steps, 27), direct, rtol=0, atol=1e-9)
    assert float(direct.mean()) > 0.05


def test_exact_samples_read_zero_excess_and_the_kl_floor(small: GMMSource) -> None:
    gen = torch.Generator().manual_seed(3)
    labels = torch.arange(3000) % 3
    positions = mar_step_positions(3000, 9, 4, gen)
    joint = trace_truth(small, exact_trace(small, labels, positions, gen, joint=True))
    perfect_mar = trace_truth(small, exact_trace(small, labels, positions, gen, joint=False))
    for j, p in zip(joint, perfect_mar):
        se = 4 * float(j.excess_joint.std()) / math.sqrt(3000)
        assert abs(float(j.excess_joint.mean())) < se and abs(float(j.excess_token.mean())) < se
        assert abs(float(p.excess_token.mean())) < se  # exact per-token conditionals: no per-token excess
        # independent draws pay the parallel-decoding part, exactly its analytic floor; joint draws do not
        assert float(p.parallel.mean()) == pytest.approx(float(p.parallel_floor.mean()), abs=se)
        assert abs(float(j.parallel.mean())) < se
        kl = gaussian_kl(p.res_sum.sum(0), p.res_outer.sum(0), 3000 * p.num_tokens)
        d = small.token_dim
        expected_floor = (d * (d + 3) / 2) / (2 * 3000 * p.num_tokens)  # E[KL] of the MLE fit, to first order
        assert float(kl["kl"]) < 5 * expected_floor
    assert max(float(p.parallel_floor.mean()) for p in perfect_mar) > 0.005  # steps of > 1 token do pay it


@pytest.mark.parametrize("distortion", ["bias", "over", "under"])
def test_kl_is_two_sided(distortion: str) -> None:
    gen = torch.Generator().manual_seed(4)
    white = torch.randn(4000, 3, generator=gen, dtype=torch.float64)
    exact = gaussian_kl(white.sum(0), white.T @ white, 4000)
    bad = {"bias": white + 0.3, "over": white * 1.3, "under": white * 0.7}[distortion]
    kl = gaussian_kl(bad.sum(0), bad.T @ bad, 4000)
    assert float(kl["kl"]) > 10 * float(exact["kl"])
    expected = {"bias": (0.9, 1.1), "over": (1.2, 2.0), "under": (0.0, 0.8)}[distortion]
    assert expected[0] < float(kl["dispersion"]) < expected[1]
    mean_part = float(kl["kl_mean"]) / float(kl["kl"])
    assert mean_part > 0.9 if distortion == "bias" else mean_part < 0.1  # the split names the kind of error


def test_trace_reconstructs_context(small: GMMSource) -> None:
    gen = torch.Generator().manual_seed(5)
    labels = torch.arange(6) % 3
    positions = mar_step_positions(6, 9, 3, gen)
    trace = exact_trace(small, labels, positions, gen)
    assert isinstance(trace, GenerationTrace) and trace.seq_len == 9
    assert not trace.revealed_before(0).any() and trace.revealed_before(3).all()
    counts = trace.revealed_before(2).sum(1)
    assert (counts == positions[0].shape[1] + positions[1].shape[1]).all()
    seq = trace.sequence()
    for rec in trace.steps:
        torch.testing.assert_close(seq.gather(1, rec.positions[..., None].expand(-1, -1, 3)), rec.tokens)


def test_mask_ratio_min_zero_trains_on_long_contexts() -> None:
    """Regime R1 of the study: ``mask_ratio_min`` 0 is accepted and at least one token stays masked."""
    from lightning_ar import MARGenerator
    from lightning_ar.nn.masking import num_masked_for_training, sample_mask_ratio

    model = MARGenerator((4, 2, 2), 2, 1.0, patch_size=1, width=16, encoder_depth=1, decoder_depth=1, num_heads=2,
                         head_width=16, head_depth=1, mask_ratio_min=0.0, num_iter=2)
    assert float(model.diffusion_loss(torch.randn(3, 4, 2, 2), torch.tensor([0, 1, 0]))) > 0
    ratios = [sample_mask_ratio(torch.Generator().manual_seed(i), low=0.0) for i in range(300)]
    assert min(ratios) >= 0.0 and min(ratios) < 0.7
    assert num_masked_for_training(4, 0.0) == 1
    with pytest.raises(ValueError, match="mask_ratio_min"):
        MARGenerator((4, 2, 2), 2, 1.0, patch_size=1, width=16, num_heads=2, mask_ratio_min=-0.1, num_iter=2)


def test_residual_eigenvalues_see_a_collapse_in_one_direction() -> None:
    """``min_eig`` of the whitened-residual covariance is ~1 on exact residuals and drops when one direction is
    shrunk, which the mean dispersion (trace / D) hides."""
    white = torch.randn(6000, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    exact = gaussian_kl(white.sum(0), white.T @ white, 6000)
    assert 0.9 < float(exact["min_eig"]) <= float(exact["max_eig"]) < 1.1
    squashed = white * torch.tensor([0.5, 1.15, 1.15, 1.15], dtype=torch.float64)  # trace kept close to D
    kl = gaussian_kl(squashed.sum(0), squashed.T @ squashed, 6000)
    assert 0.9 < float(kl["dispersion"]) < 1.1 and float(kl["min_eig"]) < 0.3
