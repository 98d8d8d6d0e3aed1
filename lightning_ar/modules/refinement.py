"""``OTRefinement``: move a frozen MAR generator's per-step conditions toward ideal ones (SPEC section 2.3).

This is this project's concrete reading of the condition refinement of Zhou, Li and Shen (ICLR 2026): the paper's
Algorithm 1 is not public. ``fit`` first estimates the ideal conditions by teacher forcing on real data (a
:class:`ConditionBank` per AR step from the training split, and a held-out bank from the validation split used only
for measuring), then (optional) trains an :class:`AmortizedRefiner` with the same objective on conditions produced by
the generator's own sampling. At the end of the bank phase the batch-independent entropic map
(:mod:`lightning_ar.nn.entropic_map`) is fitted per AR step between a pool of the generator's own conditions
(``map_pool_samples`` sequences, on-policy) and the bank. ``test``/``predict`` generate with refinement mode
``none``, ``flow``, ``map`` or ``amortized``.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor

from lightning_ar.checkpoints.loading import (
    CheckpointError,
    build_from_checkpoint,
    class_path_of,
    record_class,
    resolve_class,
)
from lightning_ar.lightning_compat import own_hyperparameters
from lightning_ar.modules.causal_ar import CausalARGenerator
from lightning_ar.modules.generator import MARGenerator
from lightning_ar.modules.utils import check_finite_hparams, default, predict_block
from lightning_ar.nn.amortized_refiner import AmortizedRefiner
from lightning_ar.nn.condition_bank import ConditionBank
from lightning_ar.nn.context_features import CONTEXT_METRICS, ContextSpec
from lightning_ar.nn.entropic_map import EntropicMap, MapSettings
from lightning_ar.nn.inverse_process import ProximalMapHook, ProximalOptions, TokenConditionMap
from lightning_ar.nn.mar import patchify
from lightning_ar.nn.masking import cosine_schedule
from lightning_ar.nn.refine import FlowOptions, LabelledConditions
from lightning_ar.nn.refiner_targets import (
    ExactConditionals,
    NoisyContexts,
    exact_step_targets,
    head_denoising_loss,
)
from lightning_ar.nn.refiners import (
    AmortizedHook,
    ChainedHooks,
    FlowRefiner,
    FlowSettings,
    MapFitter,
    MapHook,
    labelled_divergence,
)
from lightning_ar.nn.sampler import ConditionRefiner, call_hook
from lightning_ar.nn.teacher_forcing import teacher_forced_conditions
from lightning_ar.nn.trace import GenerationTrace
from lightning_ar.progress import default_progress
from lightning_ar.seeding import seeded_generator
from lightning_ar.theory.condition_errors import ConditionModel
from lightning_ar.theory.conditions import measurement_blur
from lightning_ar.theory.grouped_sinkhorn import group_clouds, grouped_divergence

MODES = ("none", "flow", "map", "amortized", "proximal")
REFINER_OBJECTIVES = ("divergence", "exact", "noisy_context")


def load_generator(generator: str | L.LightningModule | None, generator_hparams: dict | None) -> L.LightningModule:
    """The frozen generator (a :class:`MARGenerator` or :class:`CausalARGenerator`): a module, a checkpoint path, or
    (when reloading a refinement) its saved hparams."""
    with own_hyperparameters():
        return _load_generator(generator, generator_hparams)


GENERATORS: tuple[type[L.LightningModule], ...] = (MARGenerator, CausalARGenerator)


def _unrecorded_class(hparams: dict) -> type[L.LightningModule]:
    """A checkpoint that records no class (an older file): read as a :class:`MARGenerator`; hyper-parameters of
    another class are then refused with the file named (``build_from_checkpoint``)."""
    return MARGenerator


def _load_generator(generator: str | L.LightningModule | None, generator_hparams: dict | None) -> L.LightningModule:
    if isinstance(generator, GENERATORS):
        return generator
    if generator is not None and Path(generator).is_file():
        return build_from_checkpoint(generator, "model.generator", GENERATORS, _unrecorded_class)
    if generator_hparams is not None:  # weights come from the refinement checkpoint's state dict
        hparams = {k: v for k, v in generator_hparams.items() if not k.startswith("_")}
        recorded = generator_hparams.get("_class_path")
        cls = resolve_class(recorded) if recorded else _unrecorded_class(hparams)
        return cls(**hparams)
    if generator is None:
        raise ValueError("model.generator must be the path of a MARGenerator or CausalARGenerator checkpoint")
    raise FileNotFoundError(f"model.generator: checkpoint {generator} does not exist")


def _context_spec(weight: float, length: float, metric: str) -> ContextSpec | None:
    """The context spec of ``model.map_context_*`` (``None`` for weight 0), with errors naming the options."""
    if not weight >= 0:
        raise ValueError(f"model.map_context_weight must be >= 0 (0: no context), got {weight}")
    if not length > 0:
        raise ValueError(f"model.map_context_length must be > 0, got {length}")
    if metric not in CONTEXT_METRICS:
        raise ValueError(f"model.map_context_metric must be one of {CONTEXT_METRICS}, got {metric!r}")
    return ContextSpec(length, metric) if weight > 0 else None



def _check_options(hp: Any) -> None:
    """Raise a ``ValueError`` naming the ``model.`` option that is out of range."""
    if hp["mode"] not in MODES:
        raise ValueError(f"model.mode must be one of {MODES}, got {hp['mode']!r}")
    if hp["refiner_objective"] not in REFINER_OBJECTIVES:
        raise ValueError(f"model.refiner_objective must be one of {REFINER_OBJECTIVES}, "
                         f"got {hp['refiner_objective']!r}")
    if not 0.0 <= hp["refiner_corruption"] <= 1.0:
        raise ValueError(f"model.refiner_corruption must be in [0, 1], got {hp['refiner_corruption']}")
    if hp["bank_epochs"] < 1 or hp["teacher_passes"] < 1:
        raise ValueError("model.bank_epochs and model.teacher_passes must be >= 1")
    if hp["map_pool_samples"] < 0 or hp["map_pool_size"] < 1:
        raise ValueError("model.map_pool_samples must be >= 0 and model.map_pool_size >= 1")
    if hp["map_cfg"] is not None and not hp["map_cfg"] >= 1:
        raise ValueError(f"model.map_cfg must be >= 1 (or null: the generator's cfg), got {hp['map_cfg']}")

def _proximal_options(hp: Any) -> ProximalOptions:
    """Mode ``proximal``'s steps from ``model.proximal_*`` and ``model.inverse_weight``, errors naming the option."""
    try:
        options = ProximalOptions(hp.proximal_steps, hp.proximal_eta, hp.proximal_schedule, hp.proximal_lam,
                                  hp.inverse_weight)
    except ValueError as err:
        raise ValueError(f"model.{str(err).replace('proximal ', 'proximal_', 1)}") from None
    if hp.inverse_weight > 0 and not hp.inverse_map:
        raise ValueError(f"model.inverse_weight={hp.inverse_weight} needs model.inverse_map: true (the "
                         "token-to-condition map is fitted during the bank phase)")
    return options


