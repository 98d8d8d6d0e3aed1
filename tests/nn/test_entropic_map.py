"""The batch-independent entropic map (issue 15): solver vs geomloss, known Gaussian map, null test, batch
independence, injected errors recovered, storage in a module's state dict."""

from __future__ import annotations

import math

import pytest
import torch
from geomloss import SamplesLoss

from lightning_ar.nn.entropic_map import (
    EntropicMap,
    MapSettings,
    apply_step_map,
    fit_step_map,
    solve_entropic_ot,
    solve_self_ot,
    within_group_spread,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny clouds, one torch thread


def _uniform(n: int) -> torch.Tensor:
    return torch.full((n,), 1.0 / n)


def test_solver_agrees_with_geomloss_and_converges_further() -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 3, generator=g), torch.randn(200, 3, generator=g) * 0.7 + 1.0
    a, b = _uniform(300), _uniform(200)
    sol = solve_entropic_ot(x, y, a, b, blur=0.3, tolerance=1e-5, max_iter=2000)
    assert sol.marginal_error < 1e-5
    loss = SamplesLoss("sinkhorn", p=2, blur=0.3, scaling=0.99, debias=False, potentials=True)
    f_ref, g_ref = (t.reshape(-1) for t in loss(x, y))  # geomloss stops after its annealing (marginal error ~6e-3)
    assert float((a * sol.f).sum() + (b * sol.g).sum()) == pytest.approx(float((a * f_ref).sum() + (b * g_ref).sum()),
                                                                         rel=1e-3)  # OT_eps(a, b)
    shift = float((sol.f - f_ref).mean())  # potentials are defined up to (f + c, g - c)
    assert float((sol.f - shift - f_ref).abs().mean()) < 1e-2 and float((sol.g + shift - g_ref).abs().mean()) < 1e-2
    own = solve_self_ot(x, a, blur=0.3, tolerance=1e-5, max_iter=2000)
    f_self = loss(x, x)[0].reshape(-1)
    assert own.marginal_error < 1e-5 and float((own.f - f_self).abs().mean()) < 1e-2


