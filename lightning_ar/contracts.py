"""What the parts need from each other, as ``Protocol`` s (checked with ``isinstance``, never by probing attributes).

- :class:`Generator`: what ``GenerationMetrics`` and ``SampleGrid`` call (``generate``) and read (``hparams``);
- :class:`HeadGenerator`: a generator with a diffusion head over ``seq_len`` tokens (all three generators): what the
  score-norm monitor measures;
- :class:`TokenGenerator`: one whose conditions come from a per-token transformer ``mar`` (``MARGenerator``,
  ``CausalARGenerator``): what ``OTRefinement`` and the ground-truth instruments need;
- :class:`Refinement`: a module that generates with a frozen :class:`TokenGenerator` and refines its conditions
  (``OTRefinement``): what the Sinkhorn monitor needs;
- :class:`Decodes`: a data module that turns latents into images (``SampleGrid``).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from lightning_ar.nn.diffusion_loss import DiffusionLoss
from lightning_ar.nn.trace import GenerationTrace


@runtime_checkable
class Generator(Protocol):
    """Generates latents ``[B, C, H, W]`` for labels ``[B]``; ``hparams`` holds ``num_classes`` and its defaults."""

    hparams: Any

    def generate(self, labels: Tensor, options: Any = None, *, generator: torch.Generator | None = None,
                 trace: GenerationTrace | None = None, **overrides: Any) -> Tensor: ...


@runtime_checkable
class HeadGenerator(Generator, Protocol):
    """A :class:`Generator` with a diffusion head over ``seq_len`` tokens of ``token_dim``."""

    head: DiffusionLoss
    seq_len: int
    token_dim: int


@runtime_checkable
class TokenGenerator(HeadGenerator, Protocol):
    """A :class:`HeadGenerator` whose per-token conditions come from the transformer ``mar``."""

    mar: nn.Module


@runtime_checkable
class Refinement(Generator, Protocol):
    """Generates with the frozen ``mar_generator`` and refines its conditions (``refine=`` of ``generate``)."""

    mar_generator: TokenGenerator
    last_generation_stats: dict[str, float]

    def refine_step(self, *args: Any, **kwargs: Any) -> Any: ...


@runtime_checkable
class Decodes(Protocol):
    """Turns unscaled latents ``[B, C, H, W]`` into images ``[B, C', H', W']`` in ``[-1, 1]``."""

    def decode(self, latents: Tensor) -> Tensor: ...


def head_generator(module: Any) -> HeadGenerator:
    """The module owning the diffusion head: ``module`` itself (a generator) or a refinement's ``mar_generator``.

    Raises:
        TypeError: neither (naming the class).
    """
    if isinstance(module, Refinement):
        return module.mar_generator
    if isinstance(module, HeadGenerator) and isinstance(module.head, DiffusionLoss):
        return module
    raise TypeError(f"expected a generator with a diffusion head (MARGenerator, CausalARGenerator, "
                    f"ConditionalDiffusion) or an OTRefinement, got {type(module).__name__}")