class OTRefinement(L.LightningModule):
    """Condition refinement of a frozen :class:`MARGenerator` by a Sinkhorn Wasserstein gradient flow.

    Args:
        generator: Path of a ``MARGenerator`` checkpoint, or the module itself (frozen, saved with this module).
        latent_shape: Linked from the data; must match the generator's.
        num_classes: Linked from the data; must match the generator's.
        latent_scale: Linked from the data; must match the generator's.
        bank_capacity: Ideal conditions kept per AR step (reservoir over the training split).
        heldout_capacity: Held-out ideal conditions per AR step (validation split; used only to measure).
        bank_epochs: Leading ``fit`` epochs spent filling the banks (the rest train the amortised refiner).
        teacher_passes: Random orders per real batch and epoch in teacher forcing.
        null_bank: Also build a bank of null-class conditions and refine the CFG null branch: the flow moves it
            toward that bank; with ``map_pool_samples > 0`` a second entropic map (one class) is fitted on the null
            branch of the pool's guided sampling (``fit_map`` at ``map_cfg``), so ``refine: map`` refines both
            branches of the guided prediction.
        flow_steps: Flow steps ``K`` per AR step.
        flow_eta: Flow step size. ``eta = 1`` moves every condition onto its transport target in the bank sample in
            one step; on held-out ideal conditions that over-fits the finite target (the divergence to held-out data
            rose on gmm with ``K=8, eta=1`` and 512 targets, and fell with ``K=2, eta=0.3``), hence a partial
            default flow: one step of ``eta = 0.6`` (on digits it lowers the held-out divergence as much as two steps
            of 0.3, 39% vs 36%, at half the cost).
        flow_blur: Sinkhorn blur, in condition units.
        flow_scaling: epsilon-scaling factor of the Sinkhorn solver.
        flow_lam: Proximity weight ``lambda``.
        flow_schedule: Flow step sizes: ``constant`` or ``harmonic`` (step ``j`` is ``flow_eta / (j + 1)``).
        label_weight: Weight of the class/position one-hots appended to both clouds.
        target_size: Bank samples per AR step used as the flow's target.
        refiner_hidden: Hidden width of the amortised refiner.
        refiner_depth: Hidden layers of the amortised refiner.
        refiner_sampling_steps: Head denoising steps of the generations that train the amortised refiner.
        refiner_objective: What the amortised refiner is trained on: ``divergence`` (default: the flow's objective,
            the labelled Sinkhorn divergence of the refined conditions to the bank) or ``exact`` (issue 15 item 5a:
            the frozen head's denoising loss at the refined condition on exact draws of the step's tokens given the
            generated context; needs a source with exact conditionals, ``data.source: gmm``; see
            :mod:`lightning_ar.nn.refiner_targets`) or ``noisy_context`` (item 5b, for real data: the head's loss
            at the refined condition on the real next tokens, the condition computed from a real context in which
            each revealed token is, with probability ``refiner_corruption``, the model's own draw given the real
            context of its step).
        refiner_corruption: Share of the revealed real tokens replaced by the model's draws (``noisy_context``).
        refiner_on_policy: Generate the refiner's training contexts with the refiner itself in the sampling loop
            (DAgger-style: it learns on the contexts it produces); ``False`` (default): with the plain generator.
        map_pool_samples: Sequences generated (one batch, on-policy) to fit the entropic map at the end of the bank
            phase; 0 (default) skips the map. A step that predicts ``n`` tokens per sequence gets
            ``n * map_pool_samples`` pool conditions, subsampled to ``map_pool_size``.
        map_pool_size: Pool conditions kept per AR step (map buffers: ``[num_iter, map_pool_size, D + L]``).
        map_blur_fraction: Blur of the map as a fraction of the bank's within-(class, position) RMS spread. 2.0 was
            chosen on the null test alone (an exploration on gmm R0 seed 0, AR step 3, pool and bank of 16,000: it
            moved conditions by 0.061x their spread at 2.0 and 0.112x at 1.0; the limit is 0.1); a smaller blur
            resolves finer errors but needs larger pools.
        map_position_weight: Weight of the position one-hot in the map's cost (0: positions are not labelled;
            transport never crosses classes).
        map_debias: Subtract the pool's self-transport (the map then leaves a pool drawn from the target alone).
        map_sampling_steps: Head denoising steps of the pool's generation (``None``: the generator's).
        map_cfg: Guidance scale of the pool's generation (``None``: the generator's ``cfg``); the map is fitted
            on-policy, so fit it at the scale it will be used at (the null branch's map needs ``map_cfg > 1``).
        map_context_weight: 0 (default): the map transports on (class, position) only. ``> 0``: the context-aware
            map (issue 15, item 2): each condition also carries the feature of its revealed context
            (:mod:`lightning_ar.nn.context_features`; the bank stores that of each ideal condition's real context),
            scaled to this multiple of the conditions' within-group spread; the null branch's map takes no context.
        map_context_length: Decay length (in token positions) of the context feature's distance weights.
        map_context_metric: Distance between token positions: ``raster`` (the ``gmm`` source's AR(1) order) or
            ``grid`` (square image token grids).
        proximal_steps: Steps of refinement mode ``proximal`` (issue 15 item 4,
            :mod:`lightning_ar.nn.inverse_process`): ``z <- z + eta_j ((T(z) - z) + lam (z0 - z) + mu (g(x) - z))``
            with ``T`` the fitted entropic map (needs ``map_pool_samples > 0``), ``x`` a token re-denoised from
            ``z`` by the head at the generator's sampling settings and ``g`` the token-to-condition map.
        proximal_eta: First step size ``eta`` of mode ``proximal``.
        proximal_schedule: ``constant`` or ``harmonic`` step sizes of mode ``proximal``.
        proximal_lam: Proximal weight ``lam`` of mode ``proximal`` (acts from its second step on).
        inverse_weight: Weight ``mu`` of the inverse-process anchor of mode ``proximal`` (0: no re-denoising);
            ``> 0`` needs ``inverse_map``.
        inverse_map: Fit the token-to-condition map ``g`` (ridge regression per AR step of the ideal conditions on
            the real token each predicts, with class and position intercepts) during the bank phase; its buffers are
            ``[num_iter, F, F + D]`` doubles with ``F = token_dim + num_classes + seq_len + 1``.
        mode: Default refinement mode of ``generate``/``predict``: ``none``, ``flow``, ``map``, ``amortized`` or
            ``proximal``.
        seed: Seed of teacher forcing and of the flow's target subsampling.
        optimizer: Optimizer factory for the amortised refiner (default AdamW, lr 1e-3).
        generator_hparams: Set automatically (the generator's hyper-parameters, to rebuild it from a checkpoint).
    """

    # Options that define the module's buffers and networks: a checkpoint's values win.
    ARCHITECTURE = ("bank_capacity", "heldout_capacity", "null_bank", "refiner_hidden", "refiner_depth",
                    "inverse_map", "map_pool_size", "map_context_weight", "map_context_length", "map_context_metric")

    def __init__(
        self,
        generator: str | MARGenerator | None = None,
        latent_shape: tuple[int, int, int] | None = None,
        num_classes: int | None = None,
        latent_scale: float | None = None,
        bank_capacity: int = 4096,
        heldout_capacity: int = 2048,
        bank_epochs: int = 1,
        teacher_passes: int = 4,
        null_bank: bool = False,
        flow_steps: int = 1,
        flow_eta: float = 0.6,
        flow_blur: float = 0.5,
        flow_scaling: float = 0.3,
        flow_lam: float = 0.0,
        flow_schedule: str = "constant",
        label_weight: float = 100.0,
        target_size: int = 1024,
        refiner_hidden: int = 256,
        refiner_depth: int = 2,
        refiner_sampling_steps: int = 20,
        refiner_objective: str = "divergence",
        refiner_on_policy: bool = False,
        refiner_corruption: float = 0.5,
        map_pool_samples: int = 0,
        map_pool_size: int = 4096,
        map_blur_fraction: float = 2.0,
        map_position_weight: float = 0.0,
        map_debias: bool = True,
        map_sampling_steps: int | None = None,
        map_cfg: float | None = None,
        map_context_weight: float = 0.0,
        map_context_length: float = 1.0,
        map_context_metric: str = "raster",
        proximal_steps: int = 3,
        proximal_eta: float = 0.5,
        proximal_schedule: str = "constant",
        proximal_lam: float = 0.0,
        inverse_weight: float = 0.0,
        inverse_map: bool = False,
        mode: str = "flow",
        seed: int = 0,
        optimizer: OptimizerCallable | None = None,
        generator_hparams: dict | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["generator", "optimizer"])
        gen = load_generator(generator, generator_hparams).requires_grad_(False).eval()
        self.hparams["generator_hparams"] = {**dict(gen.hparams), "_class_path": class_path_of(gen)}
        self.mar_generator = gen
        self._check_data_link(latent_shape, num_classes, latent_scale)
        check_finite_hparams(self.hparams)
        _check_options(self.hparams)
        self.flow = FlowSettings(FlowOptions(flow_steps, flow_eta, flow_blur, flow_scaling, flow_lam, flow_schedule),
                                 label_weight, target_size)
        self.proximal = _proximal_options(self.hparams)
        num_iter, width = gen.hparams.num_iter, gen.mar.width
        self.schedule = cosine_schedule(gen.seq_len, num_iter)
        self.context_spec = _context_spec(map_context_weight, map_context_length, map_context_metric)
        context_dim = gen.token_dim if self.context_spec is not None else 0
        self.bank = ConditionBank(num_iter, bank_capacity, width, context_dim)
        self.heldout = ConditionBank(num_iter, heldout_capacity, width)
        self.null = ConditionBank(num_iter, bank_capacity, width) if null_bank else None
        self.refiner = AmortizedRefiner(width, num_iter, gen.hparams.num_classes, refiner_hidden, refiner_depth)
        self.inverse = TokenConditionMap(num_iter, gen.token_dim, gen.hparams.num_classes, gen.seq_len, width) \
            if inverse_map else None  # (num_iter, F, F + D) doubles
        settings = MapSettings(blur_fraction=map_blur_fraction, position_weight=map_position_weight, debias=map_debias,
                               context_weight=map_context_weight)
        self.entropic_map = EntropicMap(num_iter, bank_capacity, map_pool_size, width, gen.seq_len, settings,
                                        context_dim)
        self.null_map = EntropicMap(num_iter, bank_capacity, map_pool_size, width, gen.seq_len, settings) \
            if null_bank else None
        self.map_fit_stats: dict[str, Any] = {}
        self.optimizer_factory = optimizer
        self.last_generation_stats: dict[str, float] = {}

    def _check_data_link(self, latent_shape, num_classes, latent_scale) -> None:
        gen = self.mar_generator
        if latent_shape is not None and tuple(latent_shape) != gen.latent_shape:
            raise ValueError(f"data latent_shape {tuple(latent_shape)} differs from the generator's {gen.latent_shape}")
        if num_classes is not None and num_classes != gen.hparams.num_classes:
            raise ValueError(f"data num_classes {num_classes} differs from the generator's {gen.hparams.num_classes}")
        if latent_scale is not None and abs(latent_scale / gen.hparams.latent_scale - 1) > 1e-4:
            raise ValueError(
                f"data latent_scale {latent_scale} differs from the generator's {gen.hparams.latent_scale}"
            )

    def train(self, mode: bool = True) -> OTRefinement:
        """Set the mode of the trainable parts; the generator stays frozen in eval mode."""
        super().train(mode)
        self.mar_generator.eval()
        return self

    # ------------------------------------------------------------------------------------------- bank phase
    def _rng(self, batch_idx: int, stream: int) -> torch.Generator:
        seed = ((self.hparams.seed * 1009 + self.current_epoch) * 100_003 + batch_idx) * 4 + stream
        return seeded_generator(seed, self.global_rank, stride=max(self.trainer.world_size, 1), device=self.device)

    @torch.no_grad()
    def fill_bank(self, bank: ConditionBank, latents: Tensor, labels: Tensor, generator: torch.Generator) -> None:
        """Teacher-force a batch of real latents ``[B, C, H, W]`` at every AR step into ``bank``."""
        tokens = patchify(latents, self.mar_generator.hparams.patch_size)  # (B, L, Dt)
        for _ in range(self.hparams.teacher_passes):
            for k in range(len(self.schedule)):
                spec = self.context_spec if bank.context_dim else None
                sc = teacher_forced_conditions(self.mar_generator.mar, tokens, labels, self.schedule, k, generator,
                                               spec)
                bank.add(k, sc.conditions, sc.labels, sc.positions, generator, sc.context)
                if self.inverse is not None and bank is self.bank:
                    per_row = len(sc.labels) // len(tokens)  # tokens this step predicts per sequence
                    rows = torch.arange(len(tokens), device=tokens.device).repeat_interleave(per_row)
                    self.inverse.accumulate(k, tokens[rows, sc.positions], sc.labels, sc.positions, sc.conditions)
                if self.null is not None and bank is self.bank:
                    null = teacher_forced_conditions(
                        self.mar_generator.mar, tokens, torch.full_like(labels, -1), self.schedule, k, generator
                    )
                    self.null.add(k, null.conditions, torch.zeros_like(null.labels), null.positions, generator)

    def _bank_phase(self) -> bool:
        return self.current_epoch < self.hparams.bank_epochs

    def on_train_epoch_end(self) -> None:
        """After the last bank epoch: solve the token-to-condition map (``inverse_map``; its normal equations summed
        over the ranks) and fit the entropic map (``map_pool_samples > 0``)."""
        if self.current_epoch == self.hparams.bank_epochs - 1 and self.inverse is not None:
            for name in ("xtx", "xtz", "count"):
                total = self.trainer.strategy.reduce(getattr(self.inverse, name), reduce_op="sum")
                getattr(self.inverse, name).copy_(total)
            self.inverse.solve()
        if self.current_epoch == self.hparams.bank_epochs - 1 and self.hparams.map_pool_samples > 0:
            stats = self.fit_map()
            self.log("refine/map_marginal_error", stats["max_marginal_error"], batch_size=1)
            self.log("refine/map_fit_seconds", stats["seconds"], batch_size=1)

    @torch.no_grad()
    def fit_map(self, num_samples: int | None = None, seed: int | None = None,
                upstream: ConditionRefiner | None = None, cfg: float | None = None) -> dict[str, Any]:
        """Fit the entropic map of every AR step on the generator's own sampling (one batch, on-policy).

        ``num_samples`` balanced labels (default ``map_pool_samples``) are generated with a :class:`MapFitter`
        hook: at step ``k`` the map is fitted between that step's conditions and bank bucket ``k``, then applied,
        so later steps see refined contexts. ``upstream`` (e.g. an injected control of
        :mod:`lightning_ar.nn.controls`) is applied to the conditions before the fitter sees them, so the map is
        fitted to a generator with that defect. The pool is generated at guidance ``cfg`` (default ``map_cfg``, else
        the generator's); with a null bank and ``cfg > 1`` the null branch's map is fitted on the same pass. Returns
        (and keeps in ``map_fit_stats``) the pool size and marginal error of each step, and the seconds spent. Every
        rank fits the same map (same seed).
        """
        num_samples = default(num_samples, self.hparams.map_pool_samples)
        if num_samples < 1:
            raise ValueError(f"fit_map needs num_samples >= 1, got {num_samples}")
        start = time.perf_counter()
        labels = torch.arange(num_samples, device=self.device) % self._num_classes
        generator = seeded_generator(default(seed, self.hparams.seed), 17, stride=7907, device=self.device)
        cfg = default(cfg, default(self.hparams.map_cfg, self.mar_generator.hparams.cfg))
        fitter = MapFitter(self.entropic_map, self.bank, self.entropic_map.pool.shape[1], generator,
                           *((self.null_map, self.null) if self.null_map is not None and cfg != 1.0 else (None, None)),
                           context_spec=self.context_spec)
        hook = fitter if upstream is None else ChainedHooks(upstream, fitter)
        self.mar_generator.generate(labels, generator=generator, refiner=hook, progress=False, cfg=cfg,
                                    num_sampling_steps=self.hparams.map_sampling_steps)
        errors = list(fitter.marginal_errors.values())
        loose = {k: round(e, 4) for k, e in fitter.marginal_errors.items() if e > self.entropic_map.settings.tolerance}
        if loose:
            warnings.warn(f"entropic map: Sinkhorn stopped at max_iter above its tolerance "
                          f"{self.entropic_map.settings.tolerance} (L1 marginal error per AR step {loose}); the map "
                          "is usable, a larger model.map_blur_fraction converges faster", stacklevel=2)
        if fitter.missing_classes:
            warnings.warn(f"entropic map: classes with no bank conditions are left unrefined (AR step: classes "
                          f"{fitter.missing_classes}); fill the bank with more data", stacklevel=2)
        self.map_fit_stats = {"pool_sizes": dict(fitter.pool_sizes), "marginal_errors": dict(fitter.marginal_errors),
                              "null_marginal_errors": dict(fitter.null_marginal_errors), "cfg": cfg,
                              "max_marginal_error": max(errors) if errors else 0.0,
                              "seconds": time.perf_counter() - start, "num_samples": num_samples}
        return self.map_fit_stats

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        if self._bank_phase():
            self.fill_bank(self.bank, *batch, self._rng(batch_idx, 0))
            return None
        loss = self.refiner_loss(batch[1], self._rng(batch_idx, 1), batch[0])
        self.log("refine/amortized_loss", loss, prog_bar=True, batch_size=batch[1].shape[0])
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        if self._bank_phase() and not self.trainer.sanity_checking:
            self.fill_bank(self.heldout, *batch, self._rng(batch_idx, 2))

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Nothing to compute on real test data: the ``GenerationMetrics`` callback generates for its labels."""

    # ----------------------------------------------------------------------------------------- amortized
    def refiner_loss(self, labels: Tensor, generator: torch.Generator, latents: Tensor | None = None) -> Tensor:
        """The amortised refiner's objective summed over AR steps, on one generation of ``labels`` ``[B]``: the flow
        objective (``refiner_objective: divergence``), the head's loss on exact targets (``exact``) or on the real
        tokens of ``latents`` ``[B, C, H, W]`` after a corrupted real context (``noisy_context``); the generation runs
        with the refiner in the loop when ``refiner_on_policy``."""
        objective = self.hparams.refiner_objective
        exact = self._exact_source() if objective == "exact" else None
        if objective == "noisy_context" and latents is None:
            raise ValueError("model.refiner_objective 'noisy_context' needs the real batch: refiner_loss(labels, "
                             "generator, latents)")
        trace = GenerationTrace(keep_on_device=True)
        on_policy = bool(self.hparams.refiner_on_policy)
        self.mar_generator.generate(
            labels, num_sampling_steps=self.hparams.refiner_sampling_steps, trace=trace, generator=generator,
            progress=False, refiner=AmortizedHook(self.refiner) if on_policy else None,
        )
        noisy = self._noisy_contexts(latents, trace, generator) if objective == "noisy_context" else None
        loss = labels.new_zeros((), dtype=torch.float32)
        for k, rec in enumerate(trace.steps):
            _, lab, pos = trace.conditions_at(k)
            z0 = (rec.raw_conditions if on_policy else rec.conditions).reshape(len(lab), -1)  # before refinement
            if noisy is not None:
                z0, targets = noisy.step(k)
            z = self.refiner(z0, lab, k)
            if objective == "divergence":
                target = self.bank.sample(k, self.flow.target_size, generator)
                fit = labelled_divergence(LabelledConditions(z, lab, pos), target, self._num_classes,
                                          self.mar_generator.seq_len, self.flow)
            else:
                if exact is not None:
                    targets = exact_step_targets(exact, trace, k, float(self.mar_generator.hparams.latent_scale),
                                                 generator)
                fit = head_denoising_loss(self.mar_generator.head, z, targets, self._loss_repeats, generator)
            loss = loss + fit + 0.5 * self.flow.options.lam * ((z - z0) ** 2).sum(-1).mean()
        return loss

    def _noisy_contexts(self, latents: Tensor, trace: GenerationTrace, generator: torch.Generator) -> NoisyContexts:
        """The corrupted real contexts of ``trace``'s steps (``refiner_objective: noisy_context``)."""
        gen = self.mar_generator
        model = replace(ConditionModel.from_generator(gen), num_sampling_steps=self.hparams.refiner_sampling_steps)
        real = patchify(latents, gen.hparams.patch_size)  # (B, L, Dt)
        refiner = self.refiner if self.hparams.refiner_on_policy else None
        return NoisyContexts(model, real, trace, float(self.hparams.refiner_corruption), generator, refiner)

    @property
    def _loss_repeats(self) -> int:
        return int(self.mar_generator.hparams.get("diffusion_batch_mul", 1))

    def _exact_source(self) -> ExactConditionals:
        """The data's source, which ``refiner_objective: exact`` needs to have exact conditionals."""
        trainer = self._trainer
        source = getattr(getattr(trainer, "datamodule", None), "source", None) if trainer is not None else None
        if not callable(getattr(source, "conditional", None)):
            raise ValueError("model.refiner_objective 'exact' needs a data source with exact conditionals "
                             f"(data.source: gmm), got {type(source).__name__ if source is not None else 'no source'}"
                             "; use refiner_objective: divergence on real data")
        return source

    @property
    def _num_classes(self) -> int:
        return int(self.mar_generator.hparams.num_classes)

    def configure_optimizers(self) -> Any:
        params = self.refiner.parameters()
        if self.optimizer_factory is not None:
            return self.optimizer_factory(params)
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)

    # ------------------------------------------------------------------------------------------ sampling
    def _hook(self, mode: str, record_trace: bool = False) -> FlowRefiner | MapHook | AmortizedHook | None:
        if mode not in MODES:
            raise ValueError(f"refine must be one of {MODES}, got {mode!r}")
        if mode == "none":
            return None
        if mode == "amortized":
            return AmortizedHook(self.refiner)
        if mode == "proximal":
            return self._proximal_hook()
        if mode == "map":
            unfitted = [k for k in range(self.entropic_map.num_steps) if not self.entropic_map.fitted(k)]
            if unfitted:
                raise ValueError(f"refine='map' needs the entropic map, unfitted at AR steps {unfitted}: fit the "
                                 "refinement with model.map_pool_samples > 0 (or call OTRefinement.fit_map)")
            null_map = self.null_map
            if null_map is not None and not all(null_map.fitted(k) for k in range(null_map.num_steps)):
                null_map = None  # fitted at cfg 1: there was no null branch to fit it on (documented in null_bank)
            return MapHook(self.entropic_map, null_map, self.context_spec)
        return FlowRefiner(self.bank, self.flow, self._num_classes, self.mar_generator.seq_len,
                           self.hparams.seed, self.null, record_trace)

    def _proximal_hook(self) -> ProximalMapHook:
        """Mode ``proximal``: the multi-step map with the proximal and inverse-process terms."""
        transport = self._hook("map")
        inverse = self.inverse
        if self.proximal.inverse_weight > 0 and not all(inverse.fitted(k) for k in range(len(self.schedule))):
            raise ValueError("refine='proximal' with model.inverse_weight > 0 needs the token-to-condition map, "
                             "unfitted: fit the refinement with model.inverse_map: true")
        gen = self.mar_generator
        options = gen.sampling_options()

        def sample_tokens(z: Tensor, generator: torch.Generator) -> Tensor:
            return gen.head.sample(z, options=options, generator=generator)

        return ProximalMapHook(transport, self.proximal, inverse, sample_tokens, self.hparams.seed)

    @torch.no_grad()
    def generate(
        self,
        labels: Tensor,
        refine: str | None = None,
        generator: torch.Generator | None = None,
        trace: GenerationTrace | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """Generate latents ``[B, C, H, W]`` for ``labels`` ``[B]`` with refinement mode ``refine``.

        Other keyword arguments go to :meth:`MARGenerator.generate` (``cfg``, ``sampler``, ...). With a ``trace``,
        each step also records the inner-flow trace and the Sinkhorn divergence of the produced conditions to the
        held-out ideal conditions before and after refinement (:meth:`annotate`).
        """
        num_iter = default(kwargs.get("num_iter"), self.mar_generator.hparams.num_iter)
        if num_iter != len(self.schedule):
            raise ValueError(f"num_iter={num_iter} but the condition bank was built for num_iter={len(self.schedule)}")
        hook = self._hook(default(refine, self.hparams.mode), record_trace=trace is not None)
        kwargs["progress"] = default_progress(kwargs.get("progress"), self)  # the inner generator has no trainer
        latents = self.mar_generator.generate(labels, generator=generator, trace=trace, refiner=hook, **kwargs)
        self.last_generation_stats = {"refine_seconds": hook.stats.seconds if hook is not None else 0.0}
        if trace is not None:
            self.annotate(trace, hook)
        return latents

    def refine_step(self, z: Tensor, labels: Tensor, positions: Tensor, step: int, mode: str | None = None,
                    context: Tensor | None = None) -> Tensor:
        """Refine conditions ``z`` ``[N, D]`` (classes ``labels`` ``[N]``, token ``positions`` ``[N]``) as AR step
        ``step`` of a sampling batch would be, with refinement mode ``mode`` (default: the module's); ``[N, D]``.
        The context-aware map also needs the conditions' context features ``context`` ``[N, Fc]``.

        The sampler calls the same hook; this is its entry point for measurements such as the null test
        (:func:`lightning_ar.theory.dispersion.null_test`)."""
        hook = self._hook(mode or self.hparams.mode)
        return z if hook is None else call_hook(hook, z, labels, positions, step, context)

    def flow_path(self, z: Tensor, labels: Tensor, positions: Tensor, step: int) -> list[Tensor]:
        """The ``K + 1`` states ``[N, D]`` of the flow at AR step ``step`` (``K = flow_steps``; state 0 is ``z``):
        exactly the conditions sampling would hold after each flow step (same target subsample)."""
        out = []
        for j in range(self.flow.options.steps + 1):
            settings = replace(self.flow, options=self.flow.options.replace(steps=j))
            out.append(FlowRefiner(self.bank, settings, self._num_classes, self.mar_generator.seq_len,
                                   self.hparams.seed, None, False)(z, labels, positions, step))
        return out

    def annotate(self, trace: GenerationTrace, hook: FlowRefiner | AmortizedHook | None) -> None:
        """Fill the divergence fields of ``trace`` against the held-out bank (and the inner-flow traces).

        ``divergence_before``/``divergence_after``: the class- and position-aware Sinkhorn divergence of this one
        batch's raw / refined conditions of each step to the held-out ideal conditions, at a blur of
        ``BLUR_FRACTION`` (0.25) times the ideal conditions' within-group spread (solved per group,
        :mod:`lightning_ar.theory.grouped_sinkhorn`). One batch puts a few conditions in each (class, position)
        group, so this value is mostly finite-sample matching and is *lowered* by collapse toward group means:
        read it beside the dispersion ratio, pooled over several batches (``SinkhornDivergenceMonitor``).
        """
        seq_len = self.mar_generator.seq_len
        for k, rec in enumerate(trace.steps):
            ref_z, ref_labels, ref_positions = (t.to(self.device) for t in self.heldout.get(k))
            labels = torch.as_tensor(trace.labels, device=self.device).repeat_interleave(rec.positions.shape[1])
            groups = labels * seq_len + rec.positions.reshape(-1).to(self.device)
            ref_groups = ref_labels * seq_len + ref_positions
            blur = measurement_blur(ref_z, ref_groups)
            after = rec.conditions.reshape(labels.shape[0], -1).to(self.device)
            raw = rec.raw_conditions.reshape(labels.shape[0], -1).to(self.device) if rec.raw_conditions is not None \
                else after
            ones = torch.ones(1, len(after), device=self.device)
            rec.divergence_after = float(grouped_divergence(group_clouds(after, groups, ref_z, ref_groups), ones, blur))
            rec.divergence_before = rec.divergence_after if raw is after else float(
                grouped_divergence(group_clouds(raw, groups, ref_z, ref_groups), ones, blur))
            if isinstance(hook, FlowRefiner):
                rec.flow_trace = hook.stats.flow_traces.get(k)

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Refined latents per ``(label, index)``, seeded as the generator's
        (:func:`~lightning_ar.modules.utils.predict_block`)."""
        return predict_block(self.generate, batch, self.device)

    # ----------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Record this module's class in the checkpoint (read by the CLI's precedence rule)."""
        record_class(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, with a clear message, a bank built for another generator (other width or step count)."""
        state = checkpoint.get("state_dict", {})
        maps = {"entropic_map": self.entropic_map, "null_map": self.null_map}
        for prefix, entropic_map in ((p, m) for p, m in maps.items() if m is not None):
            for name, value in entropic_map.state_dict(prefix=f"{prefix}.").items():
                state.setdefault(name, value)  # a checkpoint from before the map (or the null map): unfitted
        for name, bank in (("bank", self.bank), ("heldout", self.heldout)):
            saved = state.get(f"{name}.conditions")
            if saved is not None and tuple(saved.shape) != tuple(bank.conditions.shape):
                raise CheckpointError(
                    f"the checkpoint's {name} holds [num_iter={saved.shape[0]}, M={saved.shape[1]}, D={saved.shape[2]}]"
                    f" but this generator needs num_iter={bank.conditions.shape[0]}, D={bank.conditions.shape[2]}"
                    f" (and model.{name}_capacity={bank.conditions.shape[1]}): it was built for another generator"
                )
