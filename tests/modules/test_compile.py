"""``compile: true``: the loss after its random draws goes through ``torch.compile`` with static shapes, MAR's masked
count takes at most ``mask_buckets`` values (no recompiles across batches beyond them), and the compiled loss is the
eager one."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from lightning_ar import CausalARGenerator, ConditionalDiffusion, MARGenerator
from lightning_ar.cli import main
from lightning_ar.nn.masking import bucket_masked_count

TINY = dict(latent_shape=(1, 8, 8), num_classes=10, width=32, encoder_depth=1, decoder_depth=1, head_width=32,
            head_depth=1, num_heads=2, dropout=0.0)
EAGER_BACKEND = {"backend": "eager", "fullgraph": True}  # dynamo's capture without code generation: fast in tests


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.arange(6)


def _train_counts(model: MARGenerator, steps: int) -> set[int]:
    """Run ``steps`` forward/backward passes with different seeds; the masked counts they used."""
    seen: set[int] = set()
    count = model.training_masked_count
    model.training_masked_count = lambda ratio: (seen.add(count(ratio)), count(ratio))[1]
    latents, labels = _batch()
    for step in range(steps):
        model.diffusion_loss(latents, labels, generator=torch.Generator().manual_seed(step)).backward()
    return seen


def _loss_and_grads(cls: type, **options) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Loss and parameter gradients of one step of a freshly seeded tiny ``cls(**options)`` on the fixed batch."""
    torch.manual_seed(0)
    model = cls(**TINY, **options)
    latents, labels = _batch()
    loss = model.diffusion_loss(latents, labels, generator=torch.Generator().manual_seed(3))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_bucketed_counts_are_evenly_spaced_and_nearest() -> None:
    levels = sorted({bucket_masked_count(n, 16, 1, 8) for n in range(1, 17)})
    assert levels == [1, 3, 5, 7, 10, 12, 14, 16]
    assert bucket_masked_count(8, 16, 1, 8) == 7 and bucket_masked_count(9, 16, 1, 8) == 10
    assert [bucket_masked_count(n, 16, 12, 8) for n in range(12, 17)] == list(range(12, 17))  # 5 counts < 8 buckets
    assert bucket_masked_count(13, 16, 12, None) == 13 and bucket_masked_count(3, 16, 1, 1) == 16


def test_compiled_mar_does_not_recompile_across_batches(fresh_dynamo) -> None:
    """Mask ratios spread over [0, 1]: 16 possible counts, bucketed to 8; one graph per count used, none more."""
    model = MARGenerator(**TINY, mask_ratio_min=0.0, mask_ratio_std=10.0, compile=True, compile_options=EAGER_BACKEND)
    seen = _train_counts(model, 40)
    assert 5 <= len(seen) <= MARGenerator.COMPILE_BUCKETS
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == len(seen)
    again = _train_counts(model, 10)
    assert again <= seen and counters["stats"]["unique_graphs"] == graphs


def test_recompile_count_sees_every_new_shape(fresh_dynamo) -> None:
    """Positive control of the counter: with every count allowed, each new count compiles a graph of its own."""
    model = MARGenerator(**TINY, mask_ratio_min=0.0, mask_ratio_std=10.0, mask_buckets=16, compile=True,
                         compile_options=EAGER_BACKEND)
    with torch._dynamo.config.patch(recompile_limit=64):
        seen = _train_counts(model, 40)
    assert len(seen) > MARGenerator.COMPILE_BUCKETS
    assert counters["stats"]["unique_graphs"] == len(seen)


@pytest.mark.parametrize("cls", [MARGenerator, CausalARGenerator, ConditionalDiffusion])
def test_compiled_loss_and_gradients_equal_eager(cls, fresh_dynamo) -> None:
    options = {"mask_buckets": 8} if cls is MARGenerator else {}
    loss_e, grads_e = _loss_and_grads(cls, compile=False, **options)
    loss_c, grads_c = _loss_and_grads(cls, compile=True, compile_options=EAGER_BACKEND, **options)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-7)
    assert len(grads_c) == len(grads_e)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_inductor_loss_and_gradients_equal_eager(fresh_dynamo) -> None:
    """The default backend (inductor code generation, ~1 min on 2 cores): one bucket, one graph; loss within 1e-5
    relative and gradients within 1e-4 relative (fused kernels reorder float sums)."""
    loss_e, grads_e = _loss_and_grads(MARGenerator, mask_buckets=1, compile=False)
    loss_c, grads_c = _loss_and_grads(MARGenerator, mask_buckets=1, compile=True)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-5)


