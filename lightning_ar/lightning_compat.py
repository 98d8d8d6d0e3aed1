"""The one place that reaches into a private part of Lightning, wrapped and tested (``tests/test_lightning_compat.py``).

LightningCLI hands the init arguments it parsed to ``save_hyperparameters`` through a context variable,
``lightning.pytorch.core.mixins.hparams_mixin._given_hyperparameters``, while it instantiates the model; a
LightningModule built *inside* that constructor (``OTRefinement`` rebuilding its frozen generator) would record the
outer module's arguments as its own. :func:`own_hyperparameters` clears the variable for such a nested build.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

try:  # Lightning 2.x; if it goes, the injection it carries goes with it and nothing needs clearing
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
except ImportError:  # pragma: no cover - depends on the installed Lightning
    _given_hyperparameters = None


@contextmanager
def own_hyperparameters() -> Iterator[None]:
    """Within the block, ``save_hyperparameters`` records the arguments of the module being built, not those that a
    running LightningCLI injects for the outer model."""
    if _given_hyperparameters is None:  # pragma: no cover
        yield
        return
    token = _given_hyperparameters.set(None)
    try:
        yield
    finally:
        _given_hyperparameters.reset(token)
