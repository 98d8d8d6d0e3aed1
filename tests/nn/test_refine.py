"""OT refinement against analytic answers: Gaussian clouds, permutations, labelled transport, reservoir sampling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_ar.nn.labelled_conditions import LabelledConditions
from lightning_ar.nn.refine import (
    AmortizedRefiner,
    ConditionBank,
    group_matched_weights,
    labelled,
    refine_conditions,
    sinkhorn_divergence,
    sinkhorn_flow,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny clouds, one torch thread


def gaussian(n: int, mean: tuple[float, ...], std: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.tensor(mean) + std * torch.randn(n, len(mean), generator=g)


def test_flow_between_gaussians_is_monotone_and_converges() -> None:
    x, y = gaussian(200, (0.0, 0.0), 1.0, 0), gaussian(200, (3.0, 0.0), 1.0, 1)
    result = sinkhorn_flow(x, y, steps=20, eta=1.0, blur=0.05)
    trace = result.trace
    assert trace.shape == (21,)
    assert (trace[1:] - trace[:-1] <= 1e-4 * trace[0]).all(), trace
    assert trace[-1] < 0.05 * trace[0], trace
    assert abs(result.conditions.mean(0)[0] - 3.0) < 0.1  # the cloud's mean has moved onto the target's


def test_flow_uniform_weights_match_default_and_run_under_no_grad() -> None:
    x, y = gaussian(60, (0.0, 0.0), 1.0, 0).double(), gaussian(50, (2.0, 1.0), 0.5, 1).double()
    with torch.no_grad():
        plain = sinkhorn_flow(x, y, steps=3)
        weighted = sinkhorn_flow(x, y, steps=3, a=torch.full((60,), 1 / 60), b=torch.full((50,), 1 / 50))
    assert plain.conditions.dtype == torch.float64 and torch.isfinite(plain.conditions).all()
    torch.testing.assert_close(plain.conditions, weighted.conditions, atol=1e-4, rtol=1e-4)


def test_weighted_step_moves_each_particle_onto_its_transport_target() -> None:
    # well-separated pairs: the plan is 0 -> 1 and 10 -> 11 whatever the weights, so with eta = 1 one step of the
    # Wasserstein gradient grad / a lands every particle on its target (N * grad would move them by 1.8 and 0.2)
    x, y, w = torch.tensor([[0.0], [10.0]]), torch.tensor([[1.0], [11.0]]), torch.tensor([0.9, 0.1])
    result = sinkhorn_flow(x, y, steps=1, eta=1.0, blur=0.05, a=w, b=w)
    torch.testing.assert_close(result.conditions, y, atol=1e-3, rtol=0)
    assert result.trace[-1] < 1e-4 < result.trace[0]


def test_permuted_target_is_a_fixed_point() -> None:
    y = gaussian(150, (1.0, -2.0, 0.5, 0.0), 1.0, 2)
    x = y[torch.randperm(150, generator=torch.Generator().manual_seed(0))]
    result = sinkhorn_flow(x, y, steps=5, eta=1.0, blur=0.05)
    assert (result.conditions - x).abs().max() < 1e-3
    assert result.trace.abs().max() < 1e-4


def test_proximity_term_scales_displacement_down() -> None:
    x, y = gaussian(100, (0.0, 0.0), 1.0, 0), gaussian(100, (3.0, 0.0), 1.0, 1)
    moves = [(sinkhorn_flow(x, y, steps=20, eta=0.01, lam=lam).conditions - x).norm(dim=1).mean() for lam in
             (0.0, 10.0, 100.0)]
    assert moves[0] > moves[1] > moves[2]
    assert moves[2] < 0.1 * moves[0], moves


def opposite_sides(group_a: torch.Tensor, group_b: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Produced points of group a sit next to group b's target and vice versa; unequal group sizes."""
    z = torch.cat([gaussian(40, (2.0, 0.0), 0.3, 0), gaussian(60, (-2.0, 0.0), 0.3, 1)])
    target = torch.cat([gaussian(50, (-3.0, 0.0), 0.3, 2), gaussian(50, (3.0, 0.0), 0.3, 3)])
    return z, torch.cat([group_a.expand(40), group_b.expand(60)]), target


