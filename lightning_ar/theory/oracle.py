"""The oracle condition: per token, the condition that minimises the head's own loss on exact conditional samples.

For a token whose exact conditional given its context is ``N(m, C)`` (known on ``gmm``), the oracle condition is
``c* = argmin_c E_{x0 ~ N(m, C), t, eps} loss_head(x0, c)``, found by a few Adam steps from the model's condition with
fresh draws every step (the head is frozen). Sampling the head at ``c*`` gives the best tokens *any* change of the
condition can give with this head, so ``error(c) - error(c*)`` bounds what a condition refinement can gain.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_ar.nn.diffusion_loss import DiffusionLoss


@dataclass
class OracleSettings:
    """Options of the oracle search.

    Attributes:
        iters: Adam steps.
        draws: Exact samples (with fresh timestep and noise) per token and step.
        lr: Adam learning rate (cosine-decayed to 0), in condition units.
    """

    iters: int = 150
    draws: int = 8
    lr: float = 0.05

    def __post_init__(self) -> None:
        if self.iters < 1 or self.draws < 1 or not self.lr > 0:
            raise ValueError(f"oracle iters and draws must be >= 1 and lr > 0, got {self}")


def _draw(mean: Tensor, chol: Tensor, draws: int, generator: torch.Generator | None) -> Tensor:
    """``[draws * N, D]`` exact samples of ``N`` Gaussians (``mean`` ``[N, D]``, Cholesky ``chol`` ``[N, D, D]``)."""
    noise = torch.randn(draws, *mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + torch.einsum("nij,knj->kni", chol, noise)).reshape(-1, mean.shape[-1])


def head_loss(head: DiffusionLoss, z: Tensor, mean: Tensor, chol: Tensor, draws: int,
              generator: torch.Generator | None) -> Tensor:
    """``[N]`` the head's training loss at conditions ``z`` ``[N, W]``, averaged over ``draws`` exact samples of each
    token's conditional ``N(mean, chol chol^T)`` with fresh timesteps and noise."""
    x0 = _draw(mean, chol, draws, generator)  # (draws*N, D)
    loss = head(x0, z.repeat(draws, 1), generator)  # (draws*N,)
    return loss.view(draws, -1).mean(0)


def oracle_conditions(head: DiffusionLoss, z: Tensor, mean: Tensor, chol: Tensor, settings: OracleSettings,
                      generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, float]]:
    """Minimise the head's loss over the conditions of ``N`` tokens.

    Args:
        head: The frozen diffusion head (its parameters are not changed).
        z: ``[N, W]`` starting conditions (the model's).
        mean: ``[N, D]`` exact conditional means, in the head's (scaled) token space.
        chol: ``[N, D, D]`` Cholesky factors of the exact conditional covariances (same space).
        settings: :class:`OracleSettings`.
        generator: RNG on ``z``'s device.

    Returns:
        ``(c* [N, W], info)``; ``info`` has ``loss_start`` and ``loss_oracle``, the mean loss at ``z`` and at ``c*`` on
        one common set of fresh draws (the oracle should not be worse).
    """
    training = head.training
    head.eval()
    c = z.detach().clone().float().requires_grad_(True)
    mean, chol = mean.float(), chol.float()
    opt = torch.optim.Adam([c], lr=settings.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, settings.iters)
    for _ in range(settings.iters):
        loss = head_loss(head, c, mean, chol, settings.draws, generator).sum()
        (grad,) = torch.autograd.grad(loss, c)
        c.grad = grad
        opt.step()
        sched.step()
    c = c.detach()
    with torch.no_grad():
        state = generator.get_state() if generator is not None else None
        start = head_loss(head, z.float(), mean, chol, 4 * settings.draws, generator).mean()
        if state is not None:
            generator.set_state(state)  # the same draws for both
        end = head_loss(head, c, mean, chol, 4 * settings.draws, generator).mean()
    head.train(training)
    return c, {"loss_start": float(start), "loss_oracle": float(end)}
