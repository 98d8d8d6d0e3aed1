"""LightningModules of the collection."""

from lightning_ar.modules.generator import MARGenerator
from lightning_ar.modules.refinement import OTRefinement

__all__ = ["MARGenerator", "OTRefinement"]
