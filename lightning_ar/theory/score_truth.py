"""Theorem 2 against ground truth: the model's conditional score and guidance norms next to the exact ones on gmm.

SPEC 2.2 measures ``s_k(t) = E||eps_theta(x_t, t, c_k)|| / sigma_t`` and
``g_k(t) = E||eps_theta(x_t, t, c_k) - eps_theta(x_t, t, c_null,k)|| / sigma_t`` over the tokens of AR step ``k``. On
gmm the exact values exist. A token whose conditional given its context is ``N(m_y, Sigma)`` for class ``y`` is,
after noising (``x_t = sqrt(ab) x_0 + sigma eps``), distributed as ``N(sqrt(ab) m_y, C_t)`` with
``C_t = ab Sigma + sigma^2 I``, so the true ``s`` is ``E||C_t^-1 (x_t - sqrt(ab) m_y)||``. Without the class the token
follows the mixture over classes weighted by the exact class posterior given the context, and the true guidance term
is ``||sqrt(ab) C_t^-1 (m_y - sum_c w_c(x_t) m_c)||`` with ``w_c`` the posterior given ``x_t`` too. Model and truth are
evaluated at the same ``x_t``, drawn from the *exact* conditional given the trace's own (generated) context, in the
model's scaled token space.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from lightning_ar.data.sources import GMMSource
from lightning_ar.nn.trace import GenerationTrace
from lightning_ar.theory.condition_errors import ConditionModel


def _gather(x: Tensor, positions: Tensor) -> Tensor:
    return x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1]))


def _class_means(source: GMMSource, seq: Tensor, revealed: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """Conditional means ``[C, B, n, D]`` of the step's tokens under every class and their variance ``[B, n]``."""
    b = seq.shape[0]
    conds = [source.conditional(seq, revealed, torch.full((b,), c, dtype=torch.long))
             for c in range(source.num_classes)]
    means = torch.stack([_gather(c.mean, positions) for c in conds])
    return means, conds[0].variance.gather(1, positions)


def _true_norms(x_t: Tensor, means: Tensor, post: Tensor, labels: Tensor, cov: Tensor, ab: float
                ) -> tuple[Tensor, Tensor]:
    """Exact ``||score||`` and ``||guidance||`` per token: ``x_t`` ``[N, D]``, class means ``[C, N, D]``, class
    posterior given the context ``[N, C]``, labels ``[N]``, token covariance ``[N, D, D]`` (all scaled)."""
    d = x_t.shape[-1]
    c_t = ab * cov + (1.0 - ab) * torch.eye(d, dtype=cov.dtype)  # (N, D, D)
    m_y = means[labels, torch.arange(x_t.shape[0])]  # (N, D)
    score = torch.linalg.solve(c_t, (x_t - ab**0.5 * m_y)[..., None])[..., 0]
    delta = x_t[None] - ab**0.5 * means  # (C, N, D)
    solved = torch.linalg.solve(c_t[None].expand(means.shape[0], -1, -1, -1), delta[..., None])[..., 0]
    logw = post.clamp_min(1e-300).log().T - 0.5 * (delta * solved).sum(-1)  # (C, N)
    w = logw.softmax(dim=0)
    mix = (w[..., None] * means).sum(0)  # (N, D)
    guidance = torch.linalg.solve(c_t, (ab**0.5 * (m_y - mix))[..., None])[..., 0]
    return score.norm(dim=-1), guidance.norm(dim=-1)


@torch.no_grad()
def _step(model: ConditionModel, source: GMMSource, trace: GenerationTrace, k: int, timesteps: Sequence[int],
          generator: torch.Generator) -> np.ndarray:
    """``[T, 4, B]``: per sample (mean over the step's tokens) model score, true score, model guidance and true
    guidance of step ``k`` at each timestep."""
    s, rec = model.latent_scale, trace.steps[k]
    labels, seq = torch.as_tensor(trace.labels), trace.sequence().double()
    revealed, positions = trace.revealed_before(k), rec.positions
    b, n = positions.shape
    means, var = _class_means(source, seq / s, revealed, positions)  # unscaled
    means = (means * s).flatten(1, 2)  # (C, N, D) scaled
    post = source.class_posterior(seq / s, revealed).repeat_interleave(n, dim=0)  # (N, C)
    flat_labels = labels.repeat_interleave(n)
    cov = (var.flatten() * s**2)[:, None, None] * source.dim_cov  # (N, D, D)
    chol = torch.linalg.cholesky(cov + 1e-12 * torch.eye(cov.shape[-1], dtype=cov.dtype))
    noise = torch.randn(means.shape[1:], generator=generator, dtype=torch.float64)
    x0 = means[flat_labels, torch.arange(means.shape[1])] + (chol @ noise[..., None])[..., 0]  # (N, D)
    device = model.head.alphas_cumprod.device
    z = rec.conditions.reshape(x0.shape[0], -1).to(device)
    if rec.null_conditions is not None:
        z_null = rec.null_conditions.reshape(x0.shape[0], -1).to(device)
    else:
        null = model.conditions(seq.float().to(device), revealed.to(device), torch.full_like(labels, -1).to(device))
        z_null = _gather(null, positions.to(device)).reshape(x0.shape[0], -1)
    rows = []
    for t in timesteps:
        ab = float(model.head.alphas_cumprod[int(t)])
        x_t = ab**0.5 * x0 + (1 - ab) ** 0.5 * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        x_in = x_t.float().to(device).repeat(2, 1)
        t_in = torch.full((x_in.shape[0],), int(t), device=device, dtype=torch.long)
        eps = model.head.net(x_in, t_in, torch.cat([z, z_null]))[:, : model.head.token_dim].float().cpu()
        sigma = (1 - ab) ** 0.5
        cond, uncond = eps.chunk(2)
        true_s, true_g = _true_norms(x_t, means, post, flat_labels, cov, ab)
        norms = [cond.norm(dim=-1).double() / sigma, true_s, (cond - uncond).norm(dim=-1).double() / sigma, true_g]
        rows.append(torch.stack([v.view(b, n).mean(1) for v in norms]).numpy())  # (4, B)
    return np.asarray(rows)


SCORE_KEYS = ("model_score", "true_score", "model_guidance", "true_guidance")


def score_truth(model: ConditionModel, source: GMMSource, trace: GenerationTrace, timesteps: Sequence[int],
                generator: torch.Generator) -> dict:
    """Model and exact score / guidance norms of every AR step of ``trace`` at ``timesteps``.

    Args:
        model: The generator's parts (eval mode).
        source: The gmm source the model was trained on.
        trace: A trace of ``generate`` (null conditions are recomputed from its context when it has none).
        timesteps: ``[T]`` diffusion timesteps (training scale).
        generator: CPU RNG for the exact draws and the noise.

    Returns:
        ``timesteps``; ``[K][T]`` lists of means ``model_score``, ``true_score``, ``model_guidance``,
        ``true_guidance``; and ``per_sample``: ``{key: [K, T, B] array}`` (each sample's mean over its step's tokens).
    """
    was_training = model.head.training
    model.head.eval()
    arr = np.stack([_step(model, source, trace, k, timesteps, generator) for k in range(len(trace.steps))])
    model.head.train(was_training)  # arr: (K, T, 4, B)
    out: dict = {"timesteps": [int(t) for t in timesteps]}
    out.update({key: arr[:, :, i].mean(-1).tolist() for i, key in enumerate(SCORE_KEYS)})
    out["per_sample"] = {key: arr[:, :, i] for i, key in enumerate(SCORE_KEYS)}
    return out
