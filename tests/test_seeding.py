"""The one seed-derivation rule (``lightning_ar.seeding``) and the places that must use it."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from lightning_ar.seeding import seeded_generator, step_seeds

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_ar"


def test_seeded_generator_is_seed_times_stride_plus_stream() -> None:
    for seed, stream, stride in ((0, 0, 1), (3, 5, 7919), (2, 17, 7907), (1, 4, 1_000_003)):
        ours = torch.rand(4, generator=seeded_generator(seed, stream, stride=stride))
        assert torch.equal(ours, torch.rand(4, generator=torch.Generator().manual_seed(seed * stride + stream)))
    # streams of neighbouring seeds stay apart while stream < stride
    seeds = {seed * 7919 + k for seed in range(3) for k in range(100)}
    assert len(seeds) == 300


def test_step_seeds_depend_on_every_part() -> None:
    base = step_seeds(0, 10, 0)
    assert len(base) == 2 and all(0 <= s < 2**63 for s in base)
    assert len({tuple(step_seeds(*parts)) for parts in ((0, 10, 0), (1, 10, 0), (0, 11, 0), (0, 10, 1))}) == 4


def test_the_package_seeds_generators_only_through_the_rule() -> None:
    """No ``torch.Generator(...).manual_seed(...)`` outside ``seeding.py`` (negative control: the rule's own file
    matches the pattern)."""
    pattern = re.compile(r"Generator\([^)]*\)\.manual_seed\(")
    hits = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if pattern.search(p.read_text())]
    assert hits == ["seeding.py"], hits
