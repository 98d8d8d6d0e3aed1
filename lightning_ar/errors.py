"""Errors in what a user gave (an option, a file): the CLI prints their message, without a traceback, and exits 2."""

from __future__ import annotations


class UsageError(ValueError):
    """A bad option value, config file or input file; the message names it and says what was expected."""
