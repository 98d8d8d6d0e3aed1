"""lightning-ar: masked autoregressive image generation with a per-token diffusion loss, as Lightning modules."""

from lightning_ar.callbacks import (
    AdmNpzWriter,
    ConditionalScoreNormMonitor,
    GenerationMetrics,
    SampleGrid,
    SampleWriter,
    SinkhornDivergenceMonitor,
)
from lightning_ar.checkpoints import AtomicCheckpointIO, CheckpointError, import_mar_checkpoint
from lightning_ar.checkpoints.convert_vae import convert_ldm_kl16, save_converted_vae
from lightning_ar.config_files import config_path
from lightning_ar.contracts import Generator, HeadGenerator, Refinement, TokenGenerator
from lightning_ar.data import (
    CacheSource,
    DigitsSource,
    GMMSource,
    KroneckerConditional,
    LatentDataModule,
    LatentSource,
    load_vae,
    validate_cache,
)
from lightning_ar.errors import UsageError
from lightning_ar.metrics import (
    ImageQualityEvaluator,
    ReferenceStatsFID,
    evaluate_npz,
    evaluator_for,
    register_evaluator,
)
from lightning_ar.modules import CausalARGenerator, ConditionalDiffusion, DiffusionGenerator, MARGenerator, OTRefinement
from lightning_ar.nn import (
    ConditionStats,
    ContextShuffle,
    DiffusionLoss,
    Dispersion,
    GenerationTrace,
    MaskedAutoregressiveTransformer,
    MeanBias,
    SamplingOptions,
    SamplingRun,
    StepRecord,
    TransformerSpec,
)
from lightning_ar.nn.amortized_refiner import AmortizedRefiner
from lightning_ar.nn.condition_bank import ConditionBank
from lightning_ar.nn.context_features import ContextSpec, revealed_context
from lightning_ar.nn.entropic_map import EntropicMap, MapSettings, solve_entropic_ot
from lightning_ar.nn.inverse_process import ProximalMapHook, ProximalOptions, TokenConditionMap
from lightning_ar.nn.labelled_conditions import LabelledConditions
from lightning_ar.nn.refine import (
    FlowOptions,
    RefinementResult,
    refine_conditions,
    sinkhorn_flow,
)
from lightning_ar.nn.refiner_targets import NoisyContexts, corrupted_context, exact_step_targets, head_denoising_loss
from lightning_ar.nn.refiners import ChainedHooks
from lightning_ar.theory import (
    ConditionModel,
    TruthSettings,
    evaluate_controls,
    evaluate_generator,
    score_truth,
    teacher_forced_trace,
    trace_truth,
)

__version__ = "0.1.0"

__all__ = [
    "AdmNpzWriter",
    "ChainedHooks",
    "AtomicCheckpointIO",
    "CheckpointError",
    "UsageError",
    "CacheSource",
    "ImageQualityEvaluator",
    "ReferenceStatsFID",
    "config_path",
    "convert_ldm_kl16",
    "save_converted_vae",
    "evaluate_npz",
    "evaluator_for",
    "register_evaluator",
    "import_mar_checkpoint",
    "load_vae",
    "validate_cache",
    "AmortizedRefiner",
    "CausalARGenerator",
    "DiffusionGenerator",
    "Generator",
    "HeadGenerator",
    "Refinement",
    "TokenGenerator",
    "SamplingOptions",
    "SamplingRun",
    "TransformerSpec",
    "ConditionalDiffusion",
    "ConditionBank",
    "ConditionalScoreNormMonitor",
    "SinkhornDivergenceMonitor",
    "OTRefinement",
    "RefinementResult",
    "FlowOptions",
    "LabelledConditions",
    "ContextSpec",
    "EntropicMap",
    "MapSettings",
    "solve_entropic_ot",
    "revealed_context",
    "exact_step_targets",
    "NoisyContexts",
    "corrupted_context",
    "head_denoising_loss",
    "ProximalMapHook",
    "ProximalOptions",
    "TokenConditionMap",
    "refine_conditions",
    "sinkhorn_flow",
    "DiffusionLoss",
    "DigitsSource",
    "GMMSource",
    "GenerationMetrics",
    "GenerationTrace",
    "LatentDataModule",
    "LatentSource",
    "MARGenerator",
    "MaskedAutoregressiveTransformer",
    "SampleGrid",
    "SampleWriter",
    "StepRecord",
    "ConditionModel",
    "ConditionStats",
    "ContextShuffle",
    "Dispersion",
    "KroneckerConditional",
    "MeanBias",
    "TruthSettings",
    "evaluate_controls",
    "evaluate_generator",
    "score_truth",
    "teacher_forced_trace",
    "trace_truth",
]
