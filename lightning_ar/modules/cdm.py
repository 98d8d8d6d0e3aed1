"""``ConditionalDiffusion``: the conditional diffusion model (CDM) baseline, a DiT-style denoiser over all tokens."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_ar.modules.optim import check_lr_recipe
from lightning_ar.modules.steps import NETWORK_OPTIONS, DiffusionLossSteps
from lightning_ar.modules.utils import check_finite_hparams, check_latent_shape, default, eval_mode
from lightning_ar.nn.diffusion_loss import SAMPLERS, TIMESTEP_SPACINGS
from lightning_ar.nn.dit import ClassEmbedding, SequenceDiffusion
from lightning_ar.nn.mar import patchify, unpatchify
from lightning_ar.nn.sampler import check_sampling_args
from lightning_ar.nn.trace import GenerationTrace


class ConditionalDiffusion(DiffusionLossSteps, L.LightningModule):
    """Class-conditional diffusion over all latent tokens at once ("Baseline (CDM)" of the paper's table).

    One static condition, the class embedding (or the learned null class for guidance), conditions every token and
    every timestep through AdaLN (:class:`~lightning_ar.nn.dit.SequenceDiffusion`). Same schedule, samplers, data
    module, metrics and optimisation as :class:`~lightning_ar.MARGenerator`. ``generate(trace=...)`` records one
    step whose conditions are that static condition, so ``ConditionalScoreNormMonitor`` measures the CDM's score
    norm (one point: no AR steps, hence no decay to fit) for comparison with the AR models' curves.

    Args:
        latent_shape: ``(C, H, W)`` of one latent (linked from the data module by the CLI).
        num_classes: Number of class labels (linked from the data module).
        latent_scale: Multiplier applied to latents by the data module; ``generate`` divides by it.
        patch_size: Latent patch size; tokens have dimension ``patch_size**2 * C``.
        width: Transformer width (= condition dimension).
        encoder_depth: DiT blocks, first part (the stack has ``encoder_depth + decoder_depth`` blocks; the names
            match MAR's so the configs and overlays line up block for block).
        decoder_depth: DiT blocks, second part.
        num_heads: Attention heads.
        mlp_ratio: Transformer MLP ratio.
        dropout: Attention/projection dropout.
        label_drop_prob: Class-label drop probability for classifier-free guidance.
        head_width: Width of the per-token AdaLN MLP output head.
        head_depth: Residual blocks of that head.
        diffusion_batch_mul: Times each image is repeated with fresh noise and timestep in the loss (MAR repeats each
            token as often).
        num_train_timesteps: Diffusion training steps.
        optimizer: Optimizer factory called with parameter groups (default AdamW as in MAR; no decay on biases,
            norms and the output head).
        lr_scheduler: Scheduler factory, stepped every optimizer step.
        num_iter: Not applicable (a CDM has no AR steps); accepted so MAR overlays apply, a value warns.
        cfg: Default classifier-free guidance scale (1 = off), constant over the trajectory.
        temperature: Default sampling temperature.
        num_sampling_steps: Default denoising steps.
        sampler: Default sampler: ``ddpm``, ``ddim`` or ``dpm++``.
        timestep_spacing: Spacing of the sampling timesteps: ``leading`` (default), ``linspace`` (MAR's respacing)
            or ``trailing``.
        base_lr: MAR's learning-rate recipe: the optimizer's lr becomes ``base_lr x global batch / 256``, the global
            batch (world size x batch size x gradient accumulation) read from the Trainer in ``configure_optimizers``
            (MAR: 1e-4). ``None``: the optimizer's own lr.
        warmup_epochs: Linear warmup from 0 over this many epochs (steps per epoch from the Trainer: dataset length,
            batch size, world size), then constant (MAR: 100); excludes ``lr_scheduler``. ``None``: no warmup.
    """

    ARCHITECTURE = NETWORK_OPTIONS  # from the checkpoint, never overridden

    def __init__(
        self,
        latent_shape: tuple[int, int, int] = (1, 8, 8),
        num_classes: int = 10,
        latent_scale: float = 1.0,
        patch_size: int = 2,
        width: int = 256,
        encoder_depth: int = 2,
        decoder_depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        label_drop_prob: float = 0.1,
        head_width: int = 256,
        head_depth: int = 3,
        diffusion_batch_mul: int = 1,
        num_train_timesteps: int = 1000,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        num_iter: int | None = None,
        cfg: float = 1.0,
        temperature: float = 1.0,
        num_sampling_steps: int = 100,
        sampler: str = "ddpm",
        timestep_spacing: str = "leading",
        base_lr: float | None = None,
        warmup_epochs: float | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.latent_shape = check_latent_shape(latent_shape, patch_size)
        c, h, w = self.latent_shape
        self.seq_len, self.token_dim = (h // patch_size) * (w // patch_size), patch_size * patch_size * c
        if num_iter is not None:
            rank_zero_warn(f"model.num_iter={num_iter} does not apply to ConditionalDiffusion (no AR steps)")
        self._check_options()
        self.classes = ClassEmbedding(num_classes, width, label_drop_prob)
        self.head = SequenceDiffusion(self.token_dim, self.seq_len, width, encoder_depth + decoder_depth, num_heads,
                                      mlp_ratio, dropout, head_width, head_depth, num_train_timesteps,
                                      timestep_spacing)
        check_lr_recipe(base_lr, warmup_epochs, lr_scheduler)
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler

    def _check_options(self) -> None:
        hp = self.hparams
        check_finite_hparams(hp)
        checks = [
            (hp.num_classes >= 1, f"model.num_classes must be >= 1, got {hp.num_classes}"),
            (hp.latent_scale > 0, f"model.latent_scale must be > 0, got {hp.latent_scale}"),
            (hp.width % hp.num_heads == 0, f"model.width ({hp.width}) must be divisible by model.num_heads "
                                           f"({hp.num_heads})"),
            (hp.encoder_depth + hp.decoder_depth >= 1, "model.encoder_depth + model.decoder_depth must be >= 1"),
            (hp.diffusion_batch_mul >= 1, f"model.diffusion_batch_mul must be >= 1, got {hp.diffusion_batch_mul}"),
            (hp.sampler in SAMPLERS, f"model.sampler must be one of {SAMPLERS}, got {hp.sampler!r}"),
            (hp.temperature > 0, f"model.temperature must be > 0, got {hp.temperature}"),
            (hp.timestep_spacing in TIMESTEP_SPACINGS,
             f"model.timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {hp.timestep_spacing!r}"),
            (1 <= hp.num_sampling_steps <= hp.num_train_timesteps,
             f"model.num_sampling_steps must be in [1, {hp.num_train_timesteps}], got {hp.num_sampling_steps}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    # ----------------------------------------------------------------------------------------------- training
    def static_conditions(self, labels: Tensor, drop: Tensor | None = None) -> Tensor:
        """The static condition of each image, repeated over its tokens: ``[B]`` labels -> ``[B, L, width]``."""
        return self.classes(labels, drop)[:, None, :].expand(-1, self.seq_len, -1)

    def diffusion_loss(self, latents: Tensor, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Mean diffusion loss of a batch (one timestep per image and repeat).

        Args:
            latents: ``[B, C, H, W]`` scaled latents.
            labels: ``[B]`` class labels.
            generator: RNG for label drop, timesteps and noise (global RNG if ``None``).

        Returns:
            Scalar loss.
        """
        self.check_batch_latents(latents)
        mul = self.hparams.diffusion_batch_mul
        tokens = patchify(latents, self.hparams.patch_size).repeat(mul, 1, 1)  # (B*mul, L, Dt)
        z = self.static_conditions(labels, self.classes.label_drop(labels, generator)).repeat(mul, 1, 1)
        return self.head.sequence_loss(tokens, z, generator).mean()

    def no_decay_modules(self) -> tuple[torch.nn.Module, ...]:
        return (self.head.net.head,)

    # ----------------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def generate(
        self,
        labels: Tensor,
        cfg: float | None = None,
        temperature: float | None = None,
        num_sampling_steps: int | None = None,
        sampler: str | None = None,
        generator: torch.Generator | None = None,
        trace: GenerationTrace | None = None,
    ) -> Tensor:
        """Generate latents for ``labels`` by denoising all tokens together; ``None`` options take the defaults.

        Args:
            labels: ``[B]`` class labels in ``[0, num_classes)``.
            cfg: Guidance scale (constant over the trajectory).
            temperature: Sampling temperature.
            num_sampling_steps: Denoising steps.
            sampler: ``ddpm``, ``ddim`` or ``dpm++``.
            generator: ``torch.Generator`` on the module's device (global RNG if ``None``).
            trace: Filled with one record: all positions, the static conditions ``[B, L, width]`` (and the null
                ones with guidance) and the sampled tokens.

        Returns:
            ``[B, C, H, W]`` latents in the data's unscaled (VAE) space.
        """
        hp = self.hparams
        labels = torch.as_tensor(labels, device=self.device)
        cfg, temperature = default(cfg, hp.cfg), default(temperature, hp.temperature)
        sampler, num_sampling_steps = default(sampler, hp.sampler), default(num_sampling_steps, hp.num_sampling_steps)
        check_sampling_args(labels, hp.num_classes, self.seq_len, 1, sampler, "constant", temperature, cfg=cfg,
                            num_sampling_steps=num_sampling_steps)
        if generator is not None and generator.device.type != labels.device.type:
            raise ValueError(f"generator is on {generator.device} but the model is on {labels.device}")
        b, seq_len = labels.shape[0], self.seq_len
        with eval_mode(self):
            z = self.static_conditions(labels)  # (B, L, W)
            z_null = self.static_conditions(torch.full_like(labels, -1)) if cfg != 1.0 else None
            flat = lambda a: a.reshape(b * seq_len, -1) if a is not None else None  # noqa: E731
            tokens = self.head.sample(
                flat(z), flat(z_null), cfg, temperature, sampler, num_sampling_steps, generator,
            ).view(b, seq_len, self.token_dim)  # (B, L, Dt)
        if trace is not None:
            trace.labels = trace._store(labels)
            positions = torch.arange(seq_len, device=labels.device).expand(b, -1)
            trace.record(0, 0, cfg, positions=positions, conditions=z, tokens=tokens, raw_conditions=None,
                         null_conditions=z_null)
        return unpatchify(tokens, hp.patch_size, *self.latent_shape) / hp.latent_scale

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Generate one latent per ``(label, index)`` of the batch, seeded by the batch's first index."""
        labels, indices = batch
        generator = torch.Generator(self.device).manual_seed(int(indices[0]))
        return {"latents": self.generate(labels, generator=generator), "labels": labels, "indices": indices}
