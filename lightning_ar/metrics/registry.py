"""Which evaluator scores the samples of a data source: chosen here, in ``metrics``, so ``data`` never imports metrics.

Each embedded source class maps to an evaluator factory; a :class:`~lightning_ar.data.LatentDataModule` over a
latent cache gets the image-quality evaluator (FID/IS of decoded images). A new source registers its own with
:func:`register_evaluator`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning_ar.data.datamodule import LatentDataModule
from lightning_ar.data.sources import DigitsSource, GMMSource, LatentSource
from lightning_ar.metrics.base import SampleEvaluator
from lightning_ar.metrics.digits import DigitsEvaluator
from lightning_ar.metrics.gmm import GMMEvaluator
from lightning_ar.metrics.image_quality import ImageQualityEvaluator

EvaluatorFactory = Callable[[Any], SampleEvaluator]

_REGISTRY: dict[type[LatentSource], EvaluatorFactory] = {
    DigitsSource: lambda source: DigitsEvaluator(source=source),
    GMMSource: lambda source: GMMEvaluator(source=source),
}


def register_evaluator(source_type: type[LatentSource], factory: EvaluatorFactory) -> None:
    """Score samples of ``source_type`` (and its subclasses) with ``factory(source)``."""
    _REGISTRY[source_type] = factory


def evaluator_for(data: LatentSource | LatentDataModule) -> SampleEvaluator:
    """A fresh evaluator for generated latents of ``data`` (a source, or a data module: its source or its cache).

    Raises:
        TypeError: no evaluator is registered for the source's class (or ``data`` is neither kind).
    """
    if isinstance(data, LatentDataModule):
        if data.cache is not None:
            return ImageQualityEvaluator(decode=data.decode, num_classes=data.num_classes, reference=data.reference,
                                         inception_weights=data.inception_weights,
                                         reference_stats=data.reference_stats)
        data = data.source
    if not isinstance(data, LatentSource):
        raise TypeError(f"no evaluator for {type(data).__name__}: expected a LatentSource or a LatentDataModule")
    for cls in type(data).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls](data)
    raise TypeError(f"no evaluator is registered for {type(data).__name__}: register one with "
                    "lightning_ar.metrics.register_evaluator(source_type, factory)")
