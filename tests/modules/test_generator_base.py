"""One base for the three generators: ``SamplingOptions`` validated once, flat options, the seed, the contracts."""

from __future__ import annotations

import dataclasses
from argparse import ArgumentError

import pytest
import torch
from jsonargparse import ArgumentParser

from lightning_ar import (
    CausalARGenerator,
    ConditionalDiffusion,
    Generator,
    HeadGenerator,
    MARGenerator,
    OTRefinement,
    Refinement,
    SamplingOptions,
    TokenGenerator,
)
from lightning_ar.checkpoints.precedence import init_options
from lightning_ar.nn.sampling_options import CFG_SCHEDULES, SAMPLERS

TINY = dict(latent_shape=(1, 8, 8), num_classes=10, width=32, encoder_depth=1, decoder_depth=1, num_heads=2,
            head_width=32, head_depth=1, num_sampling_steps=5)
GENERATORS = (MARGenerator, CausalARGenerator, ConditionalDiffusion)


def _cli_defaults(cls: type) -> dict:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "model", fail_untyped=False)
    return vars(parser.get_defaults().model)


@pytest.mark.parametrize("cls", GENERATORS)
def test_every_sampling_option_is_a_flat_cli_option_read_from_the_dataclass(cls: type) -> None:
    """The flat options (``--model.cfg``, ...) come from ``SamplingOptions`` itself (the generators' ``**sampling``
    goes into it), so adding a field adds the option: nothing else lists them."""
    defaults = _cli_defaults(cls)
    own = {CausalARGenerator: {"num_iter": None}, ConditionalDiffusion: {"num_iter": None, "cfg_schedule": "constant"}}
    for field in dataclasses.fields(SamplingOptions):
        assert defaults[field.name] == own.get(cls, {}).get(field.name, field.default), field.name
    assert SAMPLERS == ("ddpm", "ddim", "dpm++") and CFG_SCHEDULES == ("linear", "constant")
    assert set(SamplingOptions.names()) <= set(dict(cls(**TINY).hparams))  # every default is recorded


def test_the_cli_offers_the_literal_choices() -> None:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(MARGenerator, "model", fail_untyped=False)
    help_text = parser.format_help()
    assert "{ddpm,ddim,dpm++}" in help_text and "{linear,constant}" in help_text
    assert parser.parse_args(["--model.sampler", "ddim"]).model.sampler == "ddim"
    with pytest.raises(ArgumentError):
        parser.parse_args(["--model.sampler", "euler"])


@pytest.mark.parametrize("cls", GENERATORS)
def test_each_generator_exposes_the_shared_options(cls: type) -> None:
    shared = {"cfg", "temperature", "num_sampling_steps", "sampler", "seed", "width", "base_lr"}
    assert shared <= init_options(cls)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("num_iter", 0, "num_iter must be an integer >= 1"),
    ("cfg", float("nan"), "cfg must be a finite number"),
    ("cfg_schedule", "cosine", "cfg_schedule must be one of"),
    ("temperature", -1.0, "temperature must be a finite number > 0"),
    ("num_sampling_steps", 1.5, "num_sampling_steps must be an integer >= 1"),
    ("sampler", "euler", "sampler must be one of"),
])
def test_sampling_options_name_the_bad_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingOptions(**{field: value})
    with pytest.raises(ValueError, match=f"model.{message}"):  # the module's flat option, named as the CLI does
        MARGenerator(**{**TINY, field: value})


def test_overrides_are_checked_by_name() -> None:
    options = SamplingOptions(cfg=2.0)
    assert options.replace(cfg=None, temperature=0.5) == SamplingOptions(cfg=2.0, temperature=0.5)
    with pytest.raises(TypeError, match=r"unknown sampling option\(s\) \['cgf'\]"):
        options.replace(cgf=3.0)
    model = MARGenerator(**TINY)
    with pytest.raises(TypeError, match="unknown sampling option"):
        model.generate(torch.tensor([1]), cgf=3.0)
    with pytest.raises(TypeError, match=r"got unexpected option\(s\) \['cgf'\]"):
        MARGenerator(**TINY, cgf=3.0)


@pytest.mark.parametrize("cls", GENERATORS)
def test_the_configured_seed_drives_training(cls: type) -> None:
    """Before: the baselines had no ``seed`` and trained with seed 0 whatever the config said."""
    batch = (torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 3]))
    losses = {}
    for seed in (0, 0, 1):
        torch.manual_seed(0)
        model = cls(**TINY, seed=seed)
        losses.setdefault(seed, []).append(float(model.training_step(batch, 0)))
    assert losses[0][0] == losses[0][1] and losses[1][0] != losses[0][0]


def test_contracts_hold_for_the_parts_that_rely_on_them(tmp_path) -> None:
    mar, causal, cdm = (cls(**TINY) for cls in GENERATORS)
    assert all(isinstance(m, HeadGenerator) for m in (mar, causal, cdm))
    assert [isinstance(m, TokenGenerator) for m in (mar, causal, cdm)] == [True, True, False]
    refinement = OTRefinement(mar, bank_capacity=8, heldout_capacity=8, map_pool_size=8)
    assert isinstance(refinement, Refinement) and isinstance(refinement, Generator)
    assert not isinstance(mar, Refinement) and not isinstance(torch.nn.Linear(1, 1), Generator)


def test_options_of_one_call_do_not_change_the_defaults() -> None:
    model = MARGenerator(**TINY, num_iter=4)
    out = model.generate(torch.tensor([0, 1]), num_iter=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 1, 8, 8) and model.default_options.num_iter == 4
    same = model.generate(torch.tensor([0, 1]), SamplingOptions(num_iter=2, num_sampling_steps=5),
                          generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, same)
