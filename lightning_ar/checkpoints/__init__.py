"""Checkpoints: safe reading, the CLI's precedence rule, resume, atomic writes, and the import of official MAR
checkpoints (LTH14/mar) as ``MARGenerator`` Lightning checkpoints."""

from lightning_ar.checkpoints.atomic_io import AtomicCheckpointIO
from lightning_ar.checkpoints.import_mar import (
    MAR_LATENT_SCALE,
    MAR_SIZES,
    MARSize,
    convert_state_dict,
    generator_hparams,
    import_main,
    import_mar_checkpoint,
    load_official,
    official_name,
    token_permutation,
)
from lightning_ar.checkpoints.loading import CheckpointError, load_checkpoint_file, load_lightning_checkpoint
from lightning_ar.checkpoints.resume import NothingToResumeError

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointError",
    "NothingToResumeError",
    "load_checkpoint_file",
    "load_lightning_checkpoint",
    "MAR_LATENT_SCALE",
    "MAR_SIZES",
    "MARSize",
    "convert_state_dict",
    "generator_hparams",
    "import_main",
    "import_mar_checkpoint",
    "load_official",
    "official_name",
    "token_permutation",
]
