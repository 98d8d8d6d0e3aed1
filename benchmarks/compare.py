"""``make bench-compare``: ratios new/old of every number two ``make bench`` result files share.

    python benchmarks/compare.py OLD.json NEW.json

With no arguments it compares the two most recent ``outputs/bench/bench-*.json``. A ratio above 1 means the new value
is larger: better for throughputs (``*_per_s``, ``*gflops``, ``train_mfu``, ``speedup*``), worse for times and memory
(``*_ms``, ``sec_per_image``, ``peak_rss_mb``, ``refine_share``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

LOWER_IS_BETTER = ("_ms", "sec_per_image", "peak_rss_mb", "refine_share")


def flatten(doc: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a JSON document keyed by their dotted path."""
    if isinstance(doc, dict):
        out: dict[str, float] = {}
        for key, value in doc.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(doc, (int, float)) and not isinstance(doc, bool):
        return {prefix[:-1]: float(doc)}
    return {}


def compare(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, float, float, float | None, str]]:
    """Rows ``(key, old, new, new/old, verdict)`` for the numeric keys present in both documents."""
    a, b = flatten(old), flatten(new)
    rows = []
    for key in sorted(a.keys() & b.keys()):
        ratio = b[key] / a[key] if a[key] else None
        verdict = ""
        if ratio is not None and abs(ratio - 1) > 0.05:
            worse = (ratio > 1) == key.endswith(LOWER_IS_BETTER)
            verdict = "worse" if worse else "better"
        rows.append((key, a[key], b[key], ratio, verdict))
    return rows


def latest_two(folder: Path) -> tuple[Path, Path]:
    files = sorted(folder.glob("bench-*.json"))
    if len(files) < 2:
        raise SystemExit(f"bench-compare: need two result files in {folder} (run `make bench` twice), "
                         f"found {len(files)}")
    return files[-2], files[-1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="*", help="OLD.json NEW.json (default: the two latest in outputs/bench)")
    args = parser.parse_args(argv)
    if len(args.files) not in (0, 2):
        parser.error("give two files (OLD NEW) or none")
    old_path, new_path = map(Path, args.files) if args.files else latest_two(Path("outputs/bench"))
    for path in (old_path, new_path):
        if not path.is_file():
            parser.error(f"{path} does not exist")
    rows = compare(json.loads(old_path.read_text()), json.loads(new_path.read_text()))
    print(f"old: {old_path}\nnew: {new_path}")
    print(f"{'metric':60s} {'old':>12s} {'new':>12s} {'new/old':>8s}")
    for key, a, b, ratio, verdict in rows:
        shown = f"{ratio:8.3f}" if ratio is not None else f"{'-':>8s}"
        print(f"{key:60s} {a:12.4g} {b:12.4g} {shown} {verdict}")
    worse = [r[0] for r in rows if r[4] == "worse"]
    print(f"{len(rows)} metrics compared; {len(worse)} worse by more than 5%", file=sys.stderr)


if __name__ == "__main__":
    main()
