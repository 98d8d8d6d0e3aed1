"""Results tables: one row per generation variant, written as Markdown and JSON (atomically)."""

from __future__ import annotations

import json
from pathlib import Path

from lightning_ar.io import atomic_write_text

FIRST_COLUMNS = ("cond_acc", "cond_acc_floor", "fid", "fid_floor", "kid", "kid_floor", "nll", "nll_floor", "swd",
                 "swd_floor")
LAST_COLUMNS = ("sec_per_image", "refine_share", "num_samples")


def _columns(results: dict[str, dict[str, float]]) -> list[str]:
    keys = {k for row in results.values() for k in row}
    middle = sorted(keys - set(FIRST_COLUMNS) - set(LAST_COLUMNS))
    return [k for k in FIRST_COLUMNS if k in keys] + middle + [k for k in LAST_COLUMNS if k in keys]


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if float(value).is_integer() and abs(value) >= 1:
        return str(int(value))
    return f"{value:.4g}"


def format_table(results: dict[str, dict[str, float]]) -> str:
    """A Markdown table with a ``variant`` column and one column per metric (``-`` where a row lacks it)."""
    columns = _columns(results)
    lines = ["| variant | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def write_results(results: dict[str, dict[str, float]], out_dir: Path, title: str = "Results") -> tuple[Path, Path]:
    """Write ``results.md`` and ``results.json`` into ``out_dir``; return their paths."""
    md, js = Path(out_dir) / "results.md", Path(out_dir) / "results.json"
    atomic_write_text(md, f"# {title}\n\n{format_table(results)}\n")
    atomic_write_text(js, json.dumps(results, indent=2) + "\n")
    return md, js
