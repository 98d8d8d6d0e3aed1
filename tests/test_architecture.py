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


def _functions(root: Path = PACKAGE) -> list[tuple[str, ast.FunctionDef, bool]]:
    """``(where, function, public)`` for every function of the package; public: a public module-level function or a
    public method (``__init__`` included) of a public module-level class."""
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        scopes = [(node, True) for node in tree.body]
        scopes += [(item, not node.name.startswith("_")) for node in tree.body if isinstance(node, ast.ClassDef)
                   for item in node.body]
        top = {id(node): public for node, public in scopes}
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                public = top.get(id(node), False) and (not node.name.startswith("_") or node.name == "__init__")
                found.append((f"{path.relative_to(root.parent).as_posix()}:{node.lineno} {node.name}", node, public))
    return found


def _body_lines(node: ast.FunctionDef) -> int:
    body = node.body
    first = body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        body = body[1:] or body  # the docstring does not count
    return body[-1].end_lineno - body[0].lineno + 1


def _unannotated(node: ast.FunctionDef) -> list[str]:
    args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
    missing = [a.arg for a in args if a.annotation is None and a.arg not in ("self", "cls")]
    missing += [f"*{a.arg}" for a in (node.args.vararg, node.args.kwarg) if a is not None and a.annotation is None]
    return missing + (["return"] if node.returns is None else [])


def test_no_function_is_longer_than_40_body_lines() -> None:
    assert [where for where, node, _ in _functions() if _body_lines(node) > 40] == []


def test_the_public_api_is_typed() -> None:
    untyped = [f"{where} {_unannotated(node)}" for where, node, public in _functions() if public and _unannotated(node)]
    assert untyped == []


def test_the_audits_see_long_and_untyped_functions(tmp_path: Path) -> None:
    """Negative control for the two audits above."""
    fake = tmp_path / "lightning_ar"
    fake.mkdir()
    body = "".join(f"    x{i} = {i}\n" for i in range(41))
    (fake / "bad.py").write_text(f'def public(a, b: int):\n    """Doc."""\n{body}\n\ndef _private(a):\n    return a\n')
    found = {where.split()[-1]: node for where, node, _ in _functions(fake)}
    assert _body_lines(found["public"]) == 41 and _unannotated(found["public"]) == ["a", "return"]
    assert [w for w, _, public in _functions(fake) if public] == ["lightning_ar/bad.py:1 public"]
