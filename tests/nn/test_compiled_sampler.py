"""``compile_sampler``: the head's DDPM step through ``torch.compile`` with a dynamic row count gives the eager
sampler's samples (same noise draws; tolerance 1e-5 absolute with dynamo's capture only, 1e-4 with inductor's code
generation, over 20 denoising steps) and compiles once for every AR step's token count and guidance scale."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from helpers.tiny import TINY, random_head

from lightning_ar.nn import DiffusionLoss, SamplingOptions


class CountingBackend:
    """A ``torch.compile`` backend that runs the captured graph as it is and counts the graphs it is given."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        return gm.forward


def _samples(head: DiffusionLoss, rows: int, compiled: bool, cfg: float) -> torch.Tensor:
    z = torch.randn(rows, 8, generator=torch.Generator().manual_seed(rows))
    z_null = torch.randn(rows, 8, generator=torch.Generator().manual_seed(100 + rows)) if cfg != 1.0 else None
    opts = SamplingOptions(num_sampling_steps=20, cfg=cfg, compile_sampler=compiled)
    return head.sample(z, z_null, opts, generator=torch.Generator().manual_seed(7))


def test_compiled_sampler_equals_eager_and_compiles_once_for_every_count() -> None:
    torch._dynamo.reset()
    head, backend = random_head(), CountingBackend()
    head.sampler_compile_options = {"backend": backend, "fullgraph": True}  # fullgraph: no graph break anywhere
    for rows, cfg in ((3, 2.0), (5, 3.0), (11, 1.5), (7, 4.0)):  # token counts and scales of four AR steps
        torch.testing.assert_close(_samples(head, rows, True, cfg), _samples(head, rows, False, cfg),
                                   rtol=0, atol=1e-5)
    guided_graphs = backend.graphs
    assert guided_graphs == 2  # a noisy step and the last (noiseless) one: never one per count or scale
    for rows in (4, 9):  # without guidance: a branch of its own, compiled once too
        torch.testing.assert_close(_samples(head, rows, True, 1.0), _samples(head, rows, False, 1.0),
                                   rtol=0, atol=1e-5)
    assert backend.graphs == guided_graphs + 2
    before = backend.graphs
    for rows, cfg in ((6, 2.5), (13, 1.0)):
        _samples(head, rows, True, cfg)
    assert backend.graphs == before  # new counts and scales: no new graph


def test_compiled_sampler_sees_weight_changes_and_is_not_state() -> None:
    """Negative control: after the weights change, compiled samples follow (they are graph inputs, not constants)."""
    torch._dynamo.reset()
    head = random_head()
    head.sampler_compile_options = {"backend": CountingBackend()}
    first = _samples(head, 5, True, 2.0)
    with torch.no_grad():
        head.net.final.linear.weight.mul_(1.5)
    moved = _samples(head, 5, True, 2.0)
    assert (moved - first).abs().max() > 1e-3
    torch.testing.assert_close(moved, _samples(head, 5, False, 2.0), rtol=0, atol=1e-5)
    assert "_compiled_ddpm" in head.__dict__
    for clone in (copy.deepcopy(head), pickle.loads(pickle.dumps(head))):
        assert "_compiled_ddpm" not in clone.__dict__
        torch.testing.assert_close(_samples(clone, 5, False, 2.0), moved, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_inductor_compiled_sampler_matches_eager() -> None:
    torch._dynamo.reset()
    head = random_head()
    for rows in (3, 8):
        torch.testing.assert_close(_samples(head, rows, True, 3.0), _samples(head, rows, False, 3.0),
                                   rtol=0, atol=1e-4)


def test_generator_option_compiles_the_head_through_generate() -> None:
    """``--model.compile_sampler`` (a sampling option): a MAR generator's samples over its AR steps (linear CFG
    schedule: a new scale every step) equal the eager ones."""
    from lightning_ar import MARGenerator

    torch._dynamo.reset()
    torch.manual_seed(0)
    gen = MARGenerator((1, 8, 8), 10, 1.0, **TINY, patch_size=2, cfg=3.0, compile_sampler=True).eval()
    for p in gen.head.parameters():
        p.data.normal_(0, 0.2)
    backend = CountingBackend()
    gen.head.sampler_compile_options = {"backend": backend}
    labels = torch.arange(6)
    compiled = gen.generate(labels, generator=torch.Generator().manual_seed(3), progress=False)
    eager = gen.generate(labels, generator=torch.Generator().manual_seed(3), progress=False, compile_sampler=False)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-4)
    assert backend.graphs == 2 and gen.hparams.compile_sampler is True  # every AR step's count and scale


def test_compile_sampler_is_checked() -> None:
    with pytest.raises(ValueError, match="compile_sampler compiles the ddpm step only"):
        SamplingOptions(sampler="ddim", compile_sampler=True)
    with pytest.raises(ValueError, match="compile_sampler must be true or false"):
        SamplingOptions(compile_sampler="yes")
