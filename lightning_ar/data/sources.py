"""Embedded latent sources that need no download: ``digits`` (real 8x8 digits) and ``gmm`` (known distribution).

A source provides fixed ``train``/``val``/``test`` splits of latents ``[N, C, H, W]`` with integer labels, a
``decode`` to images in ``[-1, 1]`` for viewing and evaluation (the evaluator that scores generated latents is chosen
by :func:`lightning_ar.metrics.evaluator_for`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from functools import cached_property
from typing import Any, Literal

import torch
from einops import rearrange
from torch import Tensor

from lightning_ar.data.gaussian import KroneckerConditional, condition_kronecker, revealed_log_likelihood_classes
from lightning_ar.seeding import seeded_generator

Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")


class LatentSource(ABC):
    """A class-conditional latent data set held in memory."""

    name: str = "source"

    @property
    @abstractmethod
    def latent_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one latent."""

    @property
    @abstractmethod
    def num_classes(self) -> int:
        """Number of class labels."""

    @abstractmethod
    def split(self, name: Split) -> tuple[Tensor, Tensor]:
        """Latents ``[N, C, H, W]`` (float32) and labels ``[N]`` (int64) of one split."""

    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``[B, C, H, W]`` to images ``[B, C', H', W']`` in ``[-1, 1]`` (identity by default)."""
        return latents.clamp(-1.0, 1.0)

    def _check_split(self, name: str) -> None:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")


class DigitsSource(LatentSource):
    """scikit-learn's 1,797 real 8x8 handwritten digits as ``1x8x8`` latents in ``[-1, 1]`` (identity VAE).

    The split is fixed and stratified by class: 80% train, 10% val, 10% test (``seed`` selects it; keep the
    default so that results are comparable).
    """

    name = "digits"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (1, 8, 8)

    @property
    def num_classes(self) -> int:
        return 10

    @cached_property
    def _splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        data = load_digits()
        images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 8.0 - 1.0  # (N, 1, 8, 8) in [-1, 1]
        labels = torch.tensor(data.target, dtype=torch.int64)
        idx = torch.arange(len(labels)).numpy()
        train, rest = train_test_split(idx, test_size=0.2, stratify=data.target, random_state=self.seed)
        val, test = train_test_split(rest, test_size=0.5, stratify=data.target[rest], random_state=self.seed)
        return {name: (images[ix], labels[ix]) for name, ix in (("train", train), ("val", val), ("test", test))}

    def split(self, name: Split) -> tuple[Tensor, Tensor]:
        self._check_split(name)
        return self._splits[name]


class GMMSource(LatentSource):
    """Synthetic class-conditional token sequences with a known Gaussian distribution.

    For class ``c`` the ``L = grid**2`` tokens of dimension ``D`` are jointly Gaussian: a class mean ``mu_c``
    ``[L, D]`` (a smooth random pattern over positions) plus a zero-mean process with covariance
    ``K (x) S``: ``K[i, j] = rho**|i - j|`` (an AR(1) process over raster positions) and ``S`` a fixed ``D x D``
    covariance. Every conditional ``p(token_i | revealed tokens, class)`` is Gaussian in closed form
    (:meth:`conditional`, with ``L x L`` solves thanks to the Kronecker structure; :meth:`class_posterior` given a
    context) and the exact log-likelihood of any sequence is available (:meth:`log_prob`). Latents are
    ``[D, grid, grid]`` so that ``patch_size=1`` gives back the tokens in raster order.

    Args:
        num_classes: Number of classes.
        grid: Tokens per side (``L = grid**2``).
        token_dim: Token dimension ``D``.
        rho: AR(1) correlation between neighbouring positions, in ``(-1, 1)``.
        noise_std: Marginal standard deviation of the process.
        mean_scale: Amplitude of the class means.
        sizes: Number of samples of the train, val and test splits.
        seed: Seed of the distribution's parameters and of the splits.
    """

    name = "gmm"

    def __init__(
        self,
        num_classes: int = 4,
        grid: int = 4,
        token_dim: int = 4,
        rho: float = 0.8,
        noise_std: float = 0.5,
        mean_scale: float = 1.0,
        sizes: tuple[int, int, int] = (4000, 500, 500),
        seed: int = 0,
    ) -> None:
        if not -1.0 < rho < 1.0:
            raise ValueError(f"gmm rho must be in (-1, 1), got {rho}")
        if num_classes < 1 or grid < 1 or token_dim < 1 or noise_std <= 0:
            raise ValueError("gmm num_classes, grid, token_dim must be >= 1 and noise_std > 0")
        self._num_classes, self.grid, self.token_dim, self.rho = num_classes, grid, token_dim, rho
        self.sizes, self.seed = tuple(sizes), seed
        gen = seeded_generator(seed)
        self.means = self._class_means(num_classes, grid * grid, token_dim, mean_scale, gen)  # (K, L, D)
        pos = torch.arange(grid * grid, dtype=torch.float64)
        self.pos_cov = rho ** (pos[:, None] - pos[None]).abs()  # (L, L)
        a = torch.randn(token_dim, token_dim, generator=gen, dtype=torch.float64)
        s = a @ a.T / token_dim + 0.5 * torch.eye(token_dim, dtype=torch.float64)
        self.dim_cov = s / s.diagonal().mean() * noise_std**2  # (D, D)

    @staticmethod
    def _class_means(k: int, seq_len: int, dim: int, scale: float, gen: torch.Generator) -> Tensor:
        pos = torch.arange(seq_len, dtype=torch.float64) / seq_len
        freq = torch.randint(1, 4, (k, 1, dim), generator=gen).double()
        phase = 2 * math.pi * torch.rand(k, 1, dim, generator=gen, dtype=torch.float64)
        return scale * torch.cos(2 * math.pi * freq * pos[None, :, None] + phase)  # (K, L, D)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.token_dim, self.grid, self.grid)

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def covariance(self) -> Tensor:
        """Covariance ``[L*D, L*D]`` of a flattened (token-major) sequence: ``kron(K, S)``."""
        return torch.kron(self.pos_cov, self.dim_cov)

    @cached_property
    def _scale_tril(self) -> Tensor:
        return torch.kron(torch.linalg.cholesky(self.pos_cov), torch.linalg.cholesky(self.dim_cov))

    def to_tokens(self, latents: Tensor) -> Tensor:
        """``[B, D, g, g]`` latents to ``[B, L, D]`` tokens (raster order)."""
        return rearrange(latents, "b d h w -> b (h w) d")

    def to_latents(self, tokens: Tensor) -> Tensor:
        """``[B, L, D]`` tokens to ``[B, D, g, g]`` latents."""
        return rearrange(tokens, "b (h w) d -> b d h w", h=self.grid, w=self.grid)

    def sample(self, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Exact samples ``[B, D, g, g]`` (float32) for ``labels`` ``[B]``."""
        noise = torch.randn(labels.shape[0], self._scale_tril.shape[0], generator=generator, dtype=torch.float64)
        flat = self.means[labels.cpu()].flatten(1) + noise @ self._scale_tril.T  # (B, L*D)
        return self.to_latents(flat.view(labels.shape[0], -1, self.token_dim)).float().to(labels.device)

    def log_prob(self, latents: Tensor, labels: Tensor) -> Tensor:
        """Exact log-density ``[B]`` (nats) of latents ``[B, D, g, g]`` under their classes ``[B]``."""
        dist = torch.distributions.MultivariateNormal(
            self.means.flatten(1).to(latents.device), scale_tril=self._scale_tril.to(latents.device)
        )
        flat = self.to_tokens(latents.double()).flatten(1)  # (B, L*D)
        return dist.log_prob(flat[:, None, :])[torch.arange(len(labels)), labels.to(latents.device)]

    def class_log_probs(self, latents: Tensor) -> Tensor:
        """Log-density ``[B, K]`` of each latent under every class (the Bayes classifier's scores)."""
        dist = torch.distributions.MultivariateNormal(
            self.means.flatten(1).to(latents.device), scale_tril=self._scale_tril.to(latents.device)
        )
        return dist.log_prob(self.to_tokens(latents.double()).flatten(1)[:, None, :])

    def conditional(
        self, tokens: Tensor, revealed: Tensor, labels: Tensor, positions: Tensor | None = None
    ) -> KroneckerConditional | tuple[KroneckerConditional, Tensor]:
        """Exact conditional of every token given the revealed ones (Kronecker structure: ``L x L`` solves only).

        Args:
            tokens: ``[B, L, D]`` sequences in the source's (unscaled) space; unrevealed values are ignored.
            revealed: ``[B, L]`` bool, ``True`` where the token is known.
            labels: ``[B]`` classes.
            positions: Optional ``[B, n]`` set of positions whose joint covariance is also returned.

        Returns:
            A :class:`~lightning_ar.data.gaussian.KroneckerConditional` with ``mean`` ``[B, L, D]`` and ``cov``
            ``[B, L, D, D]`` (revealed tokens: the token itself, zero covariance); with ``positions``, the pair
            ``(conditional, joint covariance [B, n*D, n*D])``.
        """
        mean = self.means.to(tokens.device)[labels.to(tokens.device)]  # (B, L, D)
        cond = condition_kronecker(tokens, revealed, mean, self.pos_cov, self.dim_cov)
        return cond if positions is None else (cond, cond.joint_cov(positions))

    def class_posterior(self, tokens: Tensor, revealed: Tensor) -> Tensor:
        """``[B, C]`` exact class posterior (uniform prior) given only the revealed tokens of ``[B, L, D]``."""
        loglik = revealed_log_likelihood_classes(tokens, revealed, self.means, self.pos_cov, self.dim_cov)
        return loglik.softmax(dim=-1)

    @cached_property
    def _splits(self) -> dict[str, tuple[Tensor, Tensor]]:
        gen = seeded_generator(self.seed, 1)
        out = {}
        for name, size in zip(SPLITS, self.sizes):
            labels = torch.arange(size) % self._num_classes
            out[name] = (self.sample(labels, gen), labels)
        return out

    def split(self, name: Split) -> tuple[Tensor, Tensor]:
        self._check_split(name)
        return self._splits[name]

    def decode(self, latents: Tensor) -> Tensor:
        """A viewable image: the first token channel over the grid, ``[B, 1, g, g]`` squashed into ``[-1, 1]``."""
        return torch.tanh(latents[:, :1])


SOURCES: dict[str, type[LatentSource]] = {"digits": DigitsSource, "gmm": GMMSource}


def make_source(name: str, **kwargs: Any) -> LatentSource:
    """Build an embedded source by name (``digits`` or ``gmm``)."""
    if name not in SOURCES:
        raise ValueError(f"data.source must be one of {sorted(SOURCES)} (or a LatentSource instance), got {name!r}")
    return SOURCES[name](**kwargs)
