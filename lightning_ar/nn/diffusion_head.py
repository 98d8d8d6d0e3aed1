"""The per-token denoiser of MAR: a small MLP whose residual blocks are modulated by AdaLN.

The condition ``z`` (one vector per token) and the timestep embedding are summed into one conditioning vector that
produces a shift, scale and gate for each residual block. Modulations and the output layer are zero-initialised, so
the untrained head predicts zero noise and a mid-range variance.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ar.nn.init import xavier_linears_
from lightning_ar.nn.param_cache import cached_on_params


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``[N, dim]`` of (possibly fractional) timesteps ``t`` ``[N]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return nn.functional.pad(emb, (0, dim % 2))


class TimestepEmbedder(nn.Module):
    """Sinusoidal frequencies followed by a two-layer MLP (as in DiT)."""

    def __init__(self, width: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor) -> Tensor:
        """``[N]`` timesteps to ``[N, width]``."""
        return self.mlp(timestep_embedding(t, self.frequency_dim).to(self.mlp[0].weight.dtype))

    def embed_integers(self, t: Tensor, num_values: int) -> Tensor:
        """:meth:`forward` for integer timesteps ``t`` ``[N]`` in ``[0, num_values)``: when there are more rows than
        values, the MLP runs once per value (a ``[num_values, width]`` table, gathered; autograd sums the rows'
        gradients into it), which is what a training batch of thousands of rows over 1000 timesteps saves.

        Returns:
            ``[N, width]``, equal to ``forward(t)`` up to the matrix products' rounding.
        """
        if t.shape[0] <= num_values:
            return self(t)
        return self(torch.arange(num_values, device=t.device))[t]


class AdaLNResBlock(nn.Module):
    """``x + gate * MLP(LN(x) * (1 + scale) + shift)`` with (shift, scale, gate) from the conditioning vector."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """``x``, ``c``: ``[N, width]``."""
        return self.modulated(x, self.modulation(c))

    def modulated(self, x: Tensor, modulation: Tensor) -> Tensor:
        """``x`` ``[N, width]`` with this block's ``modulation(c)`` ``[N, 3 * width]`` (shift, scale, gate) given."""
        shift, scale, gate = modulation.chunk(3, dim=-1)  # 3 x (N, W)
        h = self.norm(x) * (1 + scale) + shift
        return x + gate * self.mlp(h)


class FinalLayer(nn.Module):
    """AdaLN-modulated, affine-free LayerNorm followed by the output projection."""

    def __init__(self, width: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, out_dim)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        return self.modulated(x, self.modulation(c))

    def modulated(self, x: Tensor, modulation: Tensor) -> Tensor:
        """``x`` ``[N, width]`` with ``modulation(c)`` ``[N, 2 * width]`` (shift, scale) given."""
        shift, scale = modulation.chunk(2, dim=-1)
        return self.linear(self.norm(x) * (1 + scale) + shift)


