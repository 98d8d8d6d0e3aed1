"""Multi-step refinement with a step-size schedule, the proximal term and this project's reading of the paper's
inverse-process term (issue 15 item 4).

The paper's Algorithm 1 is not public. This project's reading: at AR step ``k`` the conditions ``z0`` ``[N, D]``
take ``steps`` explicit steps

    x_j   = head.sample(z_j)                                  # re-denoise (the nested loop)
    z_j+1 = z_j + eta_j * ((T(z_j) - z_j) + lam * (z0 - z_j) + mu * (g(x_j) - z_j))

where ``T`` is a batch-independent transport (the fitted entropic map, or the flow), ``eta_j`` follows a schedule
(``constant`` or ``harmonic``: ``eta / (j + 1)``), ``lam`` pulls back toward the produced condition (the proximal
term of the JKO step; it acts from the second step on) and ``g`` maps the generated token back to condition
space: a ridge regression per AR step of the ideal conditions on the real token they predict with class and
position intercepts (:class:`TokenConditionMap`, fitted on teacher-forced pairs). ``g(x_j)`` anchors the condition
to what its own token says it should be. With ``mu = 0`` no token is sampled; with ``steps = 1``, ``eta = 1`` and
``mu = 0`` the step is exactly ``T``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ar.nn.refine import SCHEDULES, scheduled_step
from lightning_ar.nn.refiners import HookStats
from lightning_ar.seeding import seeded_generator


@dataclass(frozen=True)
class ProximalOptions:
    """The steps of :class:`ProximalMapHook`.

    Args:
        steps: Number of steps (>= 1).
        eta: Step size of the first step (> 0).
        schedule: ``constant`` (every step ``eta``) or ``harmonic`` (step ``j`` is ``eta / (j + 1)``).
        lam: Proximal weight (>= 0) pulling the condition back toward the produced one.
        inverse_weight: Weight ``mu`` (>= 0) of the inverse-process anchor; 0 samples no tokens.
    """

    steps: int = 1
    eta: float = 1.0
    schedule: str = "constant"
    lam: float = 0.0
    inverse_weight: float = 0.0

    def __post_init__(self) -> None:
        rules = (("steps", self.steps >= 1, ">= 1"), ("eta", self.eta > 0, "> 0"), ("lam", self.lam >= 0, ">= 0"),
                 ("inverse_weight", self.inverse_weight >= 0, ">= 0"))
        for name, ok, need in rules:
            if not ok:
                raise ValueError(f"proximal {name} must be {need}, got {getattr(self, name)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"proximal schedule must be one of {SCHEDULES}, got {self.schedule!r}")

    def step_size(self, j: int) -> float:
        """The step size of step ``j`` (0-based)."""
        return scheduled_step(self.eta, self.schedule, j)


class TokenConditionMap(nn.Module):
    """``g_k(x)``: ridge regression per AR step of conditions ``[D]`` on ``[token, one-hot class, one-hot position,
    1]``, accumulated as normal equations over any number of batches (exact, streaming) and solved once.

    Args:
        num_steps: AR steps ``K``.
        token_dim: Token dimension ``Dt``.
        num_classes: Classes (one-hot intercepts).
        seq_len: Token positions (one-hot intercepts).
        cond_dim: Condition dimension ``D``.
        ridge: Ridge penalty, relative to the mean diagonal of the normal matrix.
    """

    def __init__(self, num_steps: int, token_dim: int, num_classes: int, seq_len: int, cond_dim: int,
                 ridge: float = 1e-4) -> None:
        super().__init__()
        self.token_dim, self.num_classes, self.seq_len, self.ridge = token_dim, num_classes, seq_len, ridge
        width = token_dim + num_classes + seq_len + 1
        self.register_buffer("xtx", torch.zeros(num_steps, width, width, dtype=torch.float64))
        self.register_buffer("xtz", torch.zeros(num_steps, width, cond_dim, dtype=torch.float64))
        self.register_buffer("coef", torch.zeros(num_steps, width, cond_dim))
        self.register_buffer("count", torch.zeros(num_steps, dtype=torch.long))
        self.register_buffer("solved", torch.zeros(num_steps, dtype=torch.bool))

    def features(self, tokens: Tensor, labels: Tensor, positions: Tensor) -> Tensor:
        """``[N, Dt + C + L + 1]`` regression features of tokens ``[N, Dt]`` of classes ``labels`` and ``positions``
        ``[N]``."""
        ones = tokens.new_ones(len(tokens), 1)
        return torch.cat([tokens, F.one_hot(labels.long(), self.num_classes).to(tokens.dtype),
                          F.one_hot(positions.long(), self.seq_len).to(tokens.dtype), ones], dim=1)

    @torch.no_grad()
    def accumulate(self, step: int, tokens: Tensor, labels: Tensor, positions: Tensor, conditions: Tensor) -> None:
        """Add pairs (real token ``[N, Dt]``, its ideal condition ``[N, D]``) of AR step ``step``."""
        x = self.features(tokens, labels, positions).double()
        self.xtx[step] += x.T @ x
        self.xtz[step] += x.T @ conditions.double()
        self.count[step] += len(x)
        self.solved[step] = False

    @torch.no_grad()
    def solve(self) -> None:
        """Solve the ridge regression of every step that has pairs."""
        for k in range(len(self.count)):
            if int(self.count[k]) == 0:
                continue
            a = self.xtx[k]
            a = a + self.ridge * a.diagonal().mean() * torch.eye(len(a), dtype=a.dtype, device=a.device)
            self.coef[k] = torch.linalg.solve(a, self.xtz[k]).to(self.coef.dtype)
            self.solved[k] = True

    def fitted(self, step: int) -> bool:
        """Whether step ``step`` has a solved regression."""
        return bool(self.solved[step])

    def forward(self, step: int, tokens: Tensor, labels: Tensor, positions: Tensor) -> Tensor:
        """The conditions ``[N, D]`` the regression of step ``step`` assigns to ``tokens`` ``[N, Dt]``."""
        if not self.fitted(step):
            raise ValueError(f"the token-to-condition map of AR step {step} is not fitted (no teacher-forced pairs)")
        return self.features(tokens, labels, positions).to(self.coef.dtype) @ self.coef[step]


Transport = Callable[[Tensor, Tensor, Tensor, int], Tensor]
TokenSampler = Callable[[Tensor, torch.Generator], Tensor]


class ProximalMapHook:
    """Sampler hook of the multi-step refinement of the module docstring.

    Args:
        transport: ``T(z, labels, positions, step) -> [N, D]``, batch-independent (e.g. a fitted
            :class:`~lightning_ar.nn.refiners.MapHook`).
        options: Steps, schedule, proximal and inverse-process weights.
        inverse: The token-to-condition map ``g`` (required when ``options.inverse_weight > 0``).
        sample_tokens: ``(z [N, D], generator) -> [N, Dt]``: the head's sampler at the generator's settings (the
            nested re-denoising; required when ``options.inverse_weight > 0``).
        seed: Seed of the nested sampling's noise (one stream per AR step).
    """

    def __init__(self, transport: Transport, options: ProximalOptions, inverse: TokenConditionMap | None = None,
                 sample_tokens: TokenSampler | None = None, seed: int = 0) -> None:
        if options.inverse_weight > 0 and (inverse is None or sample_tokens is None):
            raise ValueError("an inverse-process weight > 0 needs the token-to-condition map and the head's sampler")
        self.transport, self.options, self.inverse, self.sample_tokens = transport, options, inverse, sample_tokens
        self.seed, self.stats, self.refine_null = seed, HookStats(), False
        self.denoise_seconds = 0.0  # of ``stats.seconds``: the nested re-denoising

    @torch.no_grad()
    def __call__(self, z: Tensor, labels: Tensor, positions: Tensor, step: int) -> Tensor:
        """Refined conditions ``[N, D]`` of the conditions ``z`` ``[N, D]`` of AR step ``step``."""
        start, opts, z0 = time.perf_counter(), self.options, z
        generator = seeded_generator(self.seed, step, stride=7933, device=z.device)
        for j in range(opts.steps):
            move = self.transport(z, labels, positions, step) - z + opts.lam * (z0 - z)
            if opts.inverse_weight > 0:
                t0 = time.perf_counter()
                tokens = self.sample_tokens(z, generator)  # (N, Dt)
                self.denoise_seconds += time.perf_counter() - t0
                move = move + opts.inverse_weight * (self.inverse(step, tokens, labels, positions).to(z.dtype) - z)
            z = z + opts.step_size(j) * move
        self.stats.seconds += time.perf_counter() - start
        return z
