"""MARGenerator: seeded sampling, checkpoint reload, optimisation groups, bad input, use with a plain Trainer."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers.tiny import TINY
from lightning.pytorch.callbacks import EMAWeightAveraging

from lightning_ar import GenerationMetrics, GenerationTrace, LatentDataModule, MARGenerator
from lightning_ar.modules.optim import adamw_param_groups


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_seeded_generate_reproduces_exactly(tiny_generator: MARGenerator) -> None:
    labels = torch.tensor([0, 3, 9, 9])
    a = tiny_generator.generate(labels, cfg=2.0, generator=_gen(5))
    b = tiny_generator.generate(labels, cfg=2.0, generator=_gen(5))
    c = tiny_generator.generate(labels, cfg=2.0, generator=_gen(6))
    assert a.shape == (4, 1, 8, 8)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++"])
def test_generate_with_each_sampler(tiny_generator: MARGenerator, sampler: str) -> None:
    out = tiny_generator.generate(torch.tensor([1, 2]), sampler=sampler, num_sampling_steps=4, generator=_gen(0))
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


def test_generate_restores_training_mode(tiny_generator: MARGenerator) -> None:
    tiny_generator.train()
    tiny_generator.head.eval()  # a submodule in its own mode must keep it
    tiny_generator.generate(torch.tensor([0]), generator=_gen(0))
    assert tiny_generator.training and tiny_generator.mar.training and not tiny_generator.head.training


def test_generate_divides_by_latent_scale(tiny_generator: MARGenerator) -> None:
    other = MARGenerator(latent_shape=(1, 8, 8), num_classes=10, latent_scale=2.6, **TINY)
    other.load_state_dict(tiny_generator.state_dict())
    a = tiny_generator.generate(torch.tensor([4]), generator=_gen(1))
    b = other.generate(torch.tensor([4]), generator=_gen(1))
    assert torch.allclose(a, 2 * b)


def test_trace_records_every_step(tiny_generator: MARGenerator) -> None:
    trace = GenerationTrace()
    tiny_generator.generate(torch.tensor([1, 2]), num_iter=4, cfg=1.0, trace=trace, generator=_gen(0))
    assert len(trace.steps) == 4 and all(s.null_conditions is None for s in trace.steps)
    assert sum(s.positions.shape[1] for s in trace.steps) == 16


def test_refiner_hook_moves_conditions(tiny_generator: MARGenerator) -> None:
    seen = []

    def refiner(z, labels, positions, step):
        seen.append((z.shape, labels.shape, positions.shape, step))
        return z + 1.0

    trace = GenerationTrace()
    tiny_generator.generate(torch.tensor([1, 2]), num_iter=2, refiner=refiner, trace=trace, generator=_gen(0))
    assert [s[3] for s in seen] == [0, 1]
    assert torch.allclose(trace.steps[0].conditions, trace.steps[0].raw_conditions + 1.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_iter": 0}, "num_iter must be an integer >= 1"),
        ({"num_iter": 17}, "num_iter must be an integer in \\[1, 16\\]"),
        ({"sampler": "euler"}, "sampler must be one of"),
        ({"temperature": 0.0}, "temperature must be a finite number > 0"),
        ({"cfg_schedule": "cosine"}, "cfg_schedule"),
        ({"num_sampling_steps": 5000}, "num_sampling_steps must be in"),
    ],
)
def test_generate_rejects_bad_options(tiny_generator: MARGenerator, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny_generator.generate(torch.tensor([0]), **kwargs)


@pytest.mark.parametrize("labels", [[10], [-1], [0, 12]])
def test_generate_rejects_labels_out_of_range(tiny_generator: MARGenerator, labels: list[int]) -> None:
    with pytest.raises(ValueError, match="labels must be in \\[0, 9\\]"):
        tiny_generator.generate(torch.tensor(labels))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"patch_size": 3}, "model.patch_size=3 must divide"),
        ({"latent_shape": (8, 8)}, "model.latent_shape must be"),
        ({"num_iter": 20}, "model.num_iter must be an integer in \\[1, 16\\]"),
        ({"sampler": "heun"}, "model.sampler must be one of"),
        ({"width": 30, "num_heads": 4}, "model.width"),
        ({"buffer_size": 0}, "buffer_size must be >= 1"),
    ],
)
def test_constructor_rejects_bad_options(kwargs: dict, match: str) -> None:
    base = {**TINY, "latent_shape": (1, 8, 8), "num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        MARGenerator(**base)


def test_training_rejects_wrong_latent_shape(tiny_generator: MARGenerator) -> None:
    with pytest.raises(ValueError, match="model.latent_shape is \\(1, 8, 8\\)"):
        tiny_generator.diffusion_loss(torch.randn(2, 4, 4, 4), torch.tensor([0, 1]))


def test_param_groups_exempt_head_biases_and_norms(tiny_generator: MARGenerator) -> None:
    decay, no_decay = adamw_param_groups(tiny_generator, no_decay_modules=(tiny_generator.head,))
    decay_ids = {id(p) for p in decay["params"]}
    names = {id(p): n for n, p in tiny_generator.named_parameters()}
    assert all(not names[i].startswith("head.") for i in decay_ids)
    # as in MAR: matrices, embeddings, the mask token and the null class are decayed
    assert all(names[i].endswith(("weight", "pos_embed", "mask_token", "null_class_emb")) for i in decay_ids)
    assert id(tiny_generator.mar.encoder_blocks[0].attn.qkv.weight) in decay_ids
    assert id(tiny_generator.mar.encoder_blocks[0].norm1.weight) not in decay_ids
    assert no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(tiny_generator.parameters()))


def _fit(tmp_path, max_steps: int = 4, callbacks=()) -> tuple[L.Trainer, MARGenerator, LatentDataModule]:
    """Fit a tiny generator with a plain Trainer (no CLI), as a user's own project would."""
    L.seed_everything(0, verbose=False)
    dm = LatentDataModule("digits", batch_size=16)
    model = MARGenerator(dm.latent_shape, dm.num_classes, dm.latent_scale, **TINY)
    trainer = L.Trainer(
        max_steps=max_steps, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=1, num_sanity_val_steps=0, callbacks=list(callbacks),
    )
    trainer.fit(model, dm)
    return trainer, model, dm


