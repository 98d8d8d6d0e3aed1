"""The package's layering, read from its imports: ``nn`` knows no Lightning, ``data`` never imports ``metrics``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_ar"

# (sub-package, module prefixes none of its files may import)
RULES = [
    ("nn", ("lightning", "pytorch_lightning", "lightning_ar.modules", "lightning_ar.callbacks", "lightning_ar.data")),
    ("data", ("lightning_ar.metrics", "lightning_ar.modules", "lightning_ar.callbacks")),
    ("metrics", ("lightning_ar.modules", "lightning_ar.callbacks")),
]


def imported_modules(path: Path, root: Path = PACKAGE) -> set[str]:
    """Absolute module names imported anywhere in ``path`` (also inside functions and ``TYPE_CHECKING`` blocks)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.level:  # relative: resolve against the file's package
                base = path.relative_to(root.parent).with_suffix("").parts[: -node.level]
                names.add(".".join((*base, node.module)))
            else:
                names.add(node.module)
    return names


def violations(package: str, forbidden: tuple[str, ...], root: Path = PACKAGE) -> list[str]:
    found = []
    for path in sorted((root / package).rglob("*.py")):
        for name in sorted(imported_modules(path, root)):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                found.append(f"{path.relative_to(root.parent).as_posix()} imports {name}")
    return found


@pytest.mark.parametrize(("package", "forbidden"), RULES, ids=[rule[0] for rule in RULES])
def test_layering(package: str, forbidden: tuple[str, ...]) -> None:
    assert violations(package, forbidden) == []


def test_the_rule_sees_a_forbidden_import(tmp_path: Path) -> None:
    """Negative control: imports of ``metrics`` from ``data`` inside a function and relative ones are reported."""
    fake = tmp_path / "lightning_ar"
    (fake / "data").mkdir(parents=True)
    (fake / "data" / "bad.py").write_text("def f():\n    from lightning_ar.metrics.base import SampleEvaluator\n")
    (fake / "data" / "rel.py").write_text("from ..metrics import gmm\n")
    (fake / "data" / "ok.py").write_text("from lightning_ar.data.sources import GMMSource\n")
    assert violations("data", ("lightning_ar.metrics",), root=fake) == [
        "lightning_ar/data/bad.py imports lightning_ar.metrics.base",
        "lightning_ar/data/rel.py imports lightning_ar.metrics",
    ]
