"""The training/validation/test steps and optimizer setup shared by every generator trained with a diffusion loss."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from lightning_ar.checkpoints.loading import CheckpointError, record_class
from lightning_ar.modules.optim import configure_adamw, run_geometry
from lightning_ar.modules.utils import check_state_shapes, fork_rng
from lightning_ar.seeding import seeded_generator, step_seeds

# Options that define the network of every generator here; each class adds its own (its ``ARCHITECTURE``): a
# checkpoint's values win over a config's; a config that disagrees is an error (checkpoints.precedence).
NETWORK_OPTIONS = ("patch_size", "width", "encoder_depth", "decoder_depth", "num_heads", "mlp_ratio", "head_width",
                   "head_depth", "num_train_timesteps")


class DiffusionLossSteps:
    """Mixin for a LightningModule with ``diffusion_loss(latents, labels, generator) -> scalar``.

    Training randomness comes from seeds of ``(hparams.seed, global_step, rank)`` (an explicit generator, and the global
    RNG forked and seeded for dropout), so a resumed run repeats an uninterrupted one; validation/test losses are
    seeded by the batch index. The module provides ``optimizer_factory``, ``lr_scheduler_factory`` and
    :meth:`no_decay_modules`; ``hparams.base_lr``/``hparams.warmup_epochs``, when set, apply MAR's learning-rate
    recipe with the run's world size, batch size and epoch length (:mod:`lightning_ar.modules.optim`).
    """

    def no_decay_modules(self) -> tuple[nn.Module, ...]:
        """Modules whose parameters get no weight decay (MAR exempts its diffusion head)."""
        return ()

    def check_batch_latents(self, latents: Tensor) -> None:
        """Raise ``ValueError`` naming ``model.latent_shape`` unless ``latents`` is ``[B, *latent_shape]``."""
        if tuple(latents.shape[1:]) != tuple(self.latent_shape):
            raise ValueError(
                f"data latents have shape {tuple(latents.shape[1:])} but model.latent_shape is {self.latent_shape}"
            )

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        seeds = step_seeds(self.hparams.seed, self.global_step, self.global_rank)
        with fork_rng(self.device, seeds[1]):  # dropout draws from the global RNG: seed it per step, then restore
            loss = self.diffusion_loss(*batch, generator=seeded_generator(seeds[0], device=self.device))
        self.log("train/loss", loss, prog_bar=True, batch_size=batch[0].shape[0])
        return loss

    def _eval_loss(self, batch: tuple[Tensor, Tensor], batch_idx: int, stage: str) -> Tensor:
        loss = self.diffusion_loss(*batch, generator=seeded_generator(batch_idx, device=self.device))
        self.log(f"{stage}/loss", loss, prog_bar=stage == "val", batch_size=batch[0].shape[0], sync_dist=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._eval_loss(batch, batch_idx, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._eval_loss(batch, batch_idx, "test")

    def configure_optimizers(self) -> Any:
        base_lr, warmup_epochs = self.hparams.get("base_lr"), self.hparams.get("warmup_epochs")
        geometry = run_geometry(self.trainer) if base_lr is not None or warmup_epochs is not None else None
        return configure_adamw(self, self.no_decay_modules(), self.optimizer_factory, self.lr_scheduler_factory,
                               base_lr, warmup_epochs, geometry)

    # ----------------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record this module's class in the checkpoint (read by the CLI's precedence rule)."""
        record_class(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, naming the file and what differs, a checkpoint of another shape or another latent scale."""
        path = self._trainer.ckpt_path if self._trainer is not None else None
        saved = checkpoint.get("hyper_parameters", {})
        mismatch = check_state_shapes(checkpoint.get("state_dict", {}), self.state_dict())
        if mismatch:
            differ = [f"{k}={saved[k]} (here {self.hparams[k]})" for k in self.hparams
                      if k in saved and saved[k] != self.hparams[k]]
            raise CheckpointError(
                f"checkpoint {path or '(given)'} was saved by a different model: {mismatch}; "
                f"hyper-parameters that differ: {', '.join(differ) or 'none recorded'}"
            )
        scale, here = saved.get("latent_scale"), float(self.hparams.latent_scale)
        if scale is not None and abs(float(scale) / here - 1.0) > 1e-4:
            raise CheckpointError(
                f"checkpoint {path or '(given)'} was trained on latents scaled by {scale}, but the data's latent scale "
                f"is {here}: pin it with --data.latent_scale {scale} (or use the data the model was trained on)"
            )
