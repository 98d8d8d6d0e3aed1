"""VAE access through diffusers' ``AutoencoderKL``: load (hub id or local directory), encode to posterior moments,
decode latents to images. Converting LDM-layout KL checkpoints (MAR's ``kl16.ckpt``) to a diffusers directory is
:mod:`lightning_ar.checkpoints.convert_vae` (``lightning-ar convert-vae``).

Images are ``[B, 3, H, W]`` in ``[-1, 1]``; posterior moments are ``[B, 2C, h, w]`` (mean then log-variance, the
layout of diffusers' ``DiagonalGaussianDistribution.parameters``); latents are unscaled (the data module applies the
cache's recorded scale).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from diffusers import AutoencoderKL


def load_vae(name_or_path: str, subfolder: str | None = None, torch_dtype: torch.dtype | None = None,
             ) -> AutoencoderKL:
    """Load a diffusers ``AutoencoderKL`` from a hub id (e.g. ``stabilityai/sd-vae-ft-ema``) or a local directory.

    Raises:
        FileNotFoundError: ``name_or_path`` looks like a local path (exists or starts with ``.``/``/``) but holds no
            diffusers model.
    """
    from diffusers import AutoencoderKL

    path = Path(name_or_path)
    if path.exists() or name_or_path.startswith((".", "/")):
        folder = path / subfolder if subfolder else path
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"vae {name_or_path!r}: expected a diffusers AutoencoderKL directory with config.json "
                f"(convert an LDM checkpoint with `convert_ldm_kl16`), found none at {folder}"
            )
    kwargs = {"subfolder": subfolder} if subfolder else {}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    return AutoencoderKL.from_pretrained(name_or_path, **kwargs).eval()


@torch.no_grad()
def encode_moments(vae: AutoencoderKL, images: Tensor) -> Tensor:
    """Images ``[B, 3, H, W]`` in ``[-1, 1]`` to posterior moments ``[B, 2C, h, w]`` (mean, log-variance)."""
    images = images.to(device=vae.device, dtype=vae.dtype)
    return vae.encode(images).latent_dist.parameters


def sample_posterior(moments: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Moments ``[B, 2C, h, w]`` to one posterior sample ``[B, C, h, w]`` (``mean + std * noise``)."""
    mean, logvar = moments.float().chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean + std * noise


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: Tensor) -> Tensor:
    """Unscaled latents ``[B, C, h, w]`` to images ``[B, 3, H, W]`` in ``[-1, 1]``."""
    images = vae.decode(latents.to(device=vae.device, dtype=vae.dtype)).sample
    return images.float().clamp(-1.0, 1.0)
