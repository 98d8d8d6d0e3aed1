"""Every shipped YAML parses and instantiates (model, data, trainer) through the CLI without running."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_ar import CausalARGenerator, ConditionalDiffusion, LatentDataModule, MARGenerator, OTRefinement
from lightning_ar.checkpoints.loading import record_class
from lightning_ar.cli import build_cli

REPO = Path(__file__).resolve().parents[2]
OVERLAYS = {"debug.yaml", "debug_refine.yaml"}
BASES = {"refine_ar.yaml": "refine.yaml"}  # overlays of another shipped config of the same folder
# ImageNet configs need a latent cache on disk; tests/test_import_mar.py parses them.
CONFIGS = sorted(
    p for p in (REPO / "configs").rglob("*.yaml") if p.name not in OVERLAYS and not p.parent.name.startswith("imagenet")
)


def test_configs_found() -> None:
    found = {str(p.relative_to(REPO / "configs")) for p in CONFIGS}
    assert {"digits/mar.yaml", "gmm/mar.yaml", "digits/refine.yaml", "gmm/refine.yaml"} <= found


def _generator_checkpoint(config: Path, debug: bool, tmp_path: Path) -> str:
    """An untrained generator of ``config`` (with the debug overlay) saved as a Lightning checkpoint would be."""
    overlay = ["--config", str(REPO / "configs" / "debug.yaml")] if debug else []
    cli = build_cli(["--config", str(config), *overlay, "--trainer.default_root_dir", str(tmp_path)], run=False)
    ckpt = {"state_dict": cli.model.state_dict(), "hyper_parameters": dict(cli.model.hparams),
            "pytorch-lightning_version": L.__version__}
    record_class(cli.model, ckpt)
    torch.save(ckpt, tmp_path / "gen.ckpt")
    return str(tmp_path / "gen.ckpt")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
@pytest.mark.parametrize("debug", [False, True])
def test_config_instantiates(config: Path, debug: bool, tmp_path: Path) -> None:
    refine = config.name.startswith("refine")
    args = ["--config", str(config)]
    if config.name in BASES:
        args = ["--config", str(config.parent / BASES[config.name]), *args]
    if debug:
        args += ["--config", str(REPO / "configs" / ("debug_refine.yaml" if refine else "debug.yaml"))]
    if refine:  # a generator of the folder's mar.yaml, as a user would refine (same data, same latent scale)
        args += ["--model.init_args.generator", _generator_checkpoint(config.parent / "mar.yaml", debug, tmp_path)]
    cli = build_cli(args + ["--trainer.default_root_dir", str(tmp_path)], run=False)
    assert isinstance(cli.datamodule, LatentDataModule)
    baseline = {"cdm.yaml": ConditionalDiffusion, "ar.yaml": CausalARGenerator}.get(config.name, MARGenerator)
    assert isinstance(cli.model, OTRefinement if refine else baseline)
    generator = cli.model.mar_generator if refine else cli.model
    # linked from the data, never typed twice
    assert generator.latent_shape == cli.datamodule.latent_shape
    assert generator.hparams.num_classes == cli.datamodule.num_classes
    assert generator.hparams.latent_scale == pytest.approx(cli.datamodule.latent_scale)


@pytest.mark.parametrize("folder", ["digits", "gmm"])
def test_refine_configs_read_the_data_of_the_generator_they_refine(folder: str) -> None:
    """A refinement fills its banks from the generator's training split and must see its latent scale: the shipped
    ``refine.yaml`` uses the data source of the folder's ``mar.yaml`` (before: gmm/refine.yaml read the default
    4,000-sample source, so refining a gmm/mar.yaml checkpoint failed on the latent scale)."""
    import yaml

    read = lambda name: yaml.safe_load((REPO / "configs" / folder / f"{name}.yaml").read_text())  # noqa: E731
    refine, mar = read("refine"), read("mar")
    assert refine["data"]["source"] == mar["data"]["source"]
