"""Reliability, ``--ckpt_path`` precedence: architecture from the checkpoint, everything else from the command line,
then the config, then the checkpoint; checkpoints of another class or architecture are refused by name.

Lightning 2.6's ``LightningCLI`` re-parses a checkpoint's hyper-parameters *over* the parsed configuration; each test
here failed before ``LightningARCLI`` replaced that step. The README's ImageNet FID recipe runs end to end on a tiny
imported MAR.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI
from PIL import Image

from lightning_ar.checkpoints import MARSize, import_mar_checkpoint
from lightning_ar.cli import main

REPO = Path(__file__).resolve().parents[2]
DIGITS, DEBUG = str(REPO / "configs/digits/mar.yaml"), str(REPO / "configs/debug.yaml")
REFINE, MAR_BASE = str(REPO / "configs/digits/refine.yaml"), str(REPO / "configs/imagenet256/mar_base.yaml")


def _run(stage: str, root: Path, *extra: str, version: str | None = None) -> Path:
    """``lightning-ar <stage>`` on the digits config with the debug overlay; returns the run's log directory."""
    version = version or stage
    main([stage, "--config", DIGITS, "--config", DEBUG, "--trainer.default_root_dir", str(root),
          "--trainer.logger.init_args.save_dir", str(root), "--trainer.logger.init_args.version", version,
          "--trainer.enable_progress_bar", "false", *extra])
    return root / "mar" / version


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A debug-sized digits checkpoint (num_iter 2, cfg 3.0, 5 head steps: the debug overlay's)."""
    root = tmp_path_factory.mktemp("precedence")
    return _run("fit", root) / "checkpoints" / "last.ckpt"


def _hparams(run: Path) -> dict:
    return yaml.safe_load((run / "hparams.yaml").read_text())


def test_lightning_still_has_the_step_we_replace() -> None:
    assert callable(LightningCLI._parse_ckpt_path)  # if Lightning renames it, our precedence rule is bypassed


@pytest.mark.parametrize("stage", ["test", "predict"])
def test_command_line_sampling_options_beat_the_checkpoint(trained: Path, stage: str, tmp_path: Path) -> None:
    run = _run(stage, tmp_path, "--ckpt_path", str(trained), "--model.init_args.num_iter", "4",
               "--model.init_args.cfg", "1.7")
    hp = _hparams(run)
    assert (hp["num_iter"], hp["cfg"]) == (4, 1.7)  # the command line
    assert hp["num_sampling_steps"] == 5 and hp["width"] == 32  # config (= checkpoint) values


def test_unset_options_come_from_the_checkpoint(trained: Path, tmp_path: Path) -> None:
    """Options neither the config nor the command line gives take the checkpoint's value."""
    state = torch.load(trained, weights_only=True)
    state["hyper_parameters"]["temperature"] = 0.7  # mar.yaml sets temperature: 1.0
    state["hyper_parameters"]["timestep_spacing"] = "trailing"  # set by no config file
    edited = tmp_path / "edited.ckpt"
    torch.save(state, edited)
    hp = _hparams(_run("test", tmp_path, "--ckpt_path", str(edited)))
    assert hp["timestep_spacing"] == "trailing"  # from the checkpoint
    assert hp["temperature"] == 1.0  # mar.yaml sets it: the config wins over the checkpoint


def test_architecture_that_disagrees_is_an_error_naming_option_and_values(trained: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--config", DIGITS, "--ckpt_path", str(trained)])  # mar.yaml: width 128, trained: 32
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "model.init_args.width: config 128 vs checkpoint 32" in err and "encoder_depth" in err
    assert "Traceback" not in err


def test_checkpoint_of_another_class_is_refused(trained: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["test", "--config", REFINE, "--model.init_args.generator", str(trained), "--ckpt_path", str(trained)])
    err = capsys.readouterr().err
    assert "holds a lightning_ar.MARGenerator but the configured model is lightning_ar.OTRefinement" in err


def test_refinement_checkpoint_given_to_the_generator_config_is_refused(trained: Path, tmp_path: Path,
                                                                        capsys) -> None:
    refine = tmp_path / "refine"
    main(["fit", "--config", REFINE, "--config", str(REPO / "configs/debug_refine.yaml"),
          "--model.init_args.generator", str(trained), "--trainer.default_root_dir", str(refine),
          "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
          "--trainer.callbacks", "lightning.pytorch.callbacks.ModelCheckpoint",
          "--trainer.callbacks.dirpath", str(refine / "ckpt"), "--trainer.callbacks.save_last", "true"])
    with pytest.raises(SystemExit):
        _run("validate", tmp_path, "--ckpt_path", str(refine / "ckpt" / "last.ckpt"))
    assert "holds a lightning_ar.OTRefinement but the configured model is lightning_ar.MARGenerator" in (
        capsys.readouterr().err)


def test_latent_scale_of_other_data_is_refused(trained: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _run("test", tmp_path, "--ckpt_path", str(trained), "--data.latent_scale", "0.5")
    assert exit_info.value.code == 2
    assert "pin it with --data.latent_scale" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- README FID recipe, tiny
TINY = MARSize(width=32, depth=1, num_heads=4, head_width=24, head_depth=1, cfg=2.0)


def _tiny_official(classes: int, seq_len: int = 64, buffer: int = 4) -> dict[str, torch.Tensor]:
    """A random MAR state dict (official names) for 8x8x16 latents, patch 1: 64 tokens of dim 16."""
    from helpers.official_mar import official_layout

    g = torch.Generator().manual_seed(0)
    layout = official_layout(TINY.width, TINY.depth, TINY.head_width, TINY.head_depth, 16, seq_len, buffer, classes)
    return {name: (1.0 if name.endswith("norm1.weight") else 0.0) + 0.1 * torch.randn(shape, generator=g)
            for name, shape in layout.items()}


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory) -> Path:
    """A tiny 16-channel diffusers VAE, an ImageFolder of 6 images, their cache, and a tiny imported MAR."""
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("fid_recipe")
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=16, norm_num_groups=4,
                  layers_per_block=1, sample_size=16).save_pretrained(root / "vae")
    rng = np.random.default_rng(0)
    for name in ("ant", "bee", "cat"):
        (root / "images" / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "images" / name / f"{i}.png")
    main(["cache", "--image_root", str(root / "images"), "--out_dir", str(root / "cache"), "--vae", str(root / "vae"),
          "--image_size", "16", "--batch_size", "6", "--num_workers", "0", "--devices", "1", "--strategy", "auto",
          "--accelerator", "cpu"])
    torch.save({"model_ema": _tiny_official(3)}, root / "checkpoint-last.pth")
    import_mar_checkpoint(root / "checkpoint-last.pth", TINY, root / "mar_tiny.ckpt")
    overlay = {  # what a laptop changes in mar_base.yaml: the tiny architecture (it must match the checkpoint) and CPU
        "trainer": {"accelerator": "cpu", "devices": 1, "strategy": "auto", "precision": "32-true",
                    "enable_progress_bar": False, "default_root_dir": str(root / "runs"),
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(root / "runs"), "name": "mar_tiny"}}},
        "model": {"init_args": {"width": 32, "encoder_depth": 1, "decoder_depth": 1, "num_heads": 4,
                                "buffer_size": 4, "head_width": 24, "head_depth": 1,
                                "num_sampling_steps": 3}},
        "data": {"batch_size": 3, "num_workers": 0},
    }
    (root / "tiny.yaml").write_text(yaml.safe_dump(overlay))
    return root


