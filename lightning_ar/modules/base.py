"""``DiffusionGenerator``: what the three generators share (latent shape, option checks, seed, sampling, prediction).

A generator subclass builds its network in ``__init__`` after ``super().__init__(...)`` and implements
``diffusion_loss`` (training, :class:`~lightning_ar.modules.steps.DiffusionLossSteps`) and ``sample_tokens``
(generation); everything else (the flat sampling options and their :class:`~lightning_ar.nn.SamplingOptions`,
``generate``, ``predict_step``, the learning-rate recipe, checkpoint checks) lives here once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_ar.modules.optim import check_lr_recipe
from lightning_ar.modules.steps import DiffusionLossSteps
from lightning_ar.modules.utils import check_finite_hparams, check_latent_shape, partial_last_batch, predict_block
from lightning_ar.nn.diffusion_loss import TIMESTEP_SPACINGS
from lightning_ar.nn.mar import unpatchify
from lightning_ar.nn.modes import eval_mode
from lightning_ar.nn.sampler import ConditionRefiner
from lightning_ar.nn.sampling_options import SamplingOptions
from lightning_ar.nn.sampling_run import SamplingRun
from lightning_ar.nn.trace import GenerationTrace
from lightning_ar.progress import default_progress


class DiffusionGenerator(DiffusionLossSteps, L.LightningModule):
    """Base of the class-conditional generators trained with a diffusion loss on latent tokens.

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
        dropout: Attention/projection dropout.
        label_drop_prob: Class-label drop probability for classifier-free guidance (MAR: 0.1).
        head_width: Width of the diffusion MLP.
        head_depth: Residual blocks of the diffusion MLP.
        diffusion_batch_mul: Times each token is repeated with fresh noise and timestep in the loss (MAR: 4).
        num_train_timesteps: Diffusion training steps (MAR: 1000).
        optimizer: Optimizer factory called with parameter groups (default AdamW lr 1e-4, betas (0.9, 0.95),
            weight decay 0.02); biases, norms, embeddings of dimension 1 and the diffusion head get no weight decay.
        lr_scheduler: Scheduler factory, stepped every optimizer step (e.g. ``LinearLR`` for warmup then constant).
        timestep_spacing: Spacing of the head's sampling timesteps: ``leading`` (default), ``linspace`` (MAR's
            respacing; set by ``import-mar``) or ``trailing``.
        seed: Base seed of the training randomness: step ``s`` on process ``r`` draws masks, orders, label drop,
            timesteps, noise and dropout from seeds derived from ``(seed, s, r)``, so a resumed run repeats exactly
            what an uninterrupted one does, whatever the state of the global RNG.
        base_lr: MAR's learning-rate recipe: the optimizer's lr becomes ``base_lr x global batch / 256``, the global
            batch (world size x batch size x gradient accumulation) read from the Trainer in ``configure_optimizers``
            (MAR: 1e-4). ``None``: the optimizer's own lr.
        warmup_epochs: Linear warmup from 0 over this many epochs (steps per epoch from the Trainer: dataset length,
            batch size, world size), then constant (MAR: 100); excludes ``lr_scheduler``. ``None``: no warmup.
        compile: Train through ``torch.compile``: the pure part of the loss (transformer, head and loss arithmetic,
            after the step's random draws) is compiled once per shape; MAR's masked count takes at most
            ``mask_buckets`` values, so no batch recompiles after those (sampling: ``compile_sampler``). Torch keeps
            the graphs per function: several compiled models in one process share its recompile limit (8 graphs);
            call ``torch._dynamo.reset()`` between them. A smaller last batch per epoch is another shape: set
            ``data.drop_last: true`` (a compiled run warns at its start otherwise). Validation and test losses run
            eager.
        compile_options: Keyword arguments of ``torch.compile`` (``backend``, ``mode``, ...) over our default
            ``dynamic: false`` (one specialised graph per shape, as CUDA graphs need); ``None``: torch's other defaults
            (inductor).
        **sampling: The default sampling options, each a flat option of its own (``--model.cfg``, ...): the fields of
            :class:`~lightning_ar.nn.SamplingOptions` (``num_iter``, ``cfg``, ``cfg_schedule``, ``temperature``,
            ``num_sampling_steps``, ``sampler``, ``compile_sampler``; types, choices and help come from there). Keys
            Lightning stores beside the hyper-parameters (``_class_path``, ...) and hands back when loading a
            checkpoint are ignored; any other name is a ``TypeError``.
    """

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
        dropout: float = 0.1,
        label_drop_prob: float = 0.1,
        head_width: int = 256,
        head_depth: int = 3,
        diffusion_batch_mul: int = 4,
        num_train_timesteps: int = 1000,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        timestep_spacing: str = "leading",
        seed: int = 0,
        base_lr: float | None = None,
        warmup_epochs: float | None = None,
        compile: bool = False,
        compile_options: dict[str, Any] | None = None,
        **sampling: Any,
    ) -> None:
        lightning_keys = [k for k in sampling if k.startswith("_")]  # Lightning's own records (``_class_path``)
        for key in lightning_keys:
            sampling.pop(key)
        unknown = sorted(set(sampling) - set(SamplingOptions.names()))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected option(s) {unknown}")
        try:
            options = SamplingOptions(**sampling)  # the CLI reads the flat options' types and help from here
        except ValueError as err:
            raise ValueError(f"model.{err}") from None
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", *lightning_keys])
        self.hparams.update(dataclasses.asdict(options))  # every sampling default, also those not given
        self.latent_shape = check_latent_shape(latent_shape, patch_size)
        c, h, w = self.latent_shape
        self.seq_len, self.token_dim = (h // patch_size) * (w // patch_size), patch_size * patch_size * c
        check_lr_recipe(base_lr, warmup_epochs, lr_scheduler)
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler

    # ----------------------------------------------------------------------------------------------- options
    def check_options(self) -> None:
        """Raise ``ValueError`` naming the option (``model.<name>``) when a shared option is out of range."""
        hp = self.hparams
        check_finite_hparams(hp)
        for name in ("num_heads", "head_depth", "head_width"):
            _require(int(hp[name]) >= 1, f"{name} must be >= 1, got {hp[name]}")
        for name in ("dropout", "label_drop_prob"):
            _require(0.0 <= hp[name] < 1.0, f"{name} must be in [0, 1), got {hp[name]}")
        _require(hp.num_classes >= 1, f"num_classes must be >= 1, got {hp.num_classes}")
        _require(hp.latent_scale > 0, f"latent_scale must be > 0, got {hp.latent_scale}")
        _require(hp.width % hp.num_heads == 0, f"width ({hp.width}) must be divisible by model.num_heads "
                                               f"({hp.num_heads})")
        _require(hp.diffusion_batch_mul >= 1, f"diffusion_batch_mul must be >= 1, got {hp.diffusion_batch_mul}")
        _require(hp.timestep_spacing in TIMESTEP_SPACINGS,
                 f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {hp.timestep_spacing!r}")
        _require(isinstance(hp.compile, bool), f"compile must be true or false, got {hp.compile!r}")
        _require(hp.compile_options is None or isinstance(hp.compile_options, dict),
                 f"compile_options must be a mapping of torch.compile arguments, got {hp.compile_options!r}")
        try:
            self.default_options.check_for(self.seq_len, hp.num_train_timesteps)
        except ValueError as err:
            raise ValueError(f"model.{err}") from None

    @property
    def default_options(self) -> SamplingOptions:
        """The module's :class:`SamplingOptions` from its flat options (``hparams``)."""
        try:
            return SamplingOptions.from_mapping(self.hparams)
        except ValueError as err:
            raise ValueError(f"model.{err}") from None

    def sampling_options(self, options: SamplingOptions | None = None, **overrides: Any) -> SamplingOptions:
        """``options`` (default :attr:`default_options`) with ``overrides`` (``None`` values ignored) applied."""
        return (self.default_options if options is None else options).replace(**overrides)

    # ----------------------------------------------------------------------------------------------- training
    def compiled(self, name: str, fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        """``fn``, or with ``model.compile`` in training mode its ``torch.compile`` (built once per ``name``, with
        ``dynamic=False`` and ``model.compile_options``); validation and test losses run eager (their batch shapes
        and grad mode would compile graphs of their own). The compiled callables are not state: pickling or copying
        the module drops them."""
        if not self.hparams.compile or not self.training:
            return fn
        cache = self.__dict__.setdefault("_compiled", {})
        if name not in cache:
            cache[name] = torch.compile(fn, **{"dynamic": False, **(self.hparams.compile_options or {})})
        return cache[name]

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_compiled", None)
        return state

    def on_train_start(self) -> None:
        """With ``model.compile``: warn when each epoch ends with a smaller batch (another shape to compile)."""
        if self.hparams.compile:
            loader = self.trainer.train_dataloader
            rest = partial_last_batch(loader)
            if rest is not None and self.trainer.num_training_batches >= len(loader):  # limits may stop before it
                rank_zero_warn(
                    f"model.compile: each epoch's last training batch has {rest[0]} of {rest[1]} items, another "
                    "shape: it compiles graphs of its own (one per masked count) and, past torch's recompile limit "
                    "(8 graphs), runs eager. Set data.drop_last: true (MAR's training drops it too) to keep one "
                    "batch shape.", category=UserWarning)

    def diffusion_loss(self, latents: Tensor, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The generator's training loss on a batch (what ``training_step`` minimises).

        Args:
            latents: ``[B, C, H, W]`` scaled latents.
            labels: ``[B]`` class labels.
            generator: RNG for everything the loss draws (label drop, timesteps, noise; MAR: also the mask ratio and
                orders); the global RNG if ``None``.

        Returns:
            Scalar loss.
        """
        raise NotImplementedError

    # ----------------------------------------------------------------------------------------------- sampling
    def sample_tokens(self, labels: Tensor, options: SamplingOptions, run: SamplingRun) -> Tensor:
        """``[B, L, token_dim]`` tokens for ``labels`` ``[B]`` (the module is in eval mode)."""
        raise NotImplementedError

    @torch.no_grad()
    def generate(
        self,
        labels: Tensor,
        options: SamplingOptions | None = None,
        *,
        generator: torch.Generator | None = None,
        trace: GenerationTrace | None = None,
        refiner: ConditionRefiner | None = None,
        progress: bool | None = None,
        **overrides: Any,
    ) -> Tensor:
        """Generate latents for ``labels``; sampling options not given take the module's defaults.

        The module is switched to eval mode for sampling and restored afterwards. With Lightning's
        ``EMAWeightAveraging`` the weights in use during validation, and those in its checkpoints, are the EMA ones.

        Args:
            labels: ``[B]`` class labels in ``[0, num_classes)``, on the module's device.
            options: A whole :class:`SamplingOptions` (default: the module's).
            generator: ``torch.Generator`` on the module's device (global RNG if ``None``).
            trace: :class:`GenerationTrace` to fill with per-step internals.
            refiner: Hook applied to the conditions of every AR step.
            progress: Show a progress bar over AR steps; ``None`` (default): shown when called from Python,
                notebooks or tools, hidden inside a running Trainer stage (Lightning's bar reports there).
            **overrides: Fields of :class:`SamplingOptions` for this call (``num_iter``, ``cfg``, ``cfg_schedule``,
                ``temperature``, ``num_sampling_steps``, ``sampler``, ``compile_sampler``); a ``None`` keeps the
                default.

        Returns:
            ``[B, C, H, W]`` latents in the data's unscaled (VAE) space.
        """
        options = self.sampling_options(options, **overrides)
        labels = torch.as_tensor(labels, device=self.device)
        if generator is not None and generator.device.type != labels.device.type:
            raise ValueError(f"generator is on {generator.device} but the model is on {labels.device}")
        with eval_mode(self):
            run = SamplingRun(generator, trace, refiner, default_progress(progress, self))
            tokens = self.sample_tokens(labels, options, run)  # (B, L, Dt)
        latents = unpatchify(tokens, self.hparams.patch_size, *self.latent_shape)  # (B, C, H, W)
        return latents / self.hparams.latent_scale

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Generate one latent per ``(label, index)`` of the batch, seeded by the batch's first index
        (:func:`~lightning_ar.modules.utils.predict_block`)."""
        return predict_block(self.generate, batch, self.device)


def _require(ok: bool, message: str) -> None:
    """Raise ``ValueError("model.<message>")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"model.{message}")
