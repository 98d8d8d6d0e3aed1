"""``CausalARGenerator``: the causal AR variant of the generator (one token per step, KV cache, same diffusion head)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_ar.modules.base import DiffusionGenerator
from lightning_ar.modules.steps import NETWORK_OPTIONS
from lightning_ar.nn.causal import ORDERS, CausalTransformer, sample_causal_tokens
from lightning_ar.nn.diffusion_loss import DiffusionLoss
from lightning_ar.nn.mar import patchify
from lightning_ar.nn.sampling_options import SamplingOptions
from lightning_ar.nn.sampling_run import SamplingRun
from lightning_ar.nn.transformer_spec import TransformerSpec


class CausalARGenerator(DiffusionGenerator):
    """Class-conditional causal AR generator with a per-token diffusion loss ("Baseline (AR)" of the paper's table).

    A :class:`~lightning_ar.nn.causal.CausalTransformer` (MAR's encoder/decoder layout with causal attention) in a
    fixed order, trained by teacher forcing on every token, sampled one token per AR step with a KV cache. The head,
    schedule, guidance, seed and optimisation options are :class:`~lightning_ar.modules.base.DiffusionGenerator`'s.
    The transformer is exposed as ``mar`` and ``hparams.num_iter`` is the number of tokens, so
    :class:`~lightning_ar.OTRefinement` (teacher-forced condition banks per AR step, the refinement hook) and the
    theory monitors apply unchanged.

    Args:
        *args: ``latent_shape``, ``num_classes``, ``latent_scale`` of
            :class:`~lightning_ar.modules.base.DiffusionGenerator`, positionally (or as keywords).
        buffer_size: Leading class-embedding slots.
        order: Generation order: ``raster`` or ``random`` (one fixed permutation, seeded by ``order_seed``).
        order_seed: Seed of the ``random`` order.
        num_iter: AR steps; always the number of tokens (one per step). ``None`` means that; another value (e.g.
            from the MAR overlay ``configs/debug.yaml``) is replaced by it with a warning.
        use_cache: Sample with the KV cache (``False``: recompute the prefix each step; same tokens, slower).
        **kwargs: The shared options of :class:`~lightning_ar.modules.base.DiffusionGenerator`.
    """

    ARCHITECTURE = NETWORK_OPTIONS + ("buffer_size", "order", "order_seed")  # from the checkpoint, never overridden

    def __init__(
        self,
        *args: Any,
        buffer_size: int = 4,
        order: str = "raster",
        order_seed: int = 0,
        num_iter: int | None = None,
        use_cache: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, num_iter=num_iter, **kwargs)
        if num_iter is not None and num_iter != self.seq_len:
            rank_zero_warn(f"model.num_iter={num_iter} does not apply to CausalARGenerator: it samples one token per "
                           f"AR step, {self.seq_len} steps")
        self.hparams["num_iter"] = self.seq_len  # what OTRefinement and the monitors read
        self.check_options()
        hp = self.hparams
        self.use_cache = use_cache
        self.mar = CausalTransformer(self.token_dim, self.seq_len, hp.num_classes, TransformerSpec.from_mapping(hp),
                                     order, order_seed)
        self.head = DiffusionLoss(self.token_dim, hp.width, hp.head_width, hp.head_depth, hp.num_train_timesteps,
                                  timestep_spacing=hp.timestep_spacing)

    def check_options(self) -> None:
        super().check_options()
        hp = self.hparams
        if hp.order not in ORDERS:
            raise ValueError(f"model.order must be one of {ORDERS}, got {hp.order!r}")
        if self.seq_len < 2:
            raise ValueError(f"a causal AR model needs at least 2 tokens, got latent_shape {self.latent_shape} with "
                             f"patch_size {hp.patch_size}")

    # ----------------------------------------------------------------------------------------------- training
    def diffusion_loss(self, latents: Tensor, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Teacher-forced diffusion loss over all tokens of a batch (see :meth:`DiffusionGenerator.diffusion_loss`)."""
        self.check_batch_latents(latents)
        tokens = patchify(latents, self.hparams.patch_size)[:, self.mar.order]  # (B, L, Dt) generation order
        drop, mul = self.mar.label_drop(labels, generator), self.hparams.diffusion_batch_mul
        t, noise = self.head.draw_noise(tokens.shape[0] * self.seq_len * mul, tokens.device, tokens.dtype, generator)
        return self.compiled("ordered_loss", self.ordered_loss)(tokens, labels, drop, t, noise)

    def ordered_loss(self, tokens: Tensor, labels: Tensor, drop: Tensor | None, t: Tensor, noise: Tensor) -> Tensor:
        """The loss after its random draws (what ``compile`` compiles).

        Args:
            tokens: ``[B, L, Dt]`` clean tokens in generation order.
            labels: ``[B]`` class labels.
            drop: ``[B]`` bool rows whose label is dropped, or ``None``.
            t: ``[B * L * diffusion_batch_mul]`` timesteps.
            noise: ``[B * L * diffusion_batch_mul, Dt]`` noise.

        Returns:
            Scalar mean loss over all tokens and their repeats.
        """
        z = self.mar.conditions_ordered(tokens, labels, drop)  # (B, L, W)
        target = tokens.reshape(-1, self.token_dim)  # (B*L, Dt); the head repeats it diffusion_batch_mul times
        cond = z.reshape(-1, z.shape[-1])  # (B*L, W)
        return self.head.loss_given_noise(target, cond, t, noise).mean()

    def no_decay_modules(self) -> tuple[torch.nn.Module, ...]:
        return (self.head,)

    # ----------------------------------------------------------------------------------------------- sampling
    def sample_tokens(self, labels: Tensor, options: SamplingOptions, run: SamplingRun) -> Tensor:
        """One token per AR step (:func:`~lightning_ar.nn.causal.sample_causal_tokens`, KV cache unless
        ``use_cache`` is off): ``[B]`` labels -> ``[B, L, Dt]`` tokens."""
        return sample_causal_tokens(self.mar, self.head, labels, options, run, use_cache=self.use_cache)
