"""Reliability, property-based (hypothesis) tests of the public API: any shape/dtype/value either works or raises a
clear ValueError/TypeError; patchify/unpatchify round-trip exactly; refinement keeps finite input finite."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_ar import MARGenerator
from lightning_ar.data.shards import open_shard, write_shard
from lightning_ar.nn.labelled_conditions import LabelledConditions
from lightning_ar.nn.mar import patchify, unpatchify
from lightning_ar.nn.refine import refine_conditions, sinkhorn_flow

FAST = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
DTYPES = [torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.bool, torch.uint8]


@pytest.fixture(scope="module")
def model() -> MARGenerator:
    torch.manual_seed(0)
    return MARGenerator(latent_shape=(1, 4, 4), num_classes=3, width=16, encoder_depth=1, decoder_depth=1,
                        num_heads=2, head_width=16, head_depth=1, num_iter=2, num_sampling_steps=2)


@FAST
@given(b=st.integers(1, 3), c=st.integers(1, 3), hp=st.integers(1, 3), wp=st.integers(1, 3), p=st.integers(1, 3),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.float64, torch.int64]))
def test_patchify_roundtrip_is_exact(b: int, c: int, hp: int, wp: int, p: int, dtype: torch.dtype) -> None:
    latents = (torch.randn(b, c, hp * p, wp * p, generator=torch.Generator().manual_seed(b + c)) * 100).to(dtype)
    tokens = patchify(latents, p)
    assert tokens.shape == (b, hp * wp, p * p * c)
    assert torch.equal(unpatchify(tokens, p, c, hp * p, wp * p), latents)


@FAST
@given(shape=st.lists(st.integers(0, 5), min_size=0, max_size=5), p=st.integers(1, 4))
def test_patchify_any_shape_works_or_raises_value_error(shape: list[int], p: int) -> None:
    latents = torch.zeros(shape)
    try:
        tokens = patchify(latents, p)
    except ValueError as err:
        assert "latents" in str(err) or "patch_size" in str(err)
    else:
        assert unpatchify(tokens, p, *latents.shape[1:]).shape == latents.shape


@FAST
@given(labels=st.lists(st.integers(-2, 4), min_size=0, max_size=4), dtype=st.sampled_from(DTYPES),
       extra_dim=st.booleans(), num_iter=st.integers(0, 18), cfg=st.sampled_from([1.0, 2.5]),
       temperature=st.sampled_from([1.0, 0.0, -1.0]))
def test_generate_any_input_works_or_raises_clear_error(model: MARGenerator, labels: list[int], dtype: torch.dtype,
                                                        extra_dim: bool, num_iter: int, cfg: float,
                                                        temperature: float) -> None:
    tensor = torch.tensor(labels, dtype=dtype)
    tensor = tensor[None] if extra_dim else tensor
    try:
        out = model.generate(tensor, num_iter=num_iter, cfg=cfg, temperature=temperature,
                             generator=torch.Generator().manual_seed(0))
    except (ValueError, TypeError) as err:
        assert any(word in str(err) for word in ("labels", "num_iter", "temperature")), str(err)
    else:
        assert out.shape == (tensor.shape[0], 1, 4, 4) and torch.isfinite(out).all()


finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@FAST
@given(n=st.integers(1, 12), m=st.integers(1, 12), d=st.integers(1, 4), scale=st.sampled_from([1e-3, 1.0, 100.0]),
       steps=st.integers(1, 3), eta=st.sampled_from([0.1, 1.0]), lam=st.sampled_from([0.0, 0.5]))
def test_sinkhorn_flow_keeps_finite_input_finite(n: int, m: int, d: int, scale: float, steps: int, eta: float,
                                                 lam: float) -> None:
    gen = torch.Generator().manual_seed(n * 100 + m * 10 + d)
    c0, target = torch.randn(n, d, generator=gen) * scale, torch.randn(m, d, generator=gen) * scale + 1.0
    result = sinkhorn_flow(c0, target, steps=steps, eta=eta, lam=lam)
    assert result.conditions.shape == (n, d) and torch.isfinite(result.conditions).all()


@FAST
@given(n=st.integers(1, 10), m=st.integers(1, 10), classes=st.integers(1, 3), seq_len=st.integers(1, 3),
       value=finite)
def test_refine_conditions_keeps_finite_input_finite(n: int, m: int, classes: int, seq_len: int, value: float) -> None:
    gen = torch.Generator().manual_seed(n + m)
    z, target = torch.randn(n, 3, generator=gen) + value, torch.randn(m, 3, generator=gen)
    lab, pos = torch.randint(classes, (n,), generator=gen), torch.randint(seq_len, (n,), generator=gen)
    tlab, tpos = torch.randint(classes, (m,), generator=gen), torch.randint(seq_len, (m,), generator=gen)
    result = refine_conditions(LabelledConditions(z, lab, pos), LabelledConditions(target, tlab, tpos), classes,
                               seq_len, steps=2)
    assert result.conditions.shape == z.shape and torch.isfinite(result.conditions).all()


@FAST
@given(shape=st.lists(st.integers(0, 3), min_size=1, max_size=6), labels=st.integers(0, 4),
       dtype=st.sampled_from(["float32", "float16", "bfloat16", "int8", "complex64", "not-a-dtype"]),
       value=st.sampled_from([0.0, 1.5, -7.0, 1e6, float("nan"), float("inf")]))
def test_shard_write_read_works_or_raises_clear_error(shape: list[int], labels: int, dtype: str, value: float) -> None:
    moments = np.full(shape, value, dtype=np.float64)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            info = write_shard(tmp, 0, moments, np.zeros(labels), dtype)
        except (ValueError, TypeError) as err:
            assert any(word in str(err) for word in ("shard", "NaN", "dtype", "not understood")), str(err)
            return
        read, read_labels = open_shard(tmp, info, tuple(shape[1:]), dtype, check_values=True)
        assert np.array_equal(read, moments.astype(dtype)) and read_labels.shape == (labels,)


def test_sinkhorn_flow_single_point_cloud() -> None:
    """Found by hypothesis: coincident points (zero diameter) used to make geomloss's epsilon schedule infinite."""
    result = sinkhorn_flow(torch.zeros(1, 1), torch.ones(1, 1), steps=1)
    assert torch.isfinite(result.conditions).all()
