"""LDM KL-16 to diffusers AutoencoderKL conversion, checked against an independent LDM implementation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.ldm_reference import LDMAutoencoderKL, randomize_

from lightning_ar.checkpoints.convert_vae import (
    convert_ldm_kl16,
    ldm_to_diffusers_key,
    ldm_vae_config,
    load_ldm_state_dict,
)
from lightning_ar.cli import main
from lightning_ar.data.vae import decode_latents, encode_moments, load_vae

SHAPES = Path(__file__).resolve().parents[1] / "assets" / "mar_state_dict_shapes.json"  # vendored format description
TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z=4, encoder_attn={0, 1}, decoder_attn={1})


@pytest.fixture(scope="module")
def kl16() -> LDMAutoencoderKL:
    """The full MAR KL-16 layout (66M parameters), randomly initialised."""
    torch.manual_seed(0)
    return randomize_(LDMAutoencoderKL()).eval()


@pytest.fixture(scope="module")
def tiny() -> LDMAutoencoderKL:
    """A small LDM layout with attention in encoder and decoder levels."""
    torch.manual_seed(0)
    return randomize_(LDMAutoencoderKL(**TINY), seed=1).eval()


def _image(h: int, w: int) -> torch.Tensor:
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(3)) * 2 - 1


def _assert_same_function(ref: LDMAutoencoderKL, vae, image: torch.Tensor, latent_channels: int) -> None:
    with torch.no_grad():
        moments = ref.encode(image)
        torch.testing.assert_close(encode_moments(vae, image), moments, rtol=1e-4, atol=1e-5)
        z = torch.randn(moments[:, :latent_channels].shape, generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(vae.decode(z).sample, ref.decode(z), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(decode_latents(vae, z), ref.decode(z).clamp(-1, 1), rtol=1e-4, atol=1e-5)


def test_reference_ldm_layout_is_mar_kl16(kl16: LDMAutoencoderKL) -> None:
    spec = json.loads(SHAPES.read_text())["kl16_vae"]
    shapes = {k: list(v.shape) for k, v in kl16.state_dict().items()}
    assert shapes == spec["state_dict"]
    assert sum(p.numel() for p in kl16.parameters()) == spec["n_params"]


def test_kl16_config_and_every_key_maps(kl16: LDMAutoencoderKL) -> None:
    sd = kl16.state_dict()
    config = ldm_vae_config(sd)
    assert config["down_block_types"] == ("DownEncoderBlock2D",) * 4 + ("AttnDownEncoderBlock2D",)
    assert config["up_block_types"] == ("UpDecoderBlock2D",) * 5
    assert config["block_out_channels"] == (128, 128, 256, 256, 512)
    assert (config["layers_per_block"], config["latent_channels"], config["mid_block_add_attention"]) == (2, 16, True)
    vae = convert_ldm_kl16(sd)
    target = vae.state_dict()
    renamed = {ldm_to_diffusers_key(k, 5): k for k in sd}
    assert set(renamed) == set(target)  # a bijection onto the diffusers parameters
    for new, old in renamed.items():
        assert target[new].numel() == sd[old].numel()
        torch.testing.assert_close(target[new].flatten(), sd[old].flatten(), rtol=0, atol=0)


def test_converted_kl16_computes_what_ldm_computes(kl16: LDMAutoencoderKL) -> None:
    vae = convert_ldm_kl16(kl16.state_dict())
    _assert_same_function(kl16, vae, _image(32, 48), 16)  # non-square: catches h/w mix-ups and padding side


def test_tiny_layout_with_decoder_attention(tiny: LDMAutoencoderKL) -> None:
    vae = convert_ldm_kl16(tiny.state_dict())
    assert tuple(vae.config.up_block_types) == ("AttnUpDecoderBlock2D", "UpDecoderBlock2D")
    assert tuple(vae.config.down_block_types) == ("AttnDownEncoderBlock2D",) * 2
    _assert_same_function(tiny, vae, _image(6, 10), 4)


def test_wrong_shape_is_named(tiny: LDMAutoencoderKL) -> None:
    sd = dict(tiny.state_dict())
    sd["encoder.down.1.block.0.conv2.weight"] = torch.zeros(64, 64, 1, 1)
    with pytest.raises(ValueError, match=r"shape mismatches \(1\): encoder\.down\.1\.block\.0\.conv2\.weight: "
                                         r"\(64, 64, 1, 1\), expected \(64, 64, 3, 3\)"):
        convert_ldm_kl16(sd)


def test_unmapped_and_missing_keys_are_listed(tiny: LDMAutoencoderKL) -> None:
    sd = dict(tiny.state_dict())
    sd["encoder.down.0.extra.weight"] = torch.zeros(1)
    sd["encoder.down.0.attn.0.qkv.weight"] = torch.zeros(1)
    del sd["decoder.up.1.upsample.conv.bias"]  # LDM up.1 is diffusers' up_blocks.0 (deepest first)
    with pytest.raises(ValueError) as err:
        convert_ldm_kl16(sd)
    message = str(err.value)
    assert "unmapped LDM keys (2)" in message and "encoder.down.0.extra.weight" in message
    assert "encoder.down.0.attn.0.qkv.weight" in message
    assert "diffusers keys without an LDM value (1): decoder.up_blocks.0.upsamplers.0.conv.bias" in message


def test_load_ldm_state_dict_unwraps_and_strips(tiny: LDMAutoencoderKL, tmp_path: Path) -> None:
    sd = tiny.state_dict()
    torch.save({"model": sd}, tmp_path / "mar.ckpt")  # MAR's kl16.ckpt layout
    nested = {f"first_stage_model.{k}": v for k, v in sd.items()}
    nested.update({"model.diffusion_model.x": torch.zeros(1), "first_stage_model.loss.logvar": torch.zeros(())})
    torch.save({"state_dict": nested, "global_step": 3}, tmp_path / "ldm.ckpt")
    for name in ("mar.ckpt", "ldm.ckpt"):
        loaded = load_ldm_state_dict(tmp_path / name)
        assert loaded.keys() == sd.keys()
        assert all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_load_ldm_state_dict_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="--checkpoint.*nope.ckpt"):
        load_ldm_state_dict(tmp_path / "nope.ckpt")
    torch.save({"weights": [1, 2]}, tmp_path / "odd.ckpt")
    with pytest.raises(ValueError, match=r"odd\.ckpt.*expected a state dict or a dict with one of"):
        load_ldm_state_dict(tmp_path / "odd.ckpt")


def test_load_vae_needs_config_json(tmp_path: Path) -> None:
    (tmp_path / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vae(str(tmp_path))


def test_convert_vae_tool_end_to_end(tiny: LDMAutoencoderKL, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    torch.save({"model": tiny.state_dict()}, tmp_path / "kl.ckpt")
    out = tmp_path / "vae"
    main(["convert-vae", "--checkpoint", str(tmp_path / "kl.ckpt"), "--out", str(out)])
    assert str(out) in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kl.ckpt", "vae"]  # no temporary directory left
    _assert_same_function(tiny, load_vae(str(out)), _image(8, 8), 4)
    with pytest.raises(FileExistsError, match="--overwrite"):
        main(["convert-vae", "--checkpoint", str(tmp_path / "kl.ckpt"), "--out", str(out)])
    main(["convert-vae", "--checkpoint", str(tmp_path / "kl.ckpt"), "--out", str(out), "--overwrite"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kl.ckpt", "vae"]
    assert (out / "config.json").is_file()


def test_convert_vae_tool_help_and_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["convert-vae", "--help"])
    assert exit_info.value.code == 0 and "--checkpoint" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="--checkpoint.*missing.ckpt"):
        main(["convert-vae", "--checkpoint", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "vae")])
    assert not (tmp_path / "vae").exists()
