"""Data: the latent data module and the embedded sources."""

from lightning_ar.data.datamodule import LatentDataModule
from lightning_ar.data.sources import DigitsSource, GMMSource, LatentSource, make_source

__all__ = ["DigitsSource", "GMMSource", "LatentDataModule", "LatentSource", "make_source"]
