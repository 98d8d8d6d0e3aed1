"""``MARGenerator``: the LightningModule that trains and samples a MAR transformer with a per-token diffusion loss."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from lightning_ar.modules.optim import check_lr_recipe
from lightning_ar.modules.steps import NETWORK_OPTIONS, DiffusionLossSteps
from lightning_ar.modules.utils import check_finite_hparams, check_latent_shape, default, eval_mode
from lightning_ar.nn.diffusion_loss import TIMESTEP_SPACINGS, DiffusionLoss
from lightning_ar.nn.mar import MaskedAutoregressiveTransformer, patchify, unpatchify
from lightning_ar.nn.masking import mask_from_orders, num_masked_for_training, random_orders, sample_mask_ratio
from lightning_ar.nn.sampler import ConditionRefiner, check_sampling_args, sample_tokens
from lightning_ar.nn.trace import GenerationTrace
from lightning_ar.progress import default_progress


class MARGenerator(DiffusionLossSteps, L.LightningModule):
    """Class-conditional MAR generator (Li et al., 2024): masked AR transformer + per-token diffusion loss.

    Args:
        latent_shape: ``(C, H, W)`` of one latent (linked from the data module by the CLI).
        num_classes: Number of class labels (linked from the data module).
        latent_scale: Multiplier applied to latents by the data module; ``generate`` divides by it.
        patch_size: Latent patch size; tokens have dimension ``patch_size**2 * C``.
        width: Transformer width (= condition dimension).
        encoder_depth: Encoder blocks.
        decoder_depth: Decoder blocks.
        num_heads: Attention heads.
        mlp_ratio: Transformer MLP ratio.
        buffer_size: Leading class-embedding positions of the encoder (MAR: 64).
        dropout: Attention/projection dropout (MAR: 0.1).
        label_drop_prob: Class-label drop probability for classifier-free guidance (MAR: 0.1).
        head_width: Width of the diffusion MLP.
        head_depth: Residual blocks of the diffusion MLP.
        diffusion_batch_mul: Times each token is repeated with fresh noise and timestep in the loss (MAR: 4).
        num_train_timesteps: Diffusion training steps (MAR: 1000).
        mask_ratio_min: Lower cut of the truncated-normal training mask ratio (MAR: 0.7; 0 lets training see
            contexts up to ``L - 1`` tokens, as the last sampling steps do: at least one token is always masked).
        mask_ratio_std: Standard deviation of that normal (mean 1.0; MAR: 0.25).
        optimizer: Optimizer factory called with parameter groups (default AdamW lr 1e-4, betas (0.9, 0.95),
            weight decay 0.02); biases, norms, embeddings of dimension 1 and the diffusion head get no weight decay.
        lr_scheduler: Scheduler factory, stepped every optimizer step (e.g. ``LinearLR`` for warmup then constant).
        num_iter: Default number of AR sampling steps.
        cfg: Default classifier-free guidance scale (1 = off).
        cfg_schedule: ``linear`` (MAR) or ``constant``.
        temperature: Default sampling temperature.
        num_sampling_steps: Default denoising steps of the head per AR step (MAR: 100).
        sampler: Default head sampler: ``ddpm``, ``ddim`` or ``dpm++``.
        timestep_spacing: Spacing of the head's sampling timesteps: ``leading`` (default), ``linspace`` (MAR's
            respacing; set by ``import-mar``) or ``trailing``.
        seed: Base seed of the training randomness: step ``s`` on process ``r`` draws mask ratio, orders, label drop,
            timesteps, noise and dropout from seeds derived from ``(seed, s, r)``, so a resumed run repeats exactly
            what an uninterrupted one does, whatever the state of the global RNG.
        base_lr: MAR's learning-rate recipe: the optimizer's lr becomes ``base_lr x global batch / 256``, the global
            batch (world size x batch size x gradient accumulation) read from the Trainer in ``configure_optimizers``
            (MAR: 1e-4). ``None``: the optimizer's own lr.
        warmup_epochs: Linear warmup from 0 over this many epochs (steps per epoch from the Trainer: dataset length,
            batch size, world size), then constant (MAR: 100); excludes ``lr_scheduler``. ``None``: no warmup.
    """

    ARCHITECTURE = NETWORK_OPTIONS + ("buffer_size",)  # from the checkpoint, never overridden

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
        mask_ratio_min: float = 0.7,
        mask_ratio_std: float = 0.25,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        num_iter: int = 8,
        cfg: float = 1.0,
        cfg_schedule: str = "linear",
        temperature: float = 1.0,
        num_sampling_steps: int = 100,
        sampler: str = "ddpm",
        timestep_spacing: str = "leading",
        seed: int = 0,
        base_lr: float | None = None,
        warmup_epochs: float | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.latent_shape = check_latent_shape(latent_shape, patch_size)
        c, h, w = self.latent_shape
        self.seq_len, self.token_dim = (h // patch_size) * (w // patch_size), patch_size * patch_size * c
        self._check_options()
        self.mar = MaskedAutoregressiveTransformer(
            self.token_dim, self.seq_len, num_classes, width, encoder_depth, decoder_depth, num_heads, mlp_ratio,
            buffer_size, dropout, label_drop_prob,
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
        for name in ("encoder_depth", "decoder_depth", "num_heads", "head_depth", "head_width", "buffer_size"):
            if int(hp[name]) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {hp[name]}")
        for name in ("dropout", "label_drop_prob"):
            if not 0.0 <= hp[name] < 1.0:
                raise ValueError(f"model.{name} must be in [0, 1), got {hp[name]}")
        if not hp.mlp_ratio > 0:
            raise ValueError(f"model.mlp_ratio must be > 0, got {hp.mlp_ratio}")
        if hp.width % hp.num_heads:
            raise ValueError(f"model.width ({hp.width}) must be divisible by model.num_heads ({hp.num_heads})")
        if hp.diffusion_batch_mul < 1:
            raise ValueError(f"model.diffusion_batch_mul must be >= 1, got {hp.diffusion_batch_mul}")
        if not 0.0 <= hp.mask_ratio_min <= 1.0:
            raise ValueError(f"model.mask_ratio_min must be in [0, 1], got {hp.mask_ratio_min}")
        labels = torch.zeros(1, dtype=torch.long, device="cpu")  # a check, also when built on the meta device
        try:
            check_sampling_args(labels, hp.num_classes, self.seq_len, hp.num_iter, hp.sampler, hp.cfg_schedule,
                                hp.temperature, cfg=hp.cfg, num_sampling_steps=hp.num_sampling_steps)
        except ValueError as err:
            raise ValueError(f"model.{err}") from None
        if not 1 <= hp.num_sampling_steps <= hp.num_train_timesteps:
            raise ValueError(f"model.num_sampling_steps must be in [1, {hp.num_train_timesteps}]")
        if hp.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"model.timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {hp.timestep_spacing!r}")

    # ----------------------------------------------------------------------------------------------- training
    def diffusion_loss(self, latents: Tensor, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Mean diffusion loss over the masked tokens of a batch.

        Args:
            latents: ``[B, C, H, W]`` scaled latents.
            labels: ``[B]`` class labels.
            generator: RNG for mask ratio, orders, label drop, timesteps and noise (global RNG if ``None``).

        Returns:
            Scalar loss.
        """
        self.check_batch_latents(latents)
        tokens = patchify(latents, self.hparams.patch_size)  # (B, L, Dt)
        ratio = sample_mask_ratio(generator, latents.device, low=self.hparams.mask_ratio_min,
                                  std=self.hparams.mask_ratio_std)
        orders = random_orders(tokens.shape[0], self.seq_len, generator, latents.device)
        mask = mask_from_orders(orders, num_masked_for_training(self.seq_len, ratio))  # (B, L)
        z = self.mar(tokens, mask, labels, drop=self.mar.label_drop(labels, generator))  # (B, L, W)
        mul = self.hparams.diffusion_batch_mul
        target, cond = tokens[mask].repeat(mul, 1), z[mask].repeat(mul, 1)  # (B*n*mul, Dt), (B*n*mul, W)
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
        progress: bool | None = None,
    ) -> Tensor:
        """Generate latents for ``labels``; options left ``None`` take the module's defaults.

        The module is switched to eval mode for sampling and restored afterwards. With Lightning's
        ``EMAWeightAveraging`` the weights in use during validation, and those in its checkpoints, are the EMA ones.

        Args:
            labels: ``[B]`` class labels in ``[0, num_classes)``, on the module's device.
            num_iter: AR steps in ``[1, L]``.
            cfg: Guidance scale.
            cfg_schedule: ``linear`` or ``constant``.
            temperature: Sampling temperature.
            num_sampling_steps: Denoising steps of the head.
            sampler: ``ddpm``, ``ddim`` or ``dpm++``.
            generator: ``torch.Generator`` on the module's device (global RNG if ``None``).
            trace: :class:`GenerationTrace` to fill with per-step internals.
            refiner: Hook applied to the conditions of every AR step.
            progress: Show a progress bar over AR steps; ``None`` (default): shown when called from Python,
                notebooks or tools, hidden inside a running Trainer stage (Lightning's bar reports there).

        Returns:
            ``[B, C, H, W]`` latents in the data's unscaled (VAE) space.
        """
        hp = self.hparams
        labels = torch.as_tensor(labels, device=self.device)
        if generator is not None and generator.device.type != labels.device.type:
            raise ValueError(f"generator is on {generator.device} but the model is on {labels.device}")
        with eval_mode(self):
            tokens = sample_tokens(
                self.mar, self.head, labels,
                num_iter=default(num_iter, hp.num_iter),
                cfg=default(cfg, hp.cfg),
                cfg_schedule=default(cfg_schedule, hp.cfg_schedule),
                temperature=default(temperature, hp.temperature),
                num_sampling_steps=default(num_sampling_steps, hp.num_sampling_steps),
                sampler=default(sampler, hp.sampler),
                generator=generator, trace=trace, refiner=refiner, progress=default_progress(progress, self),
            )  # (B, L, Dt)
        latents = unpatchify(tokens, hp.patch_size, *self.latent_shape)  # (B, C, H, W)
        return latents / hp.latent_scale

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Generate one latent per ``(label, index)`` of the batch, seeded by the batch's first index.

        ``LatentDataModule.predict_dataloader`` hands whole index blocks ``[k*B, (k+1)*B)`` to the processes, so the
        output for an index depends on ``(index, batch_size)`` only, not on the number of processes.
        """
        labels, indices = batch
        generator = torch.Generator(self.device).manual_seed(int(indices[0]))
        latents = self.generate(labels, generator=generator)
        return {"latents": latents, "labels": labels, "indices": indices}
