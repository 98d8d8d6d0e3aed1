"""Reliability, corrupted inputs and config errors: messages name the file or the option and what was expected.

Cache corruption (truncated/missing shard, meta mismatch, NaN in a cache, empty class folder, unreadable image) is
covered in tests/data/test_cache.py; a bank from another generator in tests/modules/test_refinement.py
(test_bank_from_another_generator_is_refused).
"""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader, TensorDataset

from lightning_ar import LatentDataModule, MARGenerator
from lightning_ar.cli import build_cli, main
from lightning_ar.modules.refinement import OTRefinement

REPO = Path(__file__).resolve().parents[2]
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
    match = r"model\.generator: .*truncated\.ckpt \(1000 bytes\) is not a readable torch checkpoint: truncated"
    with pytest.raises(ValueError, match=match):
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


@pytest.mark.parametrize(("args", "message"), [
    (("--model.init_args.mask_buckets", "0"), "model.mask_buckets must be >= 1 or null, got 0"),
    (("--model.init_args.dropout", "1.5"), r"model.dropout must be in [0, 1), got 1.5"),
])
def test_the_command_prints_an_option_check_without_a_traceback(args: tuple[str, ...], message: str,
                                                                capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", DIGITS, "--config", DEBUG, *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"lightning-ar: error: {message}" in err and "Traceback" not in err and "Namespace(" not in err


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


# ------------------------------------------------------------------------------------- unsafe and broken files
class RunsCode:
    """Pickles to a call of ``os.system``: a file holding it must never be unpickled."""

    def __reduce__(self):
        import os

        return (os.system, ("echo this-ran > /dev/null",))


@pytest.fixture
def bad_files(tmp_path: Path) -> dict[str, Path]:
    good = _save(tmp_path / "gen.ckpt", MARGenerator(width=16, **TINY))
    files = {"truncated": tmp_path / "truncated.ckpt", "text": tmp_path / "text.ckpt",
             "unsafe": tmp_path / "unsafe.ckpt", "official": tmp_path / "checkpoint-last.pth"}
    files["truncated"].write_bytes(good.read_bytes()[:1000])
    files["text"].write_text("not a checkpoint")
    torch.save({"state_dict": {}, "hyper_parameters": {"x": RunsCode()}}, files["unsafe"])
    torch.save({"model": {"z_proj.weight": torch.zeros(2, 2)}}, files["official"])
    return files


@pytest.mark.parametrize(("name", "message"), [
    ("truncated", r"truncated\.ckpt \(1000 bytes\) is not a readable torch checkpoint: truncated"),
    ("text", r"text\.ckpt \(16 bytes\) is not a readable torch checkpoint"),
    ("unsafe", r"unsafe\.ckpt holds pickled objects beyond tensors and plain values; it is refused"),
    ("official", r"checkpoint-last\.pth is not a Lightning checkpoint.*convert it with `lightning-ar import-mar`"),
])
def test_bad_ckpt_path_is_named_without_a_traceback(bad_files: dict, name: str, message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", DIGITS, "--config", DEBUG, "--ckpt_path", str(bad_files[name])])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(r"lightning-ar: error: --ckpt_path: .*" + message, err), err
    assert "Traceback" not in err


def test_generator_file_is_never_unpickled_unsafely(bad_files: dict) -> None:
    """Before: ``torch.load(weights_only=False)`` on ``model.generator`` ran pickled code from the file."""
    with pytest.raises(ValueError, match=r"model\.generator: .*unsafe\.ckpt holds pickled objects"):
        OTRefinement(generator=str(bad_files["unsafe"]))


# ------------------------------------------------------------------------------------- config files
@pytest.mark.parametrize(("text", "message"), [
    ("trainer:\n  max_steps: [1\n", r"YAML syntax error \(line 3, column 1\)"),
    ("trainer:\n  max_steps: ${nothere}\n", r"cannot resolve trainer\.max_steps: Interpolation key 'nothere'"),
    ("- a\n- b\n", "expected a mapping of options at the top"),
])
def test_config_file_errors_name_the_file(tmp_path: Path, text: str, message: str, capsys) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", DIGITS, f"--config={bad}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"config file {bad}: " in err and re.search(message, err), err
    assert "Traceback" not in err


def test_missing_config_file_is_named(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "-c", str(tmp_path / "nope.yaml")])
    assert f"config file {tmp_path / 'nope.yaml'}: does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- numeric options, generate()
def test_zero_sampling_steps_is_refused_not_the_default() -> None:
    with pytest.raises(ValueError, match="model.num_sampling_steps must be an integer >= 1, got 0"):
        _instantiate("--model.init_args.num_sampling_steps", "0")


@pytest.mark.parametrize("name", ["cfg", "temperature", "mask_ratio_std", "mlp_ratio", "latent_scale"])
def test_nan_options_from_python_are_refused(name: str) -> None:
    """(jsonargparse already refuses ``nan`` for a float on the command line; from Python it arrives as is.)"""
    with pytest.raises(ValueError, match=rf"model\.{name} must be a finite number( > 0)?, got nan"):
        MARGenerator(**{**TINY, "width": 16, name: float("nan")})
    with pytest.raises(ValueError, match="data.latent_scale must be a finite number > 0, got inf"):
        LatentDataModule("gmm", latent_scale=float("inf"))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"labels": torch.tensor([], dtype=torch.long)}, "labels must hold at least one label"),
    ({"labels": torch.tensor(3)}, r"labels must be a 1-D integer tensor \[B\], got dtype torch.int64 shape \(\)"),
    ({"labels": torch.tensor([1.0])}, "labels must be a 1-D integer tensor"),
    ({"num_iter": 2.0}, r"num_iter must be an integer >= 1, got 2.0"),
    ({"num_sampling_steps": 0}, "num_sampling_steps must be an integer >= 1, got 0"),
    ({"cfg": float("nan")}, "cfg must be a finite number, got nan"),
    ({"temperature": float("inf")}, "temperature must be a finite number > 0"),
])
def test_generate_names_the_bad_argument(tiny_generator: MARGenerator, kwargs: dict, message: str) -> None:
    """Before: empty/0-d labels failed deep inside, a float num_iter and num_sampling_steps=0 were accepted (0 meant
    "the default"), cfg=nan returned NaN latents."""
    args = {"labels": torch.tensor([1, 2]), **kwargs}
    with pytest.raises(ValueError, match=message):
        tiny_generator.generate(args.pop("labels"), **args)


# ------------------------------------------------------------------------------------- CLI hygiene
def test_help_lists_the_tools(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(f"  {tool} " in out for tool in ("cache", "import-mar", "convert-vae", "evaluate")), out
    assert out.startswith("usage: lightning-ar ")


def test_no_args_warning_from_our_entry_point() -> None:
    """LightningCLI warns when ``args`` and ``sys.argv`` are both given; ``main`` always passes its arguments."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "lightning_ar.cli", "fit", "--config", DIGITS, "--print_config"],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "args parameter" not in result.stderr
