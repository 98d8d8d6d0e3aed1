"""What the theory's result dataclasses share: a plain-Python ``to_dict`` for JSON, reports and notebooks."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any


class Record:
    """Mixin for a result dataclass: :meth:`to_dict` is :func:`dataclasses.asdict` of it."""

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict, e.g. for JSON."""
        return asdict(self)  # type: ignore[call-overload]
