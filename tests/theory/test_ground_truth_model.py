"""The ground-truth instruments on a tiny trained gmm MAR: GEN / TF / oracle arms, Theorem 2 norms, the controls."""

from __future__ import annotations

import pytest
import torch

from lightning_ar import GMMSource, LatentDataModule, MARGenerator
from lightning_ar.nn.controls import ConditionStats, ContextShuffle, Dispersion, MeanBias
from lightning_ar.theory.bootstrap import Replicates, estimate, verdict
from lightning_ar.theory.oracle import OracleSettings
from lightning_ar.theory.truth_run import TruthSettings, evaluate_controls, evaluate_generator, generate_trace
from lightning_ar.theory.truth_stats import arm_metric, stack, step_metric

NUM_ITER = 4


@pytest.fixture(scope="module")
def tiny() -> tuple[MARGenerator, GMMSource]:
    """A tiny MAR trained for a few hundred steps on a 9-token, 2-class gmm (about 20 s on two cores)."""
    source = GMMSource(num_classes=2, grid=3, token_dim=2, sizes=(4000, 50, 50))
    dm = LatentDataModule(source, batch_size=64)
    torch.manual_seed(0)
    model = MARGenerator(dm.latent_shape, 2, dm.latent_scale, patch_size=1, width=32, encoder_depth=1, decoder_depth=1,
                         num_heads=2, head_width=32, head_depth=1, dropout=0.0, num_iter=NUM_ITER,
                         num_sampling_steps=20, mask_ratio_min=0.3)
    latents, labels = source.split("train")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(400):
        idx = torch.randint(0, len(labels), (64,), generator=gen)
        loss = model.diffusion_loss(latents[idx] * dm.latent_scale, labels[idx], gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), source


def _ci(arms: dict, a: str, b: str, metric: str, steps: list[int], seed: int = 0) -> dict:
    sa, sb = stack([arms[a]]), stack([arms[b]])
    n = sa[0].excess_joint.shape[1]
    reps = Replicates.draw(1, n, 400, seed)
    return estimate(lambda r: arm_metric(sa, metric, r, steps) - arm_metric(sb, metric, r, steps), 1, n, reps)


def test_arms_of_a_trained_model(tiny) -> None:
    model, source = tiny
    settings = TruthSettings(num_samples=256, oracle_samples=32, oracle=OracleSettings(iters=40, draws=4))
    arms, extras = evaluate_generator(model, source, settings)
    assert set(arms) == {"gen", "tf", "exact_gen", "exact_tf", "oracle"}
    assert all(len(a) == NUM_ITER for a in arms.values())
    late = [2, 3]
    # negative control: exact draws at the generated context sit at the KL floor, far below the model's KL
    exact, gen = stack([arms["exact_gen"]]), stack([arms["gen"]])
    ident = Replicates.identity(1, 256)
    for k in late:
        assert float(step_metric(exact[k], "kl", ident)) < 0.05 < float(step_metric(gen[k], "kl", ident))
        assert abs(float(step_metric(exact[k], "excess_token", ident))) < 0.1
    # the tiny model's error is real and resolved against its floor
    assert verdict(_ci(arms, "gen", "exact_gen", "kl", late), "> 0") == "holds"
    # the oracle never does worse on the head's own loss than the model's conditions
    info = extras["oracle_info"]
    assert all(step["loss_oracle"] <= step["loss_model"] + 0.01 for step in info[:-1])
    scores = extras["scores"]
    assert len(scores["true_score"]) == NUM_ITER and len(scores["true_score"][0]) == 3
    # exact Gaussian: the true guidance norm shrinks as the context reveals the class; the true score norm at small t
    # grows as the context shrinks the conditional variance
    assert scores["true_guidance"][-1][0] < scores["true_guidance"][0][0]
    assert scores["true_score"][-1][0] > scores["true_score"][0][0]


@pytest.mark.parametrize("control", ["bias", "over", "under", "shuffle"])
def test_each_injected_control_is_detected(tiny, control: str) -> None:
    model, source = tiny
    arms, info = _controls(tiny)
    late = [2, 3]
    for k in range(2):  # identical up to the first injected step (same seed)
        torch.testing.assert_close(arms[control][k].excess_joint, arms["clean"][k].excess_joint)
    # detected: the paired 95% interval of the change in the whitened-residual KL at the injected steps excludes 0.
    # (On this barely trained model an injection may move the KL either way: a shift can partly cancel the model's
    # own error. The study pre-registers "> 0" on a converged model.)
    ci = _ci(arms, control, "clean", "kl", late)
    assert verdict(ci, "> 0") != "not resolved", (control, ci)
    assert info["shuffle_swapped_fraction"] > 0.9


_CONTROLS: dict = {}


def _controls(tiny):
    if "arms" not in _CONTROLS:
        model, source = tiny
        _CONTROLS["arms"], _CONTROLS["info"] = evaluate_controls(model, source, TruthSettings(num_samples=256), 2)
    return _CONTROLS["arms"], _CONTROLS["info"]


def test_controls_act_as_specified(tiny) -> None:
    model, source = tiny
    calib = generate_trace(model, torch.arange(128) % 2, 1.0, torch.Generator().manual_seed(3))
    stats = ConditionStats.from_traces([calib], 2, 9)
    z, labels, positions = calib.conditions_at(3)
    assert float(stats.spread[3]) > 0
    before = MeanBias(stats, 3)(z, labels, positions, 2)
    assert torch.equal(before, z)  # steps before start_step are untouched
    shift = MeanBias(stats, 3, scale=0.5)(z, labels, positions, 3) - z
    torch.testing.assert_close(shift.norm(dim=1), torch.full((len(z),), 0.5 * float(stats.spread[3])))
    mu = stats.group_means(labels, positions, 3)
    over = Dispersion(stats, 0, 1.5)(z, labels, positions, 3)
    torch.testing.assert_close(over - mu, 1.5 * (z - mu))
    shuffled = ContextShuffle(0, 9, seed=1)(z, labels, positions, 3)
    key = labels * 9 + positions
    for g in key.unique():  # a permutation inside each (class, position) group, no condition left in place
        rows = key == g
        assert sorted(map(tuple, shuffled[rows].tolist())) == sorted(map(tuple, z[rows].tolist()))
        if int(rows.sum()) > 1:
            assert not (shuffled[rows] == z[rows]).all(dim=1).any()
