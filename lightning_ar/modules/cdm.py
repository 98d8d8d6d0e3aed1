"""``ConditionalDiffusion``: the conditional diffusion model (CDM) baseline, a DiT-style denoiser over all tokens."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_ar.modules.base import DiffusionGenerator
from lightning_ar.modules.steps import NETWORK_OPTIONS
from lightning_ar.nn.dit import ClassEmbedding, SequenceDiffusion
from lightning_ar.nn.mar import patchify
from lightning_ar.nn.sampling_options import CfgSchedule, SamplingOptions, check_labels
from lightning_ar.nn.sampling_run import SamplingRun


class ConditionalDiffusion(DiffusionGenerator):
    """Class-conditional diffusion over all latent tokens at once ("Baseline (CDM)" of the paper's table).

    One static condition, the class embedding (or the learned null class for guidance), conditions every token and
    every timestep through AdaLN (:class:`~lightning_ar.nn.dit.SequenceDiffusion`). Same schedule, samplers, data
    module, metrics, seed and optimisation options as :class:`~lightning_ar.MARGenerator`
    (:class:`~lightning_ar.modules.base.DiffusionGenerator`'s). ``generate(trace=...)`` records one step whose
    conditions are that static condition, so ``ConditionalScoreNormMonitor`` measures the CDM's score norm (one
    point: no AR steps, hence no decay to fit) for comparison with the AR models' curves.

    Args:
        *args: ``latent_shape``, ``num_classes``, ``latent_scale`` of
            :class:`~lightning_ar.modules.base.DiffusionGenerator`, positionally (or as keywords).
        encoder_depth: DiT blocks, first part (the stack has ``encoder_depth + decoder_depth`` blocks; the names
            match MAR's so the configs and overlays line up block for block).
        decoder_depth: DiT blocks, second part.
        dropout: Attention/projection dropout.
        diffusion_batch_mul: Times each image is repeated with fresh noise and timestep in the loss (MAR repeats each
            token as often).
        num_iter: Not applicable (a CDM has no AR steps); accepted so MAR overlays apply, a value warns.
        cfg_schedule: ``constant`` (guidance is constant over the trajectory; there are no AR steps to ramp over).
        **kwargs: The shared options of :class:`~lightning_ar.modules.base.DiffusionGenerator` (``head_width`` and
            ``head_depth`` size the per-token AdaLN MLP output head).
    """

    ARCHITECTURE = NETWORK_OPTIONS  # from the checkpoint, never overridden

    def __init__(
        self,
        *args: Any,
        encoder_depth: int = 2,
        decoder_depth: int = 2,
        dropout: float = 0.0,
        diffusion_batch_mul: int = 1,
        num_iter: int | None = None,
        cfg_schedule: CfgSchedule = "constant",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, encoder_depth=encoder_depth, decoder_depth=decoder_depth, dropout=dropout,
                         diffusion_batch_mul=diffusion_batch_mul, num_iter=num_iter, cfg_schedule=cfg_schedule,
                         **kwargs)
        if num_iter is not None:
            rank_zero_warn(f"model.num_iter={num_iter} does not apply to ConditionalDiffusion (no AR steps)")
            self.hparams["num_iter"] = None
        self.check_options()
        hp = self.hparams
        self.classes = ClassEmbedding(hp.num_classes, hp.width, hp.label_drop_prob)
        self.head = SequenceDiffusion(self.token_dim, self.seq_len, hp.width, encoder_depth + decoder_depth,
                                      hp.num_heads, hp.mlp_ratio, dropout, hp.head_width, hp.head_depth,
                                      hp.num_train_timesteps, hp.timestep_spacing)

    def check_options(self) -> None:
        super().check_options()
        hp = self.hparams
        if hp.encoder_depth + hp.decoder_depth < 1:
            raise ValueError("model.encoder_depth + model.decoder_depth must be >= 1")
        if hp.cfg_schedule != "constant":
            raise ValueError(f"model.cfg_schedule must be 'constant' for ConditionalDiffusion (no AR steps to ramp "
                             f"guidance over), got {hp.cfg_schedule!r}")

    # ----------------------------------------------------------------------------------------------- training
    def static_conditions(self, labels: Tensor, drop: Tensor | None = None) -> Tensor:
        """The static condition of each image, repeated over its tokens: ``[B]`` labels -> ``[B, L, width]``."""
        return self.classes(labels, drop)[:, None, :].expand(-1, self.seq_len, -1)

    def diffusion_loss(self, latents: Tensor, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Mean diffusion loss of a batch, one timestep per image and repeat (``DiffusionGenerator.diffusion_loss``)."""
        self.check_batch_latents(latents)
        mul = self.hparams.diffusion_batch_mul
        tokens = patchify(latents, self.hparams.patch_size).repeat(mul, 1, 1)  # (B*mul, L, Dt)
        drop = self.classes.label_drop(labels, generator)
        t, noise = self.head.draw_sequence_noise(tokens.shape, tokens.device, tokens.dtype, generator)
        return self.compiled("static_loss", self.static_loss)(tokens, labels, drop, t, noise)

    def static_loss(self, tokens: Tensor, labels: Tensor, drop: Tensor | None, t: Tensor, noise: Tensor) -> Tensor:
        """The loss after its random draws (what ``compile`` compiles).

        Args:
            tokens: ``[B * mul, L, Dt]`` clean tokens, the batch repeated ``diffusion_batch_mul`` times.
            labels: ``[B]`` class labels.
            drop: ``[B]`` bool rows whose label is dropped, or ``None``.
            t: ``[B * mul]`` timesteps, one per image.
            noise: ``[B * mul * L, Dt]`` noise.

        Returns:
            Scalar mean loss.
        """
        z = self.static_conditions(labels, drop).repeat(self.hparams.diffusion_batch_mul, 1, 1)  # (B*mul, L, W)
        return self.head.sequence_loss_given_noise(tokens, z, t, noise).mean()

    def no_decay_modules(self) -> tuple[torch.nn.Module, ...]:
        return (self.head.net.head,)

    # ----------------------------------------------------------------------------------------------- sampling
    def sample_tokens(self, labels: Tensor, options: SamplingOptions, run: SamplingRun) -> Tensor:
        """Denoise all tokens together: ``[B]`` labels -> ``[B, L, Dt]`` tokens (guidance constant over the
        trajectory). ``run.trace`` gets one record: all positions, the static conditions ``[B, L, width]`` (and the null
        ones with guidance) and the sampled tokens."""
        check_labels(labels, self.hparams.num_classes)
        generator, trace = run.generator, run.trace
        if run.refiner is not None:
            raise ValueError("ConditionalDiffusion has no AR steps whose conditions a refiner could move")
        if options.num_iter is not None:
            raise ValueError(f"num_iter does not apply to ConditionalDiffusion (no AR steps), got {options.num_iter}")
        options.check_for(self.seq_len, self.hparams.num_train_timesteps)
        b, seq_len, cfg = labels.shape[0], self.seq_len, options.cfg
        z = self.static_conditions(labels)  # (B, L, W)
        z_null = self.static_conditions(torch.full_like(labels, -1)) if cfg != 1.0 else None
        flat = lambda a: a.reshape(b * seq_len, -1) if a is not None else None  # noqa: E731
        tokens = self.head.sample(flat(z), flat(z_null), options, generator=generator).view(b, seq_len, -1)
        if trace is not None:
            trace.labels = trace._store(labels)
            positions = torch.arange(seq_len, device=labels.device).expand(b, -1)
            trace.record(0, 0, cfg, positions=positions, conditions=z, tokens=tokens, raw_conditions=None,
                         null_conditions=z_null)
        return tokens  # (B, L, Dt)
