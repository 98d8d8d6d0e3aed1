"""Progress bars for long loops run from Python, notebooks and the tools (``generate``, ``evaluate``, ``cache``).

:func:`progress_bar` is ``tqdm.auto`` (a widget in Jupyter) when ipywidgets is importable, plain ``tqdm`` otherwise
(``tqdm.notebook`` raises without ipywidgets). Inside a running Lightning stage, Lightning's own progress bar already
reports the batches, so :func:`default_progress` turns the inner bars off there.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm as std_tqdm


def _tqdm_class() -> type:
    if importlib.util.find_spec("ipywidgets") is None:
        return std_tqdm
    from tqdm.auto import tqdm

    return tqdm


def progress_bar(iterable: Iterable | None = None, *, disable: bool = False, **kwargs: Any) -> Any:
    """A tqdm bar over ``iterable`` (``tqdm`` keyword arguments: ``total``, ``desc``, ``unit``, ``leave``, ...)."""
    if disable:
        return std_tqdm(iterable, disable=True, **kwargs)
    return _tqdm_class()(iterable, **kwargs)


def default_progress(progress: bool | None, module: Any) -> bool:
    """``progress`` if given; else ``True`` unless ``module`` (a LightningModule) runs inside a Trainer stage."""
    if progress is not None:
        return bool(progress)
    trainer = getattr(module, "_trainer", None)
    if trainer is None:
        return True
    from lightning.pytorch.trainer.states import TrainerStatus

    return trainer.state.status != TrainerStatus.RUNNING
