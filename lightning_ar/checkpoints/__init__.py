"""Import of official MAR checkpoints (LTH14/mar) as ``MARGenerator`` Lightning checkpoints."""

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

__all__ = [
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
