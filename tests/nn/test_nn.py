"""Shapes and invariants of the plain-torch parts: patchify, masking, transformer, head, sampler."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_ar.nn import (
    DiffusionLoss,
    GenerationTrace,
    MaskedAutoregressiveTransformer,
    SamplingOptions,
    cosine_schedule,
    mask_from_orders,
    patchify,
    random_orders,
    sample_mask_ratio,
    sample_tokens,
    unpatchify,
)
from lightning_ar.nn.diffusion_loss import DDPMStepCoefficients
from lightning_ar.nn.sampling_run import SamplingRun
from lightning_ar.nn.transformer_spec import TransformerSpec

SMALL = TransformerSpec(width=32, encoder_depth=1, decoder_depth=1, num_heads=2)


def test_patchify_roundtrip_and_layout() -> None:
    x = torch.randn(3, 2, 8, 6)
    tokens = patchify(x, 2)
    assert tokens.shape == (3, 12, 8)
    # token 1 is the patch at row 0, column 1: pixels x[:, :, 0:2, 2:4], channel-last within the patch
    assert torch.equal(tokens[:, 1].view(3, 2, 2, 2), x[:, :, 0:2, 2:4].permute(0, 2, 3, 1))
    assert torch.equal(unpatchify(tokens, 2, 2, 8, 6), x)


def test_patchify_rejects_bad_patch() -> None:
    with pytest.raises(ValueError, match="patch_size=3"):
        patchify(torch.randn(1, 1, 8, 8), 3)
    with pytest.raises(ValueError, match="tokens must be"):
        unpatchify(torch.randn(1, 15, 4), 2, 1, 8, 8)


def test_mask_ratio_within_bounds_and_seeded() -> None:
    ratios = [sample_mask_ratio(torch.Generator().manual_seed(i)) for i in range(200)]
    assert all(0.7 <= r <= 1.0 for r in ratios)
    assert sample_mask_ratio(torch.Generator().manual_seed(3)) == sample_mask_ratio(torch.Generator().manual_seed(3))
    assert len(set(ratios)) > 150  # not a constant


def test_orders_are_permutations_and_masks_follow_them() -> None:
    orders = random_orders(5, 16, torch.Generator().manual_seed(0))
    assert torch.equal(orders.sort(dim=1).values, torch.arange(16).expand(5, 16))
    mask = mask_from_orders(orders, 6)
    assert mask.sum(dim=1).tolist() == [6] * 5
    for b in range(5):
        assert mask[b, orders[b, :6]].all() and not mask[b, orders[b, 6:]].any()


@pytest.mark.parametrize("seq_len,num_iter", [(16, 1), (16, 8), (16, 16), (256, 64), (256, 256), (5, 4)])
def test_cosine_schedule_reveals_every_step(seq_len: int, num_iter: int) -> None:
    schedule = cosine_schedule(seq_len, num_iter)
    remaining = [seq_len] + schedule
    assert schedule[-1] == 0 and len(schedule) == num_iter
    assert all(a > b for a, b in zip(remaining, remaining[1:])), schedule
    if 2 <= num_iter < seq_len // 2:  # away from the clamps, MAR's cosine rule itself
        k = num_iter // 2
        assert schedule[k - 1] == math.floor(seq_len * math.cos(math.pi / 2 * k / num_iter))


@pytest.mark.parametrize("num_iter", [0, 17])
def test_cosine_schedule_rejects_bad_num_iter(num_iter: int) -> None:
    with pytest.raises(ValueError, match="num_iter"):
        cosine_schedule(16, num_iter)


def test_transformer_ignores_masked_token_values() -> None:
    torch.manual_seed(0)
    mar = MaskedAutoregressiveTransformer(4, 16, 10, SMALL).eval()
    tokens, labels = torch.randn(2, 16, 4), torch.tensor([1, 2])
    mask = mask_from_orders(random_orders(2, 16, torch.Generator().manual_seed(1)), 10)
    z = mar(tokens, mask, labels)
    assert z.shape == (2, 16, 32)
    altered = tokens.clone()
    altered[mask] = 100.0
    assert torch.allclose(mar(altered, mask, labels), z)
    visible = tokens.clone()
    visible[~mask] += 1.0
    assert not torch.allclose(mar(visible, mask, labels), z)


def test_transformer_null_label_and_drop() -> None:
    mar = MaskedAutoregressiveTransformer(4, 16, 10, SMALL).eval()
    labels = torch.tensor([3, 4])
    emb = mar.class_embedding(labels, drop=torch.tensor([True, False]))
    assert torch.equal(emb[0], mar.null_class_emb[0]) and torch.equal(emb[1], mar.class_emb.weight[4])
    assert torch.equal(mar.class_embedding(torch.tensor([-1]))[0], mar.null_class_emb[0])


def test_transformer_rejects_ragged_masks() -> None:
    mar = MaskedAutoregressiveTransformer(4, 16, 10, SMALL)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, :3] = True
    with pytest.raises(ValueError, match="same number"):
        mar(torch.randn(2, 16, 4), mask, torch.tensor([0, 1]))


def test_head_is_zero_initialised() -> None:
    head = DiffusionLoss(token_dim=4, cond_dim=8, width=16, depth=2)
    out = head.net(torch.randn(5, 4), torch.randint(0, 1000, (5,)), torch.randn(5, 8))
    assert out.shape == (5, 8) and torch.count_nonzero(out) == 0


def test_diffusion_loss_decreases_on_tiny_overfit() -> None:
    torch.manual_seed(0)
    head = DiffusionLoss(token_dim=4, cond_dim=8, width=64, depth=2)
    target, z = torch.randn(64, 4), torch.randn(64, 8)
    opt = torch.optim.Adam(head.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)

    def eval_loss() -> float:
        return head(target, z, torch.Generator().manual_seed(123)).mean().item()

    before = eval_loss()
    for _ in range(300):
        loss = head(target, z, gen).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.6 * before, (before, after)


@pytest.mark.parametrize("spacing", ["leading", "linspace"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++"])
def test_head_sampler_recovers_a_point_mass(sampler: str, spacing: str) -> None:
    """With the exact noise predictor of a point mass at mu, every sampler must land on mu, with either spacing."""
    mu = torch.tensor([0.5, -1.0, 2.0, 0.0])
    head = DiffusionLoss(token_dim=4, cond_dim=8, width=16, depth=1, learn_sigma=False, timestep_spacing=spacing)

    class Oracle(torch.nn.Module):
        """The denoiser interface the samplers use: embedded condition (0) + embedded timestep (t itself)."""

        def cond_embed(self, z):
            return z.new_zeros(z.shape[0], 1)

        def time_embed(self, t):
            return t.float()[:, None]

        def forward_embedded(self, x, c):
            ab = head.alphas_cumprod[c[:, 0].round().long()][:, None]
            return (x - ab.sqrt() * mu) / (1 - ab).sqrt()  # the exact epsilon of x_t for x_0 = mu

    head.net = Oracle()
    out = head.sample(torch.zeros(6, 8), options=SamplingOptions(sampler=sampler, num_sampling_steps=20),
                      generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, mu.expand(6, 4), atol=1e-3), out


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++"])
@pytest.mark.parametrize("num_steps", [10, 50, 100, 250])
def test_first_sampling_step_is_well_conditioned(sampler: str, num_steps: int) -> None:
    """The x0 estimate divides the noise error by sqrt(alpha_bar_t). The capped cosine schedule has
    sqrt(alpha_bar_999) ~ 5e-5: starting there turns a 1% noise error into garbage (samples of std ~500 were
    seen with the 'trailing' spacing), so sampling must start where alpha_bar is not vanishing."""
    head = DiffusionLoss(token_dim=4, cond_dim=8, width=16, depth=1)
    first = int(head._scheduler(sampler, num_steps, torch.device("cpu")).timesteps[0])
    assert head.alphas_cumprod[first] > 1e-5, (first, float(head.alphas_cumprod[first]))
    x, eps = torch.randn(256, 4), torch.randn(256, 4)
    if sampler == "ddpm" and num_steps < 1000:
        second = first - 1000 // num_steps
        step = DDPMStepCoefficients.between(head.alphas_cumprod, first, second)
        exact = head._ddpm_step(x, eps, None, step, None)
        perturbed = head._ddpm_step(x, eps + 0.01 * torch.randn(256, 4), None, step, None)
        assert (perturbed - exact).abs().max() < 0.1


def test_head_sampler_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="sampler must be one of"):
        SamplingOptions(sampler="euler")
    with pytest.raises(ValueError, match="timestep_spacing must be one of"):
        DiffusionLoss(token_dim=4, cond_dim=8, width=16, depth=1, timestep_spacing="uniform")


@pytest.mark.parametrize(("spacing", "first", "last"),
                         [("leading", 990, 0), ("linspace", 999, 0), ("trailing", 999, 9)])
def test_timestep_spacing_sets_the_sampling_timesteps(spacing: str, first: int, last: int) -> None:
    head = DiffusionLoss(token_dim=4, cond_dim=8, width=16, depth=1, timestep_spacing=spacing)
    timesteps = head._scheduler("ddpm", 100, torch.device("cpu")).timesteps.tolist()
    assert (len(timesteps), timesteps[0], timesteps[-1]) == (100, first, last)


def test_sample_tokens_fills_trace() -> None:
    torch.manual_seed(0)
    mar = MaskedAutoregressiveTransformer(4, 16, 10, SMALL).eval()
    head = DiffusionLoss(4, 32, width=16, depth=1)
    trace = GenerationTrace()
    labels = torch.tensor([0, 1, 2])
    tokens = sample_tokens(mar, head, labels, SamplingOptions(num_iter=4, cfg=2.0, num_sampling_steps=3),
                           SamplingRun(torch.Generator().manual_seed(0), trace))
    assert tokens.shape == (3, 16, 4)
    assert [r.num_masked_after for r in trace.steps] == cosine_schedule(16, 4)
    positions = torch.cat([r.positions for r in trace.steps], dim=1)
    assert torch.equal(positions.sort(dim=1).values, torch.arange(16).expand(3, 16))  # each token exactly once
    for rec in trace.steps:
        assert rec.conditions.shape == (3, rec.positions.shape[1], 32) and rec.null_conditions is not None
        assert torch.equal(tokens.gather(1, rec.positions[..., None].expand(-1, -1, 4)), rec.tokens)
    z, lab, pos = trace.conditions_at(0)
    n0 = trace.steps[0].positions.shape[1]
    assert z.shape == (3 * n0, 32)
    assert torch.equal(lab, labels.repeat_interleave(n0)) and torch.equal(pos, trace.steps[0].positions.reshape(-1))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++"])
def test_reused_scheduler_keeps_no_state_between_samples(sampler: str) -> None:
    """Schedulers are built once per sampler and reused: a second call must not inherit the first one's state."""
    torch.manual_seed(0)
    head = DiffusionLoss(token_dim=4, cond_dim=8, width=16, depth=1)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.1)
    z = torch.randn(5, 8)
    seven, thirteen = SamplingOptions(sampler=sampler, num_sampling_steps=7), SamplingOptions(sampler=sampler,
                                                                                             num_sampling_steps=13)
    first = head.sample(z, options=seven, generator=torch.Generator().manual_seed(1))
    head.sample(z, options=thirteen, generator=torch.Generator().manual_seed(2))
    again = head.sample(z, options=seven, generator=torch.Generator().manual_seed(1))
    assert torch.equal(first, again)


def test_masked_positions_select_what_boolean_indexing_selects() -> None:
    from lightning_ar.nn.mar import masked_positions

    gen = torch.Generator().manual_seed(0)
    for n in (0, 1, 5, 16):
        mask = mask_from_orders(random_orders(6, 16, gen), n)  # (6, 16), n masked per row
        x = torch.randn(6, 16, 3, generator=gen)
        idx = masked_positions(mask, n)  # (6, n)
        assert idx.shape == (6, n)
        assert torch.equal(x.gather(1, idx[..., None].expand(-1, -1, 3)).reshape(-1, 3), x[mask])
        assert torch.equal(masked_positions(~mask, 16 - n), (~mask).nonzero()[:, 1].view(6, 16 - n))


def test_transformer_output_does_not_depend_on_being_told_the_count() -> None:
    mar = MaskedAutoregressiveTransformer(4, 16, 10, SMALL).eval()
    mask = mask_from_orders(random_orders(3, 16, torch.Generator().manual_seed(1)), 9)
    tokens, labels = torch.randn(3, 16, 4), torch.tensor([1, 2, 3])
    assert torch.equal(mar(tokens, mask, labels), mar(tokens, mask, labels, num_masked=9))
