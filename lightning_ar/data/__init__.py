"""Data: the latent data module, the embedded sources and the latent cache."""

from lightning_ar.data.cache_source import CacheDataset, CacheSource
from lightning_ar.data.datamodule import LatentDataModule
from lightning_ar.data.gaussian import KroneckerConditional, condition_kronecker
from lightning_ar.data.shards import CacheMeta, ShardReader, validate_cache
from lightning_ar.data.sources import DigitsSource, GMMSource, LatentSource, make_source
from lightning_ar.data.vae import decode_latents, encode_moments, load_vae

__all__ = [
    "CacheDataset",
    "CacheMeta",
    "CacheSource",
    "DigitsSource",
    "GMMSource",
    "KroneckerConditional",
    "LatentDataModule",
    "LatentSource",
    "ShardReader",
    "condition_kronecker",
    "decode_latents",
    "encode_moments",
    "load_vae",
    "make_source",
    "validate_cache",
]