def test_checkpoint_reload_gives_identical_samples(tmp_path) -> None:
    trainer, model, _ = _fit(tmp_path, callbacks=[EMAWeightAveraging(decay=0.5)])
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    loaded = MARGenerator.load_from_checkpoint(path)
    labels = torch.tensor([0, 5, 7])
    assert torch.equal(model.generate(labels, generator=_gen(3)), loaded.generate(labels, generator=_gen(3)))
    assert loaded.hparams.latent_scale == model.hparams.latent_scale


def test_ema_weights_are_used_after_fit(tmp_path) -> None:
    ema = EMAWeightAveraging(decay=0.5)
    _, model, _ = _fit(tmp_path, callbacks=[ema])
    averaged = dict(ema._average_model.module.named_parameters())
    for name, param in model.named_parameters():
        assert torch.equal(param, averaged[name]), name


def test_plain_trainer_project_fit_and_test(tmp_path) -> None:
    """`from lightning_ar import MARGenerator, LatentDataModule` in another project, with its own Trainer."""
    metrics = GenerationMetrics(results_dir=str(tmp_path / "results"), save_samples=True)
    trainer, model, dm = _fit(tmp_path, callbacks=[metrics])
    out = trainer.test(model, dm, verbose=False)[0]
    keys = {"test/loss", "test/fid", "test/kid", "test/cond_acc", "test/fid_floor", "test/kid_floor",
            "test/sec_per_image"}
    assert keys <= set(out)
    assert 0.0 <= out["test/cond_acc"] <= 1.0 and out["test/fid"] > out["test/fid_floor"]
    assert out["test/kid"] > out["test/kid_floor"]
    assert (tmp_path / "results" / "results.md").read_text().count("| default |") == 1
    saved = torch.load(tmp_path / "results" / "samples.pt")["default"]  # exactly the scored samples, in order
    _, test_labels = dm.source.split("test")
    assert saved["latents"].shape == (len(test_labels), 1, 8, 8) and torch.equal(saved["labels"], test_labels)
    metrics._evaluators["default"].reset()
    metrics._evaluators["default"].update(saved["latents"], saved["labels"])
    assert metrics._evaluators["default"].compute()["fid"] == pytest.approx(out["test/fid"], rel=1e-5)


def test_diffusion_loss_decreases_when_overfitting_a_batch() -> None:
    torch.manual_seed(0)
    dm = LatentDataModule("digits", batch_size=32)
    x, y = next(iter(dm.train_dataloader()))
    model = MARGenerator(dm.latent_shape, dm.num_classes, dm.latent_scale, **{**TINY, "width": 64, "head_width": 64})
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)

    def fixed_loss() -> float:
        return model.diffusion_loss(x, y, _gen(99)).item()

    before = fixed_loss()
    for step in range(60):
        loss = model.diffusion_loss(x, y, _gen(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fixed_loss() < 0.7 * before