@pytest.mark.parametrize("by", ["class", "position"])
def test_refinement_never_crosses_classes_or_positions(by: str) -> None:
    z, groups, target = opposite_sides(torch.tensor(0), torch.tensor(1))
    tgt_groups = torch.cat([torch.zeros(50, dtype=torch.long), torch.ones(50, dtype=torch.long)])
    zeros_z, zeros_t = torch.zeros_like(groups), torch.zeros_like(tgt_groups)
    src, tgt = ((LabelledConditions(z, groups, zeros_z), LabelledConditions(target, tgt_groups, zeros_t))
                if by == "class" else
                (LabelledConditions(z, zeros_z, groups), LabelledConditions(target, zeros_t, tgt_groups)))
    result = refine_conditions(src, tgt, num_classes=2, seq_len=2, steps=10, eta=1.0, blur=0.05)
    means = torch.stack([target[:50].mean(0), target[50:].mean(0)])  # (2, D): targets of group 0 and 1
    for g in (0, 1):
        before, after = z[groups == g], result.conditions[groups == g]
        own, other = means[g], means[1 - g]
        assert ((after - own).norm(dim=1) < (before - own).norm(dim=1)).all()
        assert ((after - other).norm(dim=1) > (before - other).norm(dim=1)).all()
    assert result.unmoved == 0
    # group sizes differ (40/60 produced, 50/50 target): only the group-matched target weights let it reach ~0
    assert (result.trace[1:] <= result.trace[:-1] + 1e-4 * result.trace[0]).all()
    assert result.trace[-1] < 1e-3 * result.trace[0], result.trace
    # without labels the same flow takes the short way across groups: the check above can fail
    plain = sinkhorn_flow(z, target, steps=10).conditions[groups == 0]
    assert ((plain - means[1]).norm(dim=1) < (z[groups == 0] - means[1]).norm(dim=1)).float().mean() > 0.9


def test_refinement_leaves_points_without_target_group_unmoved() -> None:
    z, labels, target = opposite_sides(torch.tensor(0), torch.tensor(2))  # class 2 has no target point
    tgt_labels = torch.cat([torch.zeros(50, dtype=torch.long), torch.ones(50, dtype=torch.long)])
    pos, tgt_pos = torch.zeros_like(labels), torch.zeros_like(tgt_labels)
    source = LabelledConditions(z, labels, pos)
    result = refine_conditions(source, LabelledConditions(target, tgt_labels, tgt_pos), num_classes=3, seq_len=1,
                               steps=3)
    assert result.unmoved == 60
    assert torch.equal(result.conditions[labels == 2], z[labels == 2])
    assert not torch.allclose(result.conditions[labels == 0], z[labels == 0])
    none = refine_conditions(source, LabelledConditions(target, tgt_labels + 5, tgt_pos), num_classes=8,
                             seq_len=1, steps=3)
    assert none.unmoved == 100 and torch.equal(none.conditions, z) and none.trace.shape == (4,)


def test_group_matched_weights() -> None:
    a, b, keep = group_matched_weights(torch.tensor([0, 0, 0, 1, 2]), torch.tensor([0, 1, 1, 1, 3]))
    assert keep.tolist() == [True, True, True, True, False]
    torch.testing.assert_close(a, torch.tensor([0.25, 0.25, 0.25, 0.25, 0.0]))
    torch.testing.assert_close(b, torch.tensor([0.75, 1 / 12, 1 / 12, 1 / 12, 0.0]))
    assert abs(a.sum() - 1) < 1e-6 and abs(b.sum() - 1) < 1e-6


def test_labelled_appends_scaled_one_hots() -> None:
    out = labelled(torch.ones(2, 3), torch.tensor([1, 0]), torch.tensor([2, 0]), num_classes=2, seq_len=3, weight=5.0)
    assert out.tolist() == [[1, 1, 1, 0, 5, 0, 0, 5], [1, 1, 1, 5, 0, 5, 0, 0]]


