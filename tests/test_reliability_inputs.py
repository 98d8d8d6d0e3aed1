"""Reliability, corrupted inputs and config errors: messages name the file or the option and what was expected.

Cache corruption (truncated/missing shard, meta mismatch, NaN in a cache, empty class folder, unreadable image) is
covered in tests/test_cache.py; a bank from another generator in tests/test_refinement.py
(test_bank_from_another_generator_is_refused).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from lightning_ar import MARGenerator
from lightning_ar.cli import build_cli, main
from lightning_ar.modules.refinement import OTRefinement

REPO = Path(__file__).resolve().parents[1]
DIGITS, DEBUG = str(REPO / "configs/digits/mar.yaml"), str(REPO / "configs/debug.yaml")
TINY = dict(latent_shape=(1, 4, 4), num_classes=3, encoder_depth=1, decoder_depth=1, num_heads=2, head_width=16,
            head_depth=1, num_iter=2, num_sampling_steps=2)


def _save(path: Path, model: MARGenerator) -> Path:
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": L.__version__}, path)
    return path


def test_ckpt_path_of_another_model_size_names_file_and_sizes(tmp_path: Path) -> None:
    other = _save(tmp_path / "wide.ckpt", MARGenerator(width=32, **TINY))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    data = DataLoader(TensorDataset(torch.randn(4, 1, 4, 4), torch.zeros(4, dtype=torch.long)), batch_size=2)
    with pytest.raises(ValueError, match=r"wide\.ckpt was saved by a different model: .*width=32 \(here 16\)"):
        trainer.validate(MARGenerator(width=16, **TINY), data, ckpt_path=str(other))


def test_refinement_generator_that_is_not_a_checkpoint_is_named(tmp_path: Path) -> None:
    good = _save(tmp_path / "gen.ckpt", MARGenerator(width=16, **TINY))
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"model\.generator: .*truncated\.ckpt is not a readable generator"):
        OTRefinement(generator=str(truncated))


def _instantiate(*args: str) -> None:
    build_cli(["--config", DIGITS, "--config", DEBUG, *args], run=False)


@pytest.mark.parametrize(("args", "message"), [
    (("--model.init_args.buffer_size", "0"), "model.buffer_size must be >= 1"),
    (("--model.init_args.patch_size", "3"), "model.patch_size=3 must divide the latent height and width"),
    (("--model.init_args.width", "30", "--model.init_args.num_heads", "4"),
     r"model.width \(30\) must be divisible by model.num_heads \(4\)"),
    (("--model.init_args.dropout", "1.5"), r"model.dropout must be in \[0, 1\)"),
    (("--data.batch_size", "0"), "data.batch_size must be >= 1"),
])
def test_inconsistent_values_name_the_option(args: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _instantiate(*args)


@pytest.mark.parametrize(("args", "named"), [
    (("--model.init_args.width", "wide"), "width"),
    (("--trainer.max_steps", "1.5"), "max_steps"),
])
def test_wrong_types_name_the_option(args: tuple[str, ...], named: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _instantiate(*args)
    assert exit_info.value.code != 0
    assert named in capsys.readouterr().err


def test_unknown_key_in_yaml_is_named(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"init_args": {"num_haeds": 2}}}))
    with pytest.raises(SystemExit):
        main(["fit", "--config", DIGITS, "--config", str(bad)])
    assert "num_haeds" in capsys.readouterr().err
