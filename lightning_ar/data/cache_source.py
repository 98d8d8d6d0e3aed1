"""A latent cache (``lightning-ar cache``) as the data of :class:`LatentDataModule`.

Training items are drawn afresh every epoch: for item ``i`` of epoch ``e`` a ``torch.Generator`` seeded from
``(seed, e, i)`` picks the flip copy and draws the posterior sample, so a run resumed at epoch ``e`` sees exactly the
latents it would have seen. :class:`EpochSampler` (a ``DistributedSampler``, so Lightning keeps it under DDP and calls
its ``set_epoch``) hands ``(epoch, index)`` keys to :class:`CacheDataset`; that works with DataLoader workers, whose
copy of the dataset never needs to learn the epoch.

Splits: a fixed ``val_fraction`` of the items (at least one; chosen by a permutation seeded with 0, independent of
``seed``) is held out as ``val``; ``test`` is the same held-out set; ``train`` is the rest.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

from lightning_ar.data.shards import ShardReader
from lightning_ar.data.vae import decode_latents, load_vae, sample_posterior
from lightning_ar.seeding import seeded_generator

SPLIT_SEED = 0


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU generator determined by ``(seed, epoch, index)`` (numpy's SeedSequence mixes the three)."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return seeded_generator(int(state[0]), int(state[1]), stride=1 << 32)


class CacheDataset(Dataset):
    """Scaled posterior samples of cache items: ``(latent [C, h, w], label)``.

    Args:
        reader: The cache.
        indices: Cache items of this split ``[M]``.
        scale: Multiplier of the samples.
        seed: Base seed of the per-item randomness (flip copy and posterior noise).
    """

    def __init__(self, reader: ShardReader, indices: Tensor, scale: float, seed: int) -> None:
        self.reader, self.indices, self.scale, self.seed = reader, indices, scale, seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Tensor, Tensor]:
        """``key`` is ``(epoch, position)`` (from :class:`EpochSampler`) or a position (epoch 0)."""
        epoch, position = key if isinstance(key, tuple) else (0, key)
        item = int(self.indices[position])
        gen = item_generator(self.seed, epoch, item)
        moments, label = self.reader[item]  # (2, 2C, h, w)
        flip = int(torch.randint(2, (1,), generator=gen))
        latent = sample_posterior(torch.from_numpy(moments[flip : flip + 1]), gen)[0]  # (C, h, w)
        return latent * self.scale, torch.tensor(label)


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` yielding ``(epoch, index)`` keys; one replica when not distributed."""

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, i) for i in super().__iter__())


class CacheSource:
    """The cache of ``cache_dir``: shapes, scale and classes from ``meta.json``, datasets per split, VAE decoding.

    Attributes ``latent_shape`` ``(C, H, W)``, ``num_classes`` and ``latent_scale`` are those of ``meta.json``.

    Args:
        cache_dir: Cache directory (validated on construction).
        vae: VAE used by :meth:`decode` (default: the one recorded in ``meta.json``).
        val_fraction: Fraction of items held out for ``val``/``test``, in ``(0, 0.5]``.
        check_values: Read the whole cache once and reject NaN/Inf.
    """

    def __init__(self, cache_dir: str, vae: str | None = None, val_fraction: float = 0.01,
                 check_values: bool = False) -> None:
        if not 0.0 < val_fraction <= 0.5:
            raise ValueError(f"data.val_fraction must be in (0, 0.5], got {val_fraction}")
        if not Path(cache_dir).is_dir():
            raise FileNotFoundError(f"data.cache_dir {cache_dir!r}: no such directory (run `lightning-ar cache`)")
        self.reader = ShardReader(cache_dir, check_values)
        if len(self.reader) < 2:
            raise ValueError(f"data.cache_dir {cache_dir!r}: a cache needs >= 2 items to hold one out for val")
        self.meta, self.vae_name, self._vaes = self.reader.meta, vae or self.reader.meta.vae, {}
        perm = torch.randperm(len(self.reader), generator=seeded_generator(SPLIT_SEED))
        num_val = max(1, round(val_fraction * len(self.reader)))
        self.splits = {"val": perm[:num_val].sort().values, "train": perm[num_val:].sort().values}
        self.splits["test"] = self.splits["val"]
        # what the data module links into the generator, as recorded in meta.json
        self.latent_shape: tuple[int, int, int] = tuple(self.meta.latent_shape)
        self.num_classes: int = self.meta.num_classes
        self.latent_scale: float = self.meta.latent_scale

    def dataset(self, split: str, scale: float, seed: int) -> CacheDataset:
        """The dataset of ``split`` (``train``, ``val`` or ``test``)."""
        if split not in self.splits:
            raise ValueError(f"split must be one of {sorted(self.splits)}, got {split!r}")
        return CacheDataset(self.reader, self.splits[split], scale, seed)

    def decode(self, latents: Tensor) -> Tensor:
        """Unscaled latents ``[B, C, h, w]`` to images ``[B, 3, H, W]`` in ``[-1, 1]``; VAE loaded on first use."""
        key = str(latents.device)
        if key not in self._vaes:
            self._vaes[key] = load_vae(self.vae_name).requires_grad_(False).to(latents.device)
        return decode_latents(self._vaes[key], latents)
