"""Cost of applying the entropic map (issue 15) at the refinement study's sizes, as a share of gmm sampling time.

Builds an :class:`~lightning_ar.nn.entropic_map.EntropicMap` of the study's shape (8 AR steps, 8,192 targets and
8,192 pool points per step, width 64, L = 16, 10 classes) from random clouds, and times applying it to the conditions
of 512 gmm sequences (16 tokens each, spread over the 8 steps as the cosine schedule does) on one thread. With
``--study`` it reads the unrefined sampling seconds of the study's runs and prints the share. Prints JSON.

    python benchmarks/entropic_map_cost.py --study outputs/refinement_study
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build(steps: int = 8, slots: int = 8192, dim: int = 64, seq_len: int = 16, classes: int = 10):
    import torch

    from lightning_ar.nn.entropic_map import EntropicMap, MapSettings

    g = torch.Generator().manual_seed(0)
    m = EntropicMap(steps, slots, slots, dim, seq_len, MapSettings(max_iter=50))
    for k in range(1, steps):
        def cloud():
            return (torch.randn(slots, dim, generator=g), torch.randint(0, classes, (slots,), generator=g),
                    torch.randint(0, seq_len, (slots,), generator=g))
        m.fit_step(k, cloud(), cloud())
    return m


def main(argv: list[str] | None = None) -> None:
    import torch

    from lightning_ar.nn.masking import cosine_schedule
    from lightning_ar.nn.teacher_forcing import masked_before

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default=None, help="the refinement study's --out folder")
    parser.add_argument("--repeats", type=int, default=3)
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    m = build()
    schedule = cosine_schedule(16, 8)
    g = torch.Generator().manual_seed(1)
    times = []
    for _ in range(opts.repeats):
        start = time.perf_counter()
        for k in range(1, 8):
            n = 512 * (masked_before(schedule, k, 16) - schedule[k])
            m(torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g),
              torch.randint(0, 16, (n,), generator=g), k)
        times.append(time.perf_counter() - start)
    out = {"map_seconds_512_sequences": statistics.median(times), "repeats": opts.repeats, "threads": 1}
    if opts.study:
        infos = [json.loads(p.read_text()) for p in Path(opts.study).glob("*/seed*/info.json")]
        base = [i["seconds"]["none"]["total"] for i in infos]
        if base:
            out["unrefined_sampling_seconds_512_sequences"] = statistics.median(base)
            out["map_share_of_sampling_time"] = out["map_seconds_512_sequences"] / (
                out["map_seconds_512_sequences"] + out["unrefined_sampling_seconds_512_sequences"])
            out["study_runs"] = len(base)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