def _sqrtm(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh(m)
    return vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T


def test_recovers_the_monge_map_between_gaussians() -> None:
    g = torch.Generator().manual_seed(1)
    cov_x, cov_y = torch.tensor([[1.0, 0.0], [0.0, 4.0]]), torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    mean_y = torch.tensor([2.0, -1.0])
    x = torch.randn(1500, 2, generator=g) @ _sqrtm(cov_x)
    y = mean_y + torch.randn(1500, 2, generator=g) @ _sqrtm(cov_y)
    root = _sqrtm(cov_x)
    inv_root = torch.linalg.inv(root)
    a_map = inv_root @ _sqrtm(root @ cov_y @ root) @ inv_root  # the Monge map is c -> mean_y + A c
    classes = torch.zeros(1500, dtype=torch.long)
    step = fit_step_map(x, classes, y, classes, blur=0.2, settings=MapSettings(tolerance=1e-3))
    test = torch.randn(500, 2, generator=g) @ _sqrtm(cov_x)
    test = test[(test @ torch.linalg.inv(cov_x) * test).sum(1) < 4.0]  # the bulk (Mahalanobis radius < 2)
    mapped = apply_step_map(step, test, torch.zeros(len(test), dtype=torch.long), 2)
    exact = mean_y + test @ a_map.T
    error = float((mapped - exact).norm(dim=1).mean())
    assert error < 0.12, error  # the spread of the target is ~1.2
    assert step.marginal_error < 1e-3


def _grouped_cloud(n: int, seed: int, bias: float = 0.0, scale: float = 1.0):
    """Conditions of 2 classes x 2 positions in 8-D: a group mean plus unit-variance context variation."""
    g = torch.Generator().manual_seed(seed)
    labels, positions = torch.randint(0, 2, (n,), generator=g), torch.randint(0, 2, (n,), generator=g)
    means = torch.randn(2, 2, 8, generator=torch.Generator().manual_seed(99)) * 3.0
    z = means[labels, positions] + scale * torch.randn(n, 8, generator=g) + bias
    return z, labels, positions


def _fit(pool, target, **settings) -> EntropicMap:
    m = EntropicMap(2, len(target[0]), len(pool[0]), 8, 2, MapSettings(**settings))
    m.fit_step(1, pool, target)
    return m


def _moved(m: EntropicMap, test) -> tuple[float, float]:
    z, labels, positions = test
    out = m(z, labels, positions, 1)
    groups = labels * 2 + positions
    spread = within_group_spread(z, groups)
    return float((out - z).pow(2).sum(1).mean().sqrt()) / spread, within_group_spread(out, groups) / spread


def test_null_test_passes_debiased_and_fails_plain() -> None:
    """Pool and target from the same distribution: the debiased map leaves fresh conditions where they are
    (< 0.1x their spread, dispersion kept); the plain entropic map pulls them toward local means (the negative
    control: the null test can fail)."""
    pool, target, test = _grouped_cloud(4000, 0), _grouped_cloud(4000, 1), _grouped_cloud(500, 2)
    moved, dispersion = _moved(_fit(pool, target, blur_fraction=2.0), test)
    assert moved < 0.1 and abs(dispersion - 1) < 0.05, (moved, dispersion)
    moved_plain, dispersion_plain = _moved(_fit(pool, target, blur_fraction=2.0, debias=False), test)
    assert moved_plain > 0.3 and dispersion_plain < 0.8, (moved_plain, dispersion_plain)


@pytest.mark.parametrize("error", ["bias", "over"])
def test_injected_errors_are_corrected(error: str) -> None:
    kwargs = {"bias": dict(bias=0.7), "over": dict(scale=1.5)}[error]
    pool, target, test = _grouped_cloud(2000, 0, **kwargs), _grouped_cloud(2000, 1), _grouped_cloud(500, 2, **kwargs)
    clean = _grouped_cloud(500, 2)
    m = _fit(pool, target, blur_fraction={"bias": 1.0, "over": 0.5}[error])
    out = m(*test, 1)
    groups = test[1] * 2 + test[2]
    spread = within_group_spread(clean[0], groups)
    if error == "bias":  # the same noise without the bias is where each condition belongs
        before = float((test[0] - clean[0]).mean(0).norm())
        after = float((out - clean[0]).mean(0).norm())
        assert after < 0.25 * before, (before, after)
    else:
        assert within_group_spread(test[0], groups) / spread == pytest.approx(1.5, rel=0.05)
        # most of the excess removed; the rest is the entropic smoothing (at a blur of one spread, 1.5 -> 1.33 only)
        assert within_group_spread(out, groups) / spread < 1.2


def test_each_condition_is_refined_on_its_own() -> None:
    pool, target, test = _grouped_cloud(1000, 0, bias=0.5), _grouped_cloud(1000, 1), _grouped_cloud(64, 2)
    m = _fit(pool, target)
    batch = m(*test, 1)
    alone = torch.cat([m(test[0][i: i + 1], test[1][i: i + 1], test[2][i: i + 1], 1) for i in range(64)])
    assert torch.allclose(batch, alone, atol=1e-5)
    assert not torch.allclose(batch, test[0], atol=1e-2)  # it does move them


def test_map_is_stored_in_the_state_dict_and_checks_its_steps() -> None:
    pool, target, test = _grouped_cloud(600, 0, bias=0.5), _grouped_cloud(600, 1), _grouped_cloud(32, 2)
    m = _fit(pool, target, position_weight=2.0)
    copy = EntropicMap(2, 600, 600, 8, 2)  # other settings: the stored ones are used
    copy.load_state_dict(m.state_dict())
    assert torch.allclose(copy(*test, 1), m(*test, 1))
    with pytest.raises(ValueError, match="AR step 0 is not fitted"):
        m(*test, 0)
    with pytest.raises(ValueError, match="exceed the map's slots"):
        m.fit_step(1, _grouped_cloud(601, 0), target)
    m.fit_step(1, pool, tuple(t[target[1] == 0] for t in target))  # class 1 has no targets: left unchanged
    out, one = m(*test, 1), test[1] == 1
    assert torch.equal(out[one], test[0][one]) and not torch.allclose(out[~one], test[0][~one], atol=1e-3)


def test_a_step_without_spread_is_the_identity() -> None:
    z = torch.randn(2, 4, 8)[torch.zeros(100, dtype=torch.long), torch.arange(100) % 4]  # one point per group
    labels, positions = torch.zeros(100, dtype=torch.long), torch.arange(100) % 4
    m = EntropicMap(1, 100, 100, 8, 4)
    assert m.fit_step(0, (z, labels, positions), (z, labels, positions)) == 0.0
    assert m.fitted(0) and torch.equal(m(z + 1, labels, positions, 0), z + 1)
    assert math.isfinite(float(m.marginal_error[0]))