def test_compiled_module_copies_and_pickles_without_its_graphs(fresh_dynamo) -> None:
    model = MARGenerator(**TINY, compile=True, compile_options=EAGER_BACKEND)
    latents, labels = _batch()
    model.diffusion_loss(latents, labels, generator=torch.Generator().manual_seed(0))
    assert "_compiled" in model.__dict__
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert "_compiled" not in clone.__dict__
        clone.diffusion_loss(latents, labels, generator=torch.Generator().manual_seed(0))  # compiles its own


@pytest.mark.parametrize(("options", "match"), [({"compile": "yes"}, "model.compile must be true or false"),
                                                ({"compile_options": ["eager"]}, "model.compile_options must be"),
                                                ({"mask_buckets": 0}, "model.mask_buckets must be >= 1")])
def test_bad_compile_options_are_named(options, match) -> None:
    with pytest.raises(ValueError, match=match):
        MARGenerator(**TINY, **options)


def test_shipped_digits_config_trains_compiled_through_the_cli(tmp_path, fresh_dynamo) -> None:
    """`lightning-ar fit` on configs/digits/mar.yaml (+ debug overlay, logger on) with `--model.compile true`: the
    flat options parse, Lightning trains through the compiled loss (one graph per masked count used: the digits
    ratio allows 5), and the checkpoint holds the plain state-dict keys and the options."""
    repo = Path(__file__).resolve().parents[2]
    main(["fit", "--config", str(repo / "configs/digits/mar.yaml"), "--config", str(repo / "configs/debug.yaml"),
          "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
          "--trainer.logger.init_args.name", "run", "--trainer.logger.init_args.version", "fit",
          "--trainer.enable_progress_bar", "false", "--model.compile", "true",
          "--model.compile_options", '{"backend": "eager", "fullgraph": true}'])
    assert 1 <= counters["stats"]["unique_graphs"] <= 5
    ckpt = torch.load(tmp_path / "run" / "fit" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3 and ckpt["hyper_parameters"]["compile"] is True
    assert not any("_orig_mod" in key for key in ckpt["state_dict"])


def _fit_shipped_digits(tmp_path: Path, *extra: str) -> dict:
    repo = Path(__file__).resolve().parents[2]
    main(["fit", "--config", str(repo / "configs/digits/mar.yaml"), "--config", str(repo / "configs/debug.yaml"),
          "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
          "--trainer.logger.init_args.name", "run", "--trainer.logger.init_args.version", "fit",
          "--trainer.enable_progress_bar", "false", "--model.compile", "true",
          "--model.compile_options", '{"backend": "eager", "fullgraph": true}', "--trainer.limit_train_batches",
          "1.0", *extra])
    return torch.load(tmp_path / "run" / "fit" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def test_compiled_shipped_config_keeps_one_graph_per_count_across_epochs(tmp_path, fresh_dynamo) -> None:
    """configs/digits/mar.yaml with `data.drop_last: true` over more than one epoch and its validation: every batch
    has one shape, so at most the 5 counts the digits ratio allows are compiled (validation runs eager; its shapes
    and no-grad mode would otherwise add graphs), and no warning about a partial batch."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = _fit_shipped_digits(tmp_path, "--trainer.max_epochs", "2", "--trainer.max_steps", "100",
                                   "--data.drop_last", "true")
    assert ckpt["global_step"] == 100 and ckpt["epoch"] >= 1
    assert 1 <= counters["stats"]["unique_graphs"] <= 5
    assert not [w for w in caught if "data.drop_last" in str(w.message)]


def test_compiled_run_warns_of_a_partial_last_batch(tmp_path, fresh_dynamo) -> None:
    """Negative control: the shipped digits split is not a multiple of the batch size."""
    with pytest.warns(UserWarning, match="data.drop_last: true"):
        _fit_shipped_digits(tmp_path)


def test_bad_drop_last_is_named_and_an_empty_epoch_refused() -> None:
    from lightning_ar import LatentDataModule

    with pytest.raises(ValueError, match="data.drop_last must be true or false"):
        LatentDataModule("digits", drop_last="yes")
    dm = LatentDataModule("digits", batch_size=100_000, drop_last=True)
    dm.setup("fit")
    with pytest.raises(ValueError, match="smaller than data.batch_size"):
        dm.train_dataloader()