def _recipe(root: Path, *extra: str) -> None:
    """README "ImageNet scale" step 5, on the tiny stand-ins."""
    main(["predict", "--config", MAR_BASE, "--config", str(root / "tiny.yaml"), "--data.cache_dir",
          str(root / "cache"), "--ckpt_path", str(root / "mar_tiny.ckpt"), "--data.predict_per_class", "1",
          "--trainer.callbacks+=lightning_ar.callbacks.AdmNpzWriter", *extra])


def test_readme_fid_recipe_on_a_tiny_imported_model(imagenet_like: Path) -> None:
    _recipe(imagenet_like, "--data.latent_scale", "0.2325", "--model.init_args.num_iter", "4")
    run = imagenet_like / "runs" / "mar_tiny" / "version_0"
    hp = _hparams(run)
    assert hp["num_iter"] == 4  # the command line, not the imported 64
    assert hp["cfg"] == 2.9  # mar_base.yaml, not the checkpoint's 2.0
    assert hp["timestep_spacing"] == "linspace"  # set by no config: the imported checkpoint's (MAR's respacing)
    with np.load(run / "predictions" / "samples.npz") as data:
        assert data["arr_0"].shape == (3, 16, 16, 3) and data["arr_1"].tolist() == [0, 1, 2]


def test_fid_recipe_without_the_pinned_scale_is_refused(imagenet_like: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _recipe(imagenet_like, "--model.init_args.num_iter", "4")
    assert exit_info.value.code == 2
    assert "--data.latent_scale 0.2325" in capsys.readouterr().err
