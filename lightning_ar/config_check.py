"""Config files named on a command line, checked before the CLI parses them, so that errors name the file.

jsonargparse reports a YAML syntax error without the file's name and lets an unresolvable omegaconf interpolation
escape as a traceback; :func:`check_config_files` reads each ``--config`` / ``-c`` file first and raises a
:class:`~lightning_ar.errors.UsageError` that names the file, the line or key, and the problem.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lightning_ar.errors import UsageError


def config_paths(argv: Sequence[str]) -> list[str]:
    """The values of ``--config X``, ``--config=X`` and ``-c X`` in ``argv``, in order."""
    paths = []
    for i, arg in enumerate(argv):
        if arg in ("--config", "-c") and i + 1 < len(argv):
            paths.append(argv[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return paths


def check_config_file(path: str) -> None:
    """Raise :class:`UsageError` naming ``path`` if it is missing, not YAML, or has an interpolation that fails."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"config file {path}: does not exist")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        marked = isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None
        where = f" (line {err.problem_mark.line + 1}, column {err.problem_mark.column + 1})" if marked else ""
        problem = (err.problem if marked else None) or str(err).splitlines()[0]
        raise UsageError(f"config file {path}: YAML syntax error{where}: {problem}") from None
    if data is None:
        return
    if not isinstance(data, dict):
        raise UsageError(f"config file {path}: expected a mapping of options at the top, got {type(data).__name__}")
    try:
        OmegaConf.to_container(OmegaConf.create(data), resolve=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)  # set by omegaconf when it knows the key
        message = str(err).splitlines()[0]
        raise UsageError(f"config file {path}: cannot resolve {key or 'an interpolation'}: {message}") from None


def check_config_files(argv: Sequence[str]) -> None:
    """:func:`check_config_file` for every config file named in ``argv``."""
    for path in config_paths(argv):
        check_config_file(path)