def test_bad_inputs_name_the_option() -> None:
    x, y = torch.randn(10, 2), torch.randn(12, 2)
    with pytest.raises(ValueError, match="blur"):
        sinkhorn_divergence(x, y, blur=0.0)
    with pytest.raises(ValueError, match="blur"):
        sinkhorn_flow(x, y, steps=1, blur=-1.0)
    with pytest.raises(ValueError, match="dimension 2 but the target has dimension 3"):
        sinkhorn_flow(x, torch.randn(12, 3))
    with pytest.raises(ValueError, match="dimension 2 but the target has dimension 3"):
        sinkhorn_divergence(x, torch.randn(12, 3))
    with pytest.raises(ValueError, match="conditions must be finite"):
        sinkhorn_flow(torch.full((10, 2), float("nan")), y)
    with pytest.raises(ValueError, match="target must be finite"):
        sinkhorn_flow(x, torch.full((12, 2), float("inf")))
    with pytest.raises(ValueError, match="eta"):
        sinkhorn_flow(x, y, eta=0.0)
    with pytest.raises(ValueError, match="label_weight"):
        refine_conditions(LabelledConditions(x, torch.zeros(10), torch.zeros(10)),
                          LabelledConditions(y, torch.zeros(12), torch.zeros(12)), 1, 1, label_weight=-1.0)
    with pytest.raises(TypeError, match=r"unknown flow option\(s\) \['stepz'\]"):
        refine_conditions(LabelledConditions(x, torch.zeros(10), torch.zeros(10)),
                          LabelledConditions(y, torch.zeros(12), torch.zeros(12)), 1, 1, stepz=3)


