"""Exact Gaussian conditionals of token sequences with a Kronecker covariance ``K (x) S`` (the ``gmm`` source).

A sequence ``X`` ``[L, D]`` with mean ``mu`` and ``Cov(vec X) = K (x) S`` (token-major ``vec``; ``K`` ``[L, L]`` over
positions, ``S`` ``[D, D]`` over token dimensions) stays Kronecker after conditioning on the tokens of a set ``R``:
the unrevealed tokens ``U`` are Gaussian with mean ``mu_U + K_UR K_RR^-1 (X_R - mu_R)`` and covariance
``(K_UU - K_UR K_RR^-1 K_RU) (x) S``. Everything here therefore needs ``L x L`` solves only, never an
``(L*D) x (L*D)`` inverse. Different samples may reveal different sets: the solves are batched with the unrevealed
rows and columns of ``K`` replaced by the identity (``A = P_R K P_R + P_U``, whose inverse is ``K_RR^-1`` on ``R``).
All computations are in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def _gather_square(matrix: Tensor, positions: Tensor) -> Tensor:
    """``matrix`` ``[B, L, L]`` restricted to ``positions`` ``[B, n]`` on both sides: ``[B, n, n]``."""
    if positions.ndim != 2 or positions.shape[0] != matrix.shape[0]:
        raise ValueError(f"positions must be [B, n] with B={matrix.shape[0]}, got {tuple(positions.shape)}")
    rows = matrix.gather(1, positions[..., None].expand(-1, -1, matrix.shape[-1]))  # (B, n, L)
    return rows.gather(2, positions[:, None, :].expand(-1, positions.shape[1], -1))  # (B, n, n)


def _gather_tokens(x: Tensor, positions: Tensor) -> Tensor:
    """Tokens ``x`` ``[B, L, D]`` at ``positions`` ``[B, n]``: ``[B, n, D]``."""
    if positions.ndim != 2 or positions.shape[0] != x.shape[0]:
        raise ValueError(f"positions must be [B, n] with B={x.shape[0]}, got {tuple(positions.shape)}")
    return x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1]))


@dataclass
class KroneckerConditional:
    """The exact conditional of every token given the revealed ones, for a batch of ``B`` sequences.

    Attributes:
        mean: ``[B, L, D]`` conditional means (a revealed position: the token itself).
        pos_cov: ``[B, L, L]`` conditional position covariance (Schur complement of ``K``; zero rows and columns at
            revealed positions). The joint covariance of any set of tokens is ``pos_cov[set, set] (x) dim_cov``.
        dim_cov: ``[D, D]`` covariance over token dimensions ``S``.
    """

    mean: Tensor
    pos_cov: Tensor
    dim_cov: Tensor

    @property
    def variance(self) -> Tensor:
        """``[B, L]`` conditional position variance of each token (its covariance is ``variance * dim_cov``)."""
        return self.pos_cov.diagonal(dim1=-2, dim2=-1)

    @property
    def cov(self) -> Tensor:
        """``[B, L, D, D]`` per-token conditional covariance (zero at revealed positions)."""
        return self.variance[..., None, None] * self.dim_cov

    def joint_cov(self, positions: Tensor) -> Tensor:
        """``[B, n*D, n*D]`` joint covariance of the tokens at ``positions`` ``[B, n]`` (token-major order)."""
        sub = _gather_square(self.pos_cov, positions)  # (B, n, n)
        b, n, d = sub.shape[0], sub.shape[1], self.dim_cov.shape[0]
        return (sub[:, :, None, :, None] * self.dim_cov[None, None, :, None, :]).reshape(b, n * d, n * d)

    def whiten(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """Per-token whitened residuals ``[B, n, D]`` of ``tokens`` ``[B, n, D]`` at ``positions`` ``[B, n]``:
        ``(S^-1/2 (x_i - m_i)) / sqrt(v_i)`` with the Cholesky factor of ``S``; exactly ``N(0, I)`` for a token drawn
        from its conditional (the tokens of one step are correlated with each other under the joint)."""
        resid = tokens.double() - _gather_tokens(self.mean, positions)  # (B, n, D)
        chol = torch.linalg.cholesky(self.dim_cov)  # (D, D)
        white = torch.linalg.solve_triangular(chol, resid.reshape(-1, resid.shape[-1]).T, upper=False).T
        var = self.variance.gather(1, positions)  # (B, n)
        return white.view_as(resid) / var.clamp_min(1e-300).sqrt()[..., None]

    def joint_quadratic(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """``[B]`` Mahalanobis form ``vec(X - M)^T (C_PP (x) S)^-1 vec(X - M)`` of the tokens ``[B, n, D]`` at
        ``positions`` ``[B, n]`` under their joint conditional (``n * D`` in expectation for exact samples)."""
        resid = tokens.double() - _gather_tokens(self.mean, positions)  # (B, n, D)
        chol_pos = torch.linalg.cholesky(_gather_square(self.pos_cov, positions))  # (B, n, n)
        chol_dim = torch.linalg.cholesky(self.dim_cov)  # (D, D)
        left = torch.linalg.solve_triangular(chol_pos, resid, upper=False)  # (B, n, D): C^-1/2 on positions
        both = torch.linalg.solve_triangular(chol_dim, left.transpose(1, 2), upper=False)  # (B, D, n)
        return both.square().sum(dim=(1, 2))

    def joint_entropy(self, positions: Tensor) -> Tensor:
        """``[B]`` differential entropy (nats) of the joint conditional of the tokens at ``positions`` ``[B, n]``."""
        n, d = positions.shape[1], self.dim_cov.shape[0]
        logdet_pos = torch.linalg.slogdet(_gather_square(self.pos_cov, positions))[1]  # (B,)
        logdet = d * logdet_pos + n * torch.linalg.slogdet(self.dim_cov)[1]
        return 0.5 * (n * d * math.log(2 * math.pi * math.e) + logdet)

    def parallel_floor(self, positions: Tensor) -> Tensor:
        """``[B]`` expected joint excess NLL (nats, whole step) of tokens drawn *independently* from their exact
        per-token conditionals: ``D/2 (tr(C_PP^-1 diag(C_PP)) - n)``, what a perfect per-token sampler still pays
        for ignoring the correlations within one step (0 for ``n = 1``)."""
        sub = _gather_square(self.pos_cov, positions)  # (B, n, n)
        ratio = torch.linalg.solve(sub, torch.diag_embed(sub.diagonal(dim1=-2, dim2=-1)))  # C^-1 diag(C)
        return 0.5 * self.dim_cov.shape[0] * (ratio.diagonal(dim1=-2, dim2=-1).sum(-1) - positions.shape[1])

    def sample(self, positions: Tensor, generator: torch.Generator | None = None, joint: bool = True) -> Tensor:
        """Exact draws ``[B, n, D]`` of the tokens at ``positions`` ``[B, n]``: from their joint conditional, or
        (``joint=False``) independently from each token's own conditional (as a perfect per-token sampler would)."""
        b, n, d = positions.shape[0], positions.shape[1], self.dim_cov.shape[0]
        noise = torch.randn(b, n, d, generator=generator, dtype=torch.float64, device=self.mean.device)
        sub = _gather_square(self.pos_cov, positions)  # (B, n, n)
        if joint:
            pos_factor = torch.linalg.cholesky(sub)  # (B, n, n)
        else:
            pos_factor = torch.diag_embed(sub.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt())
        dim_factor = torch.linalg.cholesky(self.dim_cov)  # (D, D)
        return _gather_tokens(self.mean, positions) + pos_factor @ noise @ dim_factor.T


