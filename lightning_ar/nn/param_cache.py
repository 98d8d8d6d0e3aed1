"""Values derived from a module's parameters, kept between calls while those parameters are unchanged (sampling)."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from typing import TypeVar

import torch
from torch import Tensor, nn

T = TypeVar("T")


def cached_on_params(owner: nn.Module, name: str, params: Iterable[Tensor], extra: Hashable,
                     compute: Callable[[], T]) -> T:
    """``compute()``, reused while ``params`` and ``extra`` are unchanged and autograd is off.

    A parameter counts as changed when its storage, version counter (bumped by every in-place update: optimizer
    steps, EMA swaps, ``load_state_dict``), device or dtype changes. With autograd on the value is always computed
    afresh (it must carry the graph), and nothing is stored.

    Args:
        owner: Module whose ``__dict__`` holds the cached value (not a buffer: never saved or moved).
        name: Key of the value in ``owner``.
        params: The tensors the value is derived from.
        extra: Anything else the value depends on (e.g. the number of sampling steps).
        compute: Builds the value.
    """
    if torch.is_grad_enabled():
        return compute()
    key = (extra, *((t.data_ptr(), t._version, t.device, t.dtype) for t in params))
    cached = owner.__dict__.get(name)
    if cached is None or cached[0] != key:
        cached = owner.__dict__[name] = (key, compute())
    return cached[1]
