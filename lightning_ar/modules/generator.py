"""``MARGenerator``: the LightningModule that trains and samples a MAR transformer with a per-token diffusion loss."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_ar.modules.base import DiffusionGenerator
from lightning_ar.modules.steps import NETWORK_OPTIONS
from lightning_ar.nn.diffusion_loss import DiffusionLoss
from lightning_ar.nn.mar import MaskedAutoregressiveTransformer, gather_rows, masked_positions, patchify
from lightning_ar.nn.masking import (
    bucket_masked_count,
    mask_from_orders,
    num_masked_for_training,
    random_orders,
    sample_mask_ratio,
)
from lightning_ar.nn.sampler import sample_tokens
from lightning_ar.nn.sampling_options import SamplingOptions
from lightning_ar.nn.sampling_run import SamplingRun
from lightning_ar.nn.transformer_spec import TransformerSpec


class MARGenerator(DiffusionGenerator):
    """Class-conditional MAR generator (Li et al., 2024): masked AR transformer + per-token diffusion loss.

    The options shared by the generators (shape, network widths and depths, head, optimisation, sampling defaults,
    seed) are :class:`~lightning_ar.modules.base.DiffusionGenerator`'s; these are MAR's own.

    Args:
        *args: ``latent_shape``, ``num_classes``, ``latent_scale`` of
            :class:`~lightning_ar.modules.base.DiffusionGenerator`, positionally (or as keywords).
        buffer_size: Leading class-embedding positions of the encoder (MAR: 64).
        mask_ratio_min: Lower cut of the truncated-normal training mask ratio (MAR: 0.7; 0 lets training see
            contexts up to ``L - 1`` tokens, as the last sampling steps do: at least one token is always masked).
        mask_ratio_std: Standard deviation of that normal (mean 1.0; MAR: 0.25).
        mask_buckets: Distinct masked counts training uses: each batch's count moves to the nearest of this many
            evenly spaced counts between the fewest the ratio allows and ``L`` (a compiled step then sees that many
            shapes). ``None``: every count, except with ``compile`` at most :attr:`COMPILE_BUCKETS` (torch's default
            recompile limit is 8).
        **kwargs: The shared options of :class:`~lightning_ar.modules.base.DiffusionGenerator`.
    """

    ARCHITECTURE = NETWORK_OPTIONS + ("buffer_size",)  # from the checkpoint, never overridden
    COMPILE_BUCKETS = 8

    def __init__(
        self,
        *args: Any,
        buffer_size: int = 4,
        mask_ratio_min: float = 0.7,
        mask_ratio_std: float = 0.25,
        mask_buckets: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.check_options()
        hp = self.hparams
        self.mar = MaskedAutoregressiveTransformer(self.token_dim, self.seq_len, hp.num_classes,
                                                   TransformerSpec.from_mapping(hp))
        self.head = DiffusionLoss(self.token_dim, hp.width, hp.head_width, hp.head_depth, hp.num_train_timesteps,
                                  timestep_spacing=hp.timestep_spacing)

    def check_options(self) -> None:
        super().check_options()
        hp = self.hparams
        for name in ("encoder_depth", "decoder_depth", "buffer_size"):
            if int(hp[name]) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {hp[name]}")
        if not hp.mlp_ratio > 0:
            raise ValueError(f"model.mlp_ratio must be > 0, got {hp.mlp_ratio}")
        if not 0.0 <= hp.mask_ratio_min <= 1.0:
            raise ValueError(f"model.mask_ratio_min must be in [0, 1], got {hp.mask_ratio_min}")
        if hp.mask_buckets is not None and int(hp.mask_buckets) < 1:
            raise ValueError(f"model.mask_buckets must be >= 1 or null, got {hp.mask_buckets}")
        if hp.num_iter is None:
            raise ValueError("model.num_iter must be an integer in [1, L] (the number of AR steps), got None")

    # ----------------------------------------------------------------------------------------------- training
    def diffusion_loss(self, latents: Tensor, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Mean diffusion loss over the masked tokens of a batch; the mask ratio and orders come from ``generator`` too
        (see :meth:`DiffusionGenerator.diffusion_loss`)."""
        self.check_batch_latents(latents)
        tokens = patchify(latents, self.hparams.patch_size)  # (B, L, Dt)
        hp, b = self.hparams, tokens.shape[0]
        n = self.training_masked_count(sample_mask_ratio(generator, latents.device, low=hp.mask_ratio_min,
                                                         std=hp.mask_ratio_std))
        mask = mask_from_orders(random_orders(b, self.seq_len, generator, latents.device), n)  # (B, L)
        drop = self.mar.label_drop(labels, generator)
        t, noise = self.head.draw_noise(b * n * hp.diffusion_batch_mul, tokens.device, tokens.dtype, generator)
        return self.compiled("masked_loss", self.masked_loss)(tokens, mask, labels, drop, t, noise, n)

    def training_masked_count(self, ratio: float) -> int:
        """Masked tokens per row for a training mask ratio (``ceil(L * ratio)``, bucketed by ``mask_buckets``)."""
        hp = self.hparams
        buckets = self.COMPILE_BUCKETS if hp.mask_buckets is None and hp.compile else hp.mask_buckets
        fewest = num_masked_for_training(self.seq_len, hp.mask_ratio_min)
        return bucket_masked_count(num_masked_for_training(self.seq_len, ratio), self.seq_len, fewest, buckets)

    def masked_loss(self, tokens: Tensor, mask: Tensor, labels: Tensor, drop: Tensor | None, t: Tensor,
                    noise: Tensor, num_masked: int) -> Tensor:
        """The loss after its random draws (what ``compile`` compiles: static shapes for a given ``num_masked``).

        Args:
            tokens: ``[B, L, Dt]`` clean tokens.
            mask: ``[B, L]`` bool, ``num_masked`` ``True`` per row.
            labels: ``[B]`` class labels.
            drop: ``[B]`` bool rows whose label is dropped, or ``None``.
            t: ``[B * num_masked * diffusion_batch_mul]`` timesteps.
            noise: ``[B * num_masked * diffusion_batch_mul, Dt]`` noise.
            num_masked: Masked tokens per row.

        Returns:
            Scalar mean loss over the masked tokens and their repeats.
        """
        z = self.mar(tokens, mask, labels, drop=drop, num_masked=num_masked)  # (B, L, W)
        idx = masked_positions(mask, num_masked)  # (B, n)
        target = gather_rows(tokens, idx).flatten(0, 1)  # (B*n, Dt); the head repeats it diffusion_batch_mul times
        cond = gather_rows(z, idx).flatten(0, 1)  # (B*n, W)
        return self.head.loss_given_noise(target, cond, t, noise).mean()

    def no_decay_modules(self) -> tuple[torch.nn.Module, ...]:
        return (self.head,)

    # ----------------------------------------------------------------------------------------------- sampling
    def sample_tokens(self, labels: Tensor, options: SamplingOptions, run: SamplingRun) -> Tensor:
        """MAR's sampler (:func:`~lightning_ar.nn.sampler.sample_tokens`): ``[B]`` labels -> ``[B, L, Dt]`` tokens."""
        return sample_tokens(self.mar, self.head, labels, options, run)