def condition_kronecker(
    tokens: Tensor, revealed: Tensor, mean: Tensor, pos_cov: Tensor, dim_cov: Tensor
) -> KroneckerConditional:
    """Condition a Kronecker Gaussian on its revealed tokens.

    Args:
        tokens: ``[B, L, D]`` sequences (values at unrevealed positions are ignored).
        revealed: ``[B, L]`` bool, ``True`` where the token is known.
        mean: ``[B, L, D]`` prior means (e.g. each sample's class mean).
        pos_cov: ``[L, L]`` prior position covariance ``K``.
        dim_cov: ``[D, D]`` covariance over token dimensions ``S``.

    Returns:
        :class:`KroneckerConditional` of all ``L`` tokens (float64).
    """
    x, mu = tokens.double(), mean.double().to(tokens.device)
    k = pos_cov.double().to(tokens.device)
    r = revealed.to(torch.float64)  # (B, L)
    a = r[:, :, None] * k * r[:, None, :] + torch.diag_embed(1.0 - r)  # (B, L, L): K_RR, identity elsewhere
    chol = torch.linalg.cholesky(a)
    k_r = k * r[:, None, :]  # (B, L, L): K[:, R] (columns outside R zeroed)
    delta = (x - mu) * r[..., None]  # (B, L, D)
    cond_mean = mu + k_r @ torch.cholesky_solve(delta, chol)  # (B, L, D)
    cond_cov = k - k_r @ torch.cholesky_solve(k_r.transpose(1, 2), chol)  # (B, L, L)
    keep = (1.0 - r)[:, :, None] * (1.0 - r)[:, None, :]  # exact zeros at revealed rows/columns
    cond_cov = 0.5 * (cond_cov + cond_cov.transpose(1, 2)) * keep
    cond_mean = torch.where(revealed[..., None], x, cond_mean)
    return KroneckerConditional(cond_mean, cond_cov, dim_cov.double().to(tokens.device))


def revealed_log_likelihood_classes(
    tokens: Tensor, revealed: Tensor, class_means: Tensor, pos_cov: Tensor, dim_cov: Tensor
) -> Tensor:
    """``[B, C]`` log-density of the revealed tokens under each class, up to a term shared by all classes.

    The classes share the covariance, so only the Mahalanobis term ``-q_c / 2`` differs; a softmax over classes
    gives the exact class posterior given the revealed context (uniform prior).

    Args:
        tokens: ``[B, L, D]``; revealed: ``[B, L]`` bool; class_means: ``[C, L, D]``; pos_cov: ``[L, L]``;
        dim_cov: ``[D, D]``.
    """
    x = tokens.double()
    k = pos_cov.double().to(x.device)
    r = revealed.to(torch.float64)
    a = r[:, :, None] * k * r[:, None, :] + torch.diag_embed(1.0 - r)  # (B, L, L)
    chol = torch.linalg.cholesky(a)
    delta = (x[:, None] - class_means.double().to(x.device)[None]) * r[:, None, :, None]  # (B, C, L, D)
    b, c, seq, d = delta.shape
    solved = torch.cholesky_solve(delta.permute(0, 2, 1, 3).reshape(b, seq, c * d), chol)  # (B, L, C*D)
    solved = solved.view(b, seq, c, d).permute(0, 2, 1, 3)  # (B, C, L, D): K_RR^-1 delta
    s_inv = torch.linalg.inv(dim_cov.double().to(x.device))  # (D, D), small
    quad = torch.einsum("bcld,de,bcle->bc", delta, s_inv, solved)
    return -0.5 * quad
