"""Every shipped YAML parses and instantiates (model, data, trainer) through the CLI without running."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.tiny import save_generator_checkpoint

from lightning_ar import CausalARGenerator, ConditionalDiffusion, LatentDataModule, MARGenerator, OTRefinement
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


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
@pytest.mark.parametrize("debug", [False, True])
def test_config_instantiates(config: Path, debug: bool, tmp_path: Path) -> None:
    refine = config.name.startswith("refine")
    args = ["--config", str(config)]
    if config.name in BASES:
        args = ["--config", str(config.parent / BASES[config.name]), *args]
    if debug:
        args += ["--config", str(REPO / "configs" / ("debug_refine.yaml" if refine else "debug.yaml"))]
    if refine:
        ckpt = save_generator_checkpoint(tmp_path / "gen.ckpt", config.parent.name)
        args += ["--model.init_args.generator", ckpt]
    cli = build_cli(args + ["--trainer.default_root_dir", str(tmp_path)], run=False)
    assert isinstance(cli.datamodule, LatentDataModule)
    baseline = {"cdm.yaml": ConditionalDiffusion, "ar.yaml": CausalARGenerator}.get(config.name, MARGenerator)
    assert isinstance(cli.model, OTRefinement if refine else baseline)
    generator = cli.model.mar_generator if refine else cli.model
    # linked from the data, never typed twice
    assert generator.latent_shape == cli.datamodule.latent_shape
    assert generator.hparams.num_classes == cli.datamodule.num_classes
    assert generator.hparams.latent_scale == pytest.approx(cli.datamodule.latent_scale)
