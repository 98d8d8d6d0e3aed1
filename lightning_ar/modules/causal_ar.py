"""``CausalARGenerator``: the causal AR variant of the generator (one token per step, KV cache, same diffusion head)."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_ar.modules.optim import check_lr_recipe
from lightning_ar.modules.steps import NETWORK_OPTIONS, DiffusionLossSteps
from lightning_ar.modules.utils import check_finite_hparams, check_latent_shape, default, eval_mode
from lightning_ar.nn.causal import ORDERS, CausalTransformer, sample_causal_tokens
from lightning_ar.nn.diffusion_loss import TIMESTEP_SPACINGS, DiffusionLoss
from lightning_ar.nn.mar import patchify, unpatchify
from lightning_ar.nn.sampler import ConditionRefiner, check_sampling_args
from lightning_ar.nn.trace import GenerationTrace
from lightning_ar.progress import default_progress


class CausalARGenerator(DiffusionLossSteps, L.LightningModule):
    """Class-conditional causal AR generator with a per-token diffusion loss ("Baseline (AR)" of the paper's table).

    A :class:`~lightning_ar.nn.causal.CausalTransformer` (MAR's encoder/decoder layout with causal attention) in a
    fixed order, trained by teacher forcing on every token, sampled one token per AR step with a KV cache. The head,
    schedule, guidance and optimisation are :class:`~lightning_ar.MARGenerator`'s. The transformer is exposed as
    ``mar`` and ``hparams.num_iter`` is the number of tokens, so :class:`~lightning_ar.OTRefinement` (teacher-forced
    condition banks per AR step, the refinement hook) and the theory monitors apply unchanged.

    Args:
        latent_shape: ``(C, H, W)`` of one latent (linked from the data module by the CLI).
        num_classes: Number of class labels (linked from the data module).
        latent_scale: Multiplier applied to latents by the data module; ``generate`` divides by it.
        patch_size: Latent patch size; tokens have dimension ``patch_size**2 * C``.
        width: Transformer width (= condition dimension).
        encoder_depth: Causal blocks before the decoder projection.
        decoder_depth: Causal blocks after it.
        num_heads: Attention heads.
        mlp_ratio: Transformer MLP ratio.
        buffer_size: Leading class-embedding slots.
        dropout: Attention/projection dropout.
        label_drop_prob: Class-label drop probability for classifier-free guidance.
        head_width: Width of the diffusion MLP.
        head_depth: Residual blocks of the diffusion MLP.
        diffusion_batch_mul: Times each token is repeated with fresh noise and timestep in the loss.
        num_train_timesteps: Diffusion training steps.
        order: Generation order: ``raster`` or ``random`` (one fixed permutation, seeded by ``order_seed``).
        order_seed: Seed of the ``random`` order.
        optimizer: Optimizer factory called with parameter groups (default AdamW as in MAR; no decay on biases,
            norms and the diffusion head).
        lr_scheduler: Scheduler factory, stepped every optimizer step.
        num_iter: AR steps; always the number of tokens (one per step). ``None`` means that; another value (e.g.
            from the MAR overlay ``configs/debug.yaml``) is replaced by it with a warning.
        cfg: Default classifier-free guidance scale (1 = off).
        cfg_schedule: ``linear`` (MAR's ramp over the revealed fraction) or ``constant``.
        temperature: Default sampling temperature.
        num_sampling_steps: Default denoising steps of the head per token.
        sampler: Default head sampler: ``ddpm``, ``ddim`` or ``dpm++``.
        timestep_spacing: Spacing of the head's sampling timesteps: ``leading`` (default), ``linspace`` (MAR's
            respacing; set by ``import-mar``) or ``trailing``.
        base_lr: MAR's learning-rate recipe: the optimizer's lr becomes ``base_lr x global batch / 256``, the global
            batch (world size x batch size x gradient accumulation) read from the Trainer in ``configure_optimizers``
            (MAR: 1e-4). ``None``: the optimizer's own lr.
        warmup_epochs: Linear warmup from 0 over this many epochs (steps per epoch from the Trainer: dataset length,
            batch size, world size), then constant (MAR: 100); excludes ``lr_scheduler``. ``None``: no warmup.
    """

    ARCHITECTURE = NETWORK_OPTIONS + ("buffer_size", "order", "order_seed")  # from the checkpoint, never overridden

    def __init__(
        self,
        latent_shape: tuple[int, int, int] = (1, 8, 8),
        num_classes: int = 10,
        latent_scale: float = 1.0,
        patch_size: int = 2,
        width: int = 256,
        encoder_depth: int = 4,
        decoder_depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        buffer_size: int = 4,
        dropout: float = 0.1,
        label_drop_prob: float = 0.1,
        head_width: int = 256,
        head_depth: int = 3,
        diffusion_batch_mul: int = 4,
        num_train_timesteps: int = 1000,
        order: str = "raster",
        order_seed: int = 0,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        num_iter: int | None = None,
        cfg: float = 1.0,
        cfg_schedule: str = "linear",
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
        if num_iter is not None and num_iter != self.seq_len:
            rank_zero_warn(f"model.num_iter={num_iter} does not apply to CausalARGenerator: it samples one token per "
                           f"AR step, {self.seq_len} steps")
        self.hparams["num_iter"] = self.seq_len  # what OTRefinement and the monitors read
        self._check_options()
        self.mar = CausalTransformer(
            self.token_dim, self.seq_len, num_classes, width, encoder_depth, decoder_depth, num_heads, mlp_ratio,
            buffer_size, dropout, label_drop_prob, order, order_seed,
        )
        self.head = DiffusionLoss(self.token_dim, width, head_width, head_depth, num_train_timesteps,
                                  timestep_spacing=timestep_spacing)
        check_lr_recipe(base_lr, warmup_epochs, lr_scheduler)
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler

    def _check_options(self) -> None:
        hp = self.hparams
        check_finite_hparams(hp)
        if hp.num_classes < 1:
            raise ValueError(f"model.num_classes must be >= 1, got {hp.num_classes}")
        if not hp.latent_scale > 0:
            raise ValueError(f"model.latent_scale must be > 0, got {hp.latent_scale}")
        if hp.width % hp.num_heads:
            raise ValueError(f"model.width ({hp.width}) must be divisible by model.num_heads ({hp.num_heads})")
        if hp.diffusion_batch_mul < 1:
            raise ValueError(f"model.diffusion_batch_mul must be >= 1, got {hp.diffusion_batch_mul}")
        if hp.order not in ORDERS:
            raise ValueError(f"model.order must be one of {ORDERS}, got {hp.order!r}")
        if self.seq_len < 2:
            raise ValueError(f"a causal AR model needs at least 2 tokens, got latent_shape {self.latent_shape} with "
                             f"patch_size {hp.patch_size}")
        labels = torch.zeros(1, dtype=torch.long, device="cpu")
        try:
            check_sampling_args(labels, hp.num_classes, self.seq_len, self.seq_len, hp.sampler, hp.cfg_schedule,
                                hp.temperature, cfg=hp.cfg, num_sampling_steps=hp.num_sampling_steps)
        except ValueError as err:
            raise ValueError(f"model.{err}") from None
        if not 1 <= hp.num_sampling_steps <= hp.num_train_timesteps:
            raise ValueError(f"model.num_sampling_steps must be in [1, {hp.num_train_timesteps}]")
        if hp.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"model.timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {hp.timestep_spacing!r}")

    # ----------------------------------------------------------------------------------------------- training
    def diffusion_loss(self, latents: Tensor, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Teacher-forced diffusion loss over all tokens of a batch.

        Args:
            latents: ``[B, C, H, W]`` scaled latents.
            labels: ``[B]`` class labels.
            generator: RNG for label drop, timesteps and noise (global RNG if ``None``).

        Returns:
            Scalar loss.
        """
        self.check_batch_latents(latents)
        tokens = patchify(latents, self.hparams.patch_size)[:, self.mar.order]  # (B, L, Dt) generation order
        z = self.mar.conditions_ordered(tokens, labels, self.mar.label_drop(labels, generator))  # (B, L, W)
        mul = self.hparams.diffusion_batch_mul
        target = tokens.reshape(-1, self.token_dim).repeat(mul, 1)  # (B*L*mul, Dt)
        cond = z.reshape(-1, z.shape[-1]).repeat(mul, 1)  # (B*L*mul, W)
        return self.head(target, cond, generator).mean()

    def no_decay_modules(self) -> tuple[torch.nn.Module, ...]:
        return (self.head,)

    # ----------------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def generate(
        self,
        labels: Tensor,
        num_iter: int | None = None,
        cfg: float | None = None,
        cfg_schedule: str | None = None,
        temperature: float | None = None,
        num_sampling_steps: int | None = None,
        sampler: str | None = None,
        generator: torch.Generator | None = None,
        trace: GenerationTrace | None = None,
        refiner: ConditionRefiner | None = None,
        use_cache: bool = True,
        progress: bool | None = None,
    ) -> Tensor:
        """Generate latents for ``labels``, one token per AR step; options left ``None`` take the defaults.

        Args:
            labels: ``[B]`` class labels in ``[0, num_classes)``.
            num_iter: Must be ``None`` or the number of tokens (accepted for :meth:`MARGenerator.generate`'s
                interface).
            cfg: Guidance scale.
            cfg_schedule: ``linear`` or ``constant``.
            temperature: Sampling temperature.
            num_sampling_steps: Denoising steps of the head.
            sampler: ``ddpm``, ``ddim`` or ``dpm++``.
            generator: ``torch.Generator`` on the module's device (global RNG if ``None``).
            trace: :class:`GenerationTrace` filled with one record per token.
            refiner: Hook applied to the conditions of every AR step.
            use_cache: Sample with the KV cache (``False``: recompute the prefix each step; same tokens).
            progress: Show a progress bar over AR steps; ``None`` (default): shown when called from Python,
                notebooks or tools, hidden inside a running Trainer stage (Lightning's bar reports there).

        Returns:
            ``[B, C, H, W]`` latents in the data's unscaled (VAE) space.
        """
        hp = self.hparams
        if num_iter is not None and num_iter != self.seq_len:
            raise ValueError(f"num_iter must be {self.seq_len} (one token per step) for this model, got {num_iter}")
        labels = torch.as_tensor(labels, device=self.device)
        if generator is not None and generator.device.type != labels.device.type:
            raise ValueError(f"generator is on {generator.device} but the model is on {labels.device}")
        with eval_mode(self):
            tokens = sample_causal_tokens(
                self.mar, self.head, labels,
                cfg=default(cfg, hp.cfg),
                cfg_schedule=default(cfg_schedule, hp.cfg_schedule),
                temperature=default(temperature, hp.temperature),
                num_sampling_steps=default(num_sampling_steps, hp.num_sampling_steps),
                sampler=default(sampler, hp.sampler),
                generator=generator, trace=trace, refiner=refiner, use_cache=use_cache,
                progress=default_progress(progress, self),
            )  # (B, L, Dt)
        return unpatchify(tokens, hp.patch_size, *self.latent_shape) / hp.latent_scale

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Generate one latent per ``(label, index)`` of the batch, seeded by the batch's first index."""
        labels, indices = batch
        generator = torch.Generator(self.device).manual_seed(int(indices[0]))
        return {"latents": self.generate(labels, generator=generator), "labels": labels, "indices": indices}
