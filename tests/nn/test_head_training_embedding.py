"""The training loss embeds conditions before MAR's repeats and the timestep MLP once per timestep value: same loss
and gradients as the per-row formulation (the reference's), up to the matrix products' rounding."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny import random_head


def per_row_loss(head, target, z, t, noise, repeats):  # the formulation every row of MAR's head computes
    target, z = target.repeat(repeats, 1), z.repeat(repeats, 1)
    ab = head.alphas_cumprod[t][:, None]
    x_t = ab.sqrt() * target + (1.0 - ab).sqrt() * noise
    out = head.net(x_t, t, z).float()
    loss = ((out[:, : head.token_dim] - noise) ** 2).mean(dim=-1)
    return loss + head._vb_bits(out, target, x_t, t)


@pytest.mark.parametrize("tokens,repeats", [(50, 4), (700, 4), (3, 1)])
def test_loss_and_gradients_equal_the_per_row_formulation(tokens: int, repeats: int) -> None:
    """700 x 4 rows > 1000 timesteps: the table path; 50 x 4: the direct one."""
    head = random_head(0).train()
    gen = torch.Generator().manual_seed(1)
    target, z = torch.randn(tokens, 4, generator=gen), torch.randn(tokens, 8, generator=gen)
    t, noise = head.draw_noise(tokens * repeats, target.device, target.dtype, gen)
    losses = []
    for fn in (head.loss_given_noise, lambda *a: per_row_loss(head, *a, repeats)):
        head.zero_grad()
        loss = fn(target, z, t, noise)
        loss.mean().backward()
        losses.append((loss.detach(), [p.grad.clone() for p in head.parameters()]))
    (ours, our_grads), (ref, ref_grads) = losses
    assert ours.shape == (tokens * repeats,)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(our_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_timestep_table_equals_the_mlp_and_a_bad_repeat_is_an_error() -> None:
    net = random_head(2).net
    t = torch.randint(0, 1000, (3000,), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(net.time_embed.embed_integers(t, 1000), net.time_embed(t), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="whole number of repeats"):
        net.embed_repeated(t[:10], torch.randn(3, 8), 1000)