def test_bank_reservoir_is_uniform_and_bounded() -> None:
    bank, g, kept = ConditionBank(num_buckets=2, capacity=100, dim=1), torch.Generator().manual_seed(0), []
    items = torch.arange(1000.0)
    for _ in range(200):
        bank.count.zero_(), bank.seen.zero_()
        for chunk in items.split(37):
            bank.add(1, chunk[:, None], chunk.long(), chunk.long(), generator=g)
            assert bank.count[1] <= 100
        z, labels, _ = bank.get(1)
        assert len(labels.unique()) == 100 and torch.equal(z[:, 0].long(), labels)
        kept.append(labels)
    kept = torch.cat(kept)  # 20,000 draws, 2,000 expected per decile of offers
    assert abs(kept.float().mean() - 499.5) < 10
    assert (torch.bincount(kept // 100, minlength=10) - 2000).abs().max() < 200
    assert bank.count[0] == 0 and bank.seen[1] == 1000


def test_bank_keeps_the_second_of_two_offers_half_the_time() -> None:
    bank, g, second = ConditionBank(num_buckets=1, capacity=1, dim=1), torch.Generator().manual_seed(0), 0
    for _ in range(400):
        bank.seen.zero_()
        for item in (0, 1):  # Algorithm R: item t replaces the reservoir with probability capacity / (t + 1)
            bank.add(0, torch.tensor([[float(item)]]), torch.tensor([item]), torch.tensor([0]), generator=g)
        second += int(bank.get(0)[1])
    assert abs(second / 400 - 0.5) < 0.1


def test_bank_state_dict_roundtrip_and_errors() -> None:
    holder = nn.Module()
    holder.bank = ConditionBank(num_buckets=3, capacity=8, dim=4)
    holder.bank.add(0, torch.randn(5, 4), torch.arange(5), torch.arange(5) + 10)
    fresh = nn.Module()
    fresh.bank = ConditionBank(num_buckets=3, capacity=8, dim=4)
    fresh.load_state_dict(holder.state_dict())
    for got, want in zip(fresh.bank.get(0), holder.bank.get(0)):
        assert torch.equal(got, want)
    z, labels, positions = fresh.bank.sample(0, 3, torch.Generator().manual_seed(0))
    assert z.shape == (3, 4) and len(labels.unique()) == 3 and torch.equal(positions, labels + 10)
    assert len(fresh.bank.sample(0, 50)[0]) == 5
    with pytest.raises(ValueError, match="bucket 1 is empty"):
        fresh.bank.get(1)
    with pytest.raises(ValueError, match="bank has dimension 4 but the generator's conditions have 128"):
        fresh.bank.check_compatible(128, 3)
    with pytest.raises(ValueError, match="bank has 3 buckets"):
        fresh.bank.check_compatible(4, 8)
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        ConditionBank(num_buckets=3, capacity=0, dim=4)


def test_amortized_refiner_starts_as_identity_and_learns() -> None:
    torch.manual_seed(0)
    refiner = AmortizedRefiner(dim=4, num_steps=3, num_classes=2, hidden=16)
    z, labels = torch.randn(8, 4), torch.randint(0, 2, (8,))
    assert torch.equal(refiner(z, labels, 1), z)
    assert torch.equal(refiner(z, labels, torch.full((8,), 2)), z)
    opt = torch.optim.SGD(refiner.parameters(), lr=0.1)
    ((refiner(z, labels, 1) - (z + 1)) ** 2).mean().backward()
    opt.step()
    assert not torch.allclose(refiner(z, labels, 1), z)
    with pytest.raises(ValueError, match="step must be in"):
        refiner(z, labels, 3)


@pytest.mark.parametrize("extra_columns", [0, 3])
def test_flow_field_equals_geomloss_gradient_of_the_debiased_divergence(extra_columns: int) -> None:
    """The closed-form field (fused Sinkhorn, no autograd) must equal geomloss's autograd gradient of the full
    debiased divergence divided by the source weights, on the moving coordinates (fixed columns appended)."""
    from geomloss import SamplesLoss

    from lightning_ar.nn.sinkhorn import divergence_flow_field

    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(20, 3 + extra_columns, generator=gen), torch.randn(30, 3 + extra_columns, generator=gen) + 0.5
    a = torch.rand(20, generator=gen) + 0.5
    a, b = a / a.sum(), torch.rand(30, generator=gen) + 0.5
    b = b / b.sum()
    diameter = float((torch.cat([x, y]).amax(0) - torch.cat([x, y]).amin(0)).norm())
    xr = x.clone().requires_grad_(True)
    (full,) = torch.autograd.grad(sinkhorn_divergence(xr, y, 0.3, 0.9, a, b), xr)
    reference = (full / a[:, None])[:, :3]
    field = divergence_flow_field(x, y, a, b, blur=0.3, scaling=0.9, diameter=diameter, dim=3)
    assert field.shape == (20, 3)
    tol = 2e-4 * float(reference.abs().max())  # same algorithm and epsilon schedule, float32 (measured ~5e-6)
    assert (field - reference).abs().max() < tol, (field - reference).abs().max()
    xr = x.clone().requires_grad_(True)
    ot = SamplesLoss("sinkhorn", p=2, blur=0.3, scaling=0.9, debias=False, backend="tensorized")
    (biased,) = torch.autograd.grad(ot(a, xr, b, y), xr)
    biased = (biased / a[:, None])[:, :3]
    assert (biased - reference).abs().max() > 10 * tol  # the source self-term matters: dropping it would be caught


def test_epsilon_schedule_matches_geomloss() -> None:
    from geomloss._legacy.sinkhorn_divergence import epsilon_schedule as geomloss_schedule

    from lightning_ar.nn.sinkhorn import epsilon_schedule

    for diameter, blur, scaling in ((7.3, 0.5, 0.3), (1.0, 0.05, 0.9), (0.5, 0.5, 0.5), (30.0, 0.01, 0.7)):
        ours, theirs = epsilon_schedule(diameter, blur, scaling), geomloss_schedule(2, diameter, blur, scaling)
        assert len(ours) == len(theirs) and all(abs(o - float(t)) <= 1e-9 * float(t) for o, t in zip(ours, theirs))


def test_tracing_does_not_change_the_flow() -> None:
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(16, 2, generator=gen), torch.randn(24, 2, generator=gen) + 1.0
    traced = sinkhorn_flow(x, y, steps=3, eta=0.5, blur=0.2, record_trace=True)
    plain = sinkhorn_flow(x, y, steps=3, eta=0.5, blur=0.2, record_trace=False)
    assert traced.trace.shape == (4,) and plain.trace.shape == (0,)
    assert torch.equal(traced.conditions, plain.conditions)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_flow_rejects_any_non_finite_entry(bad: float) -> None:
    x, y = torch.randn(6, 3), torch.randn(8, 3)
    for cloud in ("conditions", "target"):
        xs, ys = x.clone(), y.clone()
        (xs if cloud == "conditions" else ys)[-1, -1] = bad
        with pytest.raises(ValueError, match=f"{cloud} must be finite"):
            sinkhorn_flow(xs, ys, steps=1)


def test_flow_field_runs_in_float32_inside_autocast() -> None:
    from lightning_ar.nn.sinkhorn import divergence_flow_field

    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(12, 4, generator=gen), torch.randn(16, 4, generator=gen)
    a, b = torch.full((12,), 1 / 12), torch.full((16,), 1 / 16)
    plain = divergence_flow_field(x, y, a, b, 0.3, 0.5, 5.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = divergence_flow_field(x, y, a, b, 0.3, 0.5, 5.0)
    assert inside.dtype == torch.float32 and torch.equal(inside, plain)


@pytest.mark.parametrize("option, value", [("blur", 0.0), ("scaling", 1.0), ("scaling", 0.0)])
def test_flow_rejects_bad_solver_options(option: str, value: float) -> None:
    x, y = torch.randn(6, 3), torch.randn(8, 3)
    with pytest.raises(ValueError, match=f"{option} must be"):
        sinkhorn_flow(x, y, steps=1, **{option: value}, record_trace=False)


class _Recorder:
    """A hook that adds ``shift`` and records the conditions it was handed (and the null branch if asked)."""

    def __init__(self, shift: float, refine_null: bool = False) -> None:
        self.shift, self.refine_null, self.seen = shift, refine_null, []

    def __call__(self, z, labels, positions, step):
        self.seen.append(z.clone())
        return z + self.shift

    def null(self, z_null, positions, step):
        return z_null * 2


def test_chained_hooks_apply_in_order_and_pass_the_null_branch_to_those_that_refine_it() -> None:
    from lightning_ar import ChainedHooks

    first, second = _Recorder(1.0), _Recorder(10.0, refine_null=True)
    chain = ChainedHooks(first, None, second)
    z = torch.zeros(3, 2)
    out = chain(z, torch.zeros(3, dtype=torch.long), torch.arange(3), 0)
    assert torch.equal(out, torch.full((3, 2), 11.0))
    assert torch.equal(second.seen[0], torch.ones(3, 2))  # the second hook sees the first one's output
    assert chain.refine_null and torch.equal(chain.null(torch.ones(2, 2), torch.arange(2), 0), torch.full((2, 2), 2.0))
    assert not ChainedHooks(first).refine_null
    with pytest.raises(ValueError, match="at least one hook"):
        ChainedHooks(None)


def test_the_trace_carries_each_steps_refinement_time() -> None:
    """Both samplers record the seconds spent in the refiner per AR step (0 at every step without one)."""
    import time

    from lightning_ar import CausalARGenerator, GenerationTrace, MARGenerator

    class Slow:
        refine_null = False

        def __call__(self, z, labels, positions, step):
            time.sleep(0.01)
            return z

    small = dict(width=32, encoder_depth=1, decoder_depth=1, num_heads=2, head_width=32, head_depth=1,
                 num_sampling_steps=2, patch_size=1)
    for model in (MARGenerator((2, 2, 2), 2, num_iter=2, **small), CausalARGenerator((2, 2, 2), 2, **small)):
        timed, plain = GenerationTrace(), GenerationTrace()
        model.generate(torch.arange(2), trace=timed, refiner=Slow(), progress=False)
        model.generate(torch.arange(2), trace=plain, progress=False)
        assert all(rec.refine_seconds >= 0.01 for rec in timed.steps), type(model).__name__
        assert timed.refine_seconds >= 0.01 * len(timed.steps)
        assert plain.refine_seconds == 0.0