class AdaLNMLPDenoiser(nn.Module):
    """MAR's ``SimpleMLPAdaLN``: predicts noise and the learned-range variance interpolation for each token.

    Args:
        token_dim: Dimension of one token.
        cond_dim: Dimension of the condition ``z`` (the transformer width).
        width: Hidden width of the MLP.
        depth: Number of AdaLN residual blocks.
        learn_sigma: Predict ``2 * token_dim`` outputs (noise and variance interpolation) instead of ``token_dim``.
    """

    def __init__(self, token_dim: int, cond_dim: int, width: int = 256, depth: int = 3,
                 learn_sigma: bool = True) -> None:
        super().__init__()
        self.token_dim, self.learn_sigma = token_dim, learn_sigma
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(token_dim, width)
        self.blocks = nn.ModuleList(AdaLNResBlock(width) for _ in range(depth))
        self.final = FinalLayer(width, token_dim * (2 if learn_sigma else 1))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier linears, normal(0.02) timestep MLP, zero modulations and output layer."""
        xavier_linears_(self)
        for layer in (self.time_embed.mlp[0], self.time_embed.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.modulation[-1].weight)
            nn.init.zeros_(block.modulation[-1].bias)
        for layer in (self.final.modulation[-1], self.final.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, t: Tensor, z: Tensor) -> Tensor:
        """Denoiser output.

        Args:
            x: ``[N, token_dim]`` noisy tokens.
            t: ``[N]`` diffusion timesteps (training scale, ``0..T-1``).
            z: ``[N, cond_dim]`` conditions.

        Returns:
            ``[N, 2*token_dim]`` (noise, variance interpolation in ``[-1, 1]``) or ``[N, token_dim]``.
        """
        return self.forward_embedded(x, self.time_embed(t) + self.cond_embed(z))

    def embed_repeated(self, t: Tensor, z: Tensor, num_timesteps: int) -> Tensor:
        """The conditioning vector of :meth:`forward` for rows that repeat ``z``: ``time_embed(t) +
        cond_embed(z.repeat(R, 1))`` with ``cond_embed`` applied before the repeat and the timestep MLP once per
        timestep value (:meth:`TimestepEmbedder.embed_integers`); what the training losses use.

        Args:
            t: ``[R * M]`` integer timesteps in ``[0, num_timesteps)``.
            z: ``[M, cond_dim]`` conditions, each repeated ``R`` times (``torch.repeat`` order: row ``i`` of the
                result is ``z[i % M]``).
            num_timesteps: Number of training timesteps.

        Returns:
            ``[R * M, width]``.
        """
        repeats, rest = divmod(t.shape[0], z.shape[0])
        if rest:
            raise ValueError(f"{t.shape[0]} timesteps are not a whole number of repeats of {z.shape[0]} conditions")
        return self.time_embed.embed_integers(t, num_timesteps) + self.cond_embed(z).repeat(repeats, 1)

    def forward_embedded(self, x: Tensor, c: Tensor) -> Tensor:
        """Denoiser output from a ready conditioning vector ``c`` ``[N, width]`` (``time_embed(t) + cond_embed(z)``).

        Samplers use it to embed the conditions once per AR step and the (shared) timestep once per denoising step.
        Without autograd (sampling) all modulations come from one stacked matrix product (:meth:`modulations`),
        except inside ``torch.compile`` (the weight cache is Python state; the compiler fuses the per-block path).
        """
        h = self.input_proj(x)  # (N, W)
        if torch.is_grad_enabled() or torch.compiler.is_compiling():  # stacking costs more with autograd
            for block in self.blocks:
                h = block(h, c)
            return self.final(h, c)
        modulations = self.modulations(c)
        for block, modulation in zip(self.blocks, modulations):
            h = block.modulated(h, modulation)
        return self.final.modulated(h, modulations[-1])

    def modulations(self, c: Tensor) -> tuple[Tensor, ...]:
        """Every block's and the final layer's ``modulation(c)`` from one matrix product: each is a linear map of
        the same ``SiLU(c)`` ``[N, W]``, so their weights are stacked (``[(3 * depth + 2) * W, W]``) and applied once.

        Returns:
            ``depth`` tensors ``[N, 3W]`` and one ``[N, 2W]``.
        """
        weight, bias = self._stacked_modulation()
        out = F.linear(F.silu(c), weight, bias)  # (N, (3 * depth + 2) * W)
        return out.split(self._modulation_sizes, dim=-1)

    @property
    def _modulation_layers(self) -> list[nn.Linear]:
        return [block.modulation[-1] for block in self.blocks] + [self.final.modulation[-1]]

    @property
    def _modulation_sizes(self) -> list[int]:
        return [layer.out_features for layer in self._modulation_layers]

    def _stacked_modulation(self) -> tuple[Tensor, Tensor]:
        """The stacked modulation weight and bias (kept between sampling calls while the weights are unchanged)."""
        layers = self._modulation_layers
        params = [t for m in layers for t in (m.weight, m.bias)]
        return cached_on_params(self, "_stacked_modulation_cache", params, None, lambda: (
            torch.cat([m.weight for m in layers]), torch.cat([m.bias for m in layers])))
