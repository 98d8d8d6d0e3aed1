"""The shipped YAML configs, found in a checkout and in an installed copy alike.

They live in the repository's ``configs/``; ``lightning_ar/configs`` links to it and is installed with the package
(package data), so the same relative names work everywhere::

    lightning-ar configs                      # the folder of the installed configs
    lightning-ar configs digits/mar.yaml      # the path of one of them
    lightning-ar fit --config "$(lightning-ar configs digits/mar.yaml)"
"""

from __future__ import annotations

import argparse
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def available_configs() -> list[str]:
    """Names (relative paths such as ``digits/mar.yaml``) of the shipped configs, sorted."""
    return sorted(str(p.relative_to(CONFIG_DIR)) for p in CONFIG_DIR.rglob("*.yaml"))


def config_path(name: str) -> Path:
    """The path of the shipped config ``name`` (e.g. ``"digits/mar.yaml"``, ``"debug.yaml"``).

    Raises:
        FileNotFoundError: no such config (the message lists the shipped ones).
    """
    path = CONFIG_DIR / name
    if not path.is_file():
        shipped = ", ".join(available_configs())
        raise FileNotFoundError(f"no shipped config {name!r} in {CONFIG_DIR}; shipped: {shipped}")
    return path


def configs_main(argv: list[str] | None = None) -> None:
    """``lightning-ar configs [NAME]``: print the folder of the shipped configs, or the path of ``NAME``."""
    parser = argparse.ArgumentParser(prog="lightning-ar configs", description=configs_main.__doc__.split(":")[1])
    parser.add_argument("name", nargs="?", help="a config name such as digits/mar.yaml (omitted: the folder)")
    parser.add_argument("--list", action="store_true", help="list the shipped configs")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(available_configs()))
    else:
        print(config_path(args.name) if args.name else CONFIG_DIR)
