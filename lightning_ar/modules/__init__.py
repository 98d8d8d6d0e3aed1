"""LightningModules of the collection."""

from lightning_ar.modules.base import DiffusionGenerator
from lightning_ar.modules.causal_ar import CausalARGenerator
from lightning_ar.modules.cdm import ConditionalDiffusion
from lightning_ar.modules.generator import MARGenerator
from lightning_ar.modules.refinement import OTRefinement

__all__ = ["CausalARGenerator", "ConditionalDiffusion", "DiffusionGenerator", "MARGenerator", "OTRefinement"]
