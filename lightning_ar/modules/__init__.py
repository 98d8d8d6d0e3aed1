"""LightningModules of the collection."""

from lightning_ar.modules.generator import MARGenerator

__all__ = ["MARGenerator"]
