"""Every shipped YAML parses and instantiates (model, data, trainer) through the CLI without running."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_ar import LatentDataModule, MARGenerator
from lightning_ar.cli import build_cli

REPO = Path(__file__).resolve().parents[1]
OVERLAYS = {"debug.yaml"}
CONFIGS = sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.name not in OVERLAYS)


def test_configs_found() -> None:
    assert {"digits/mar.yaml", "gmm/mar.yaml"} <= {str(p.relative_to(REPO / "configs")) for p in CONFIGS}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
@pytest.mark.parametrize("overlay", [None, "debug.yaml"])
def test_config_instantiates(config: Path, overlay: str | None, tmp_path: Path) -> None:
    args = ["--config", str(config)]
    if overlay:
        args += ["--config", str(REPO / "configs" / overlay)]
    cli = build_cli(args + ["--trainer.default_root_dir", str(tmp_path)], run=False)
    assert isinstance(cli.datamodule, LatentDataModule)
    assert isinstance(cli.model, MARGenerator)
    # linked from the data, never typed twice
    assert cli.model.latent_shape == cli.datamodule.latent_shape
    assert cli.model.hparams.num_classes == cli.datamodule.num_classes
    assert cli.model.hparams.latent_scale == pytest.approx(cli.datamodule.latent_scale)
