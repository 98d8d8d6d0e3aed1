"""Conversion of LDM-layout KL VAE checkpoints (latent-diffusion / taming, e.g. MAR's KL-16 ``kl16.ckpt``) to a local
diffusers ``AutoencoderKL`` directory (``lightning-ar convert-vae``), loadable with
:func:`lightning_ar.data.vae.load_vae`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

CHECKPOINT_WRAPPERS = ("state_dict", "model")
# Prefixes stripped from LDM keys: a full latent-diffusion checkpoint nests its VAE under ``first_stage_model.``.
STRIP_PREFIXES = ("first_stage_model.", "vae.", "module.")
# Training-only LDM keys (discriminator and learned log-variance of the loss) with no place in the autoencoder.
TRAINING_ONLY_PREFIXES = ("loss.",)
LDM_NORM_GROUPS = 32
_ATTN_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_MID_BLOCKS = {"block_1": "resnets.0", "block_2": "resnets.1", "attn_1": "attentions.0"}
_KEY = re.compile(
    r"(?P<part>encoder|decoder)\.(?:"
    r"(?P<top>conv_in|conv_out|norm_out)"
    r"|mid\.(?P<mid>block_1|block_2|attn_1)\.(?P<mid_layer>\w+)"
    r"|(?:down|up)\.(?P<level>\d+)\.(?:(?P<kind>block|attn)\.(?P<index>\d+)\.(?P<layer>\w+)|(?P<resample>downsample|upsample)\.conv)"
    r")\.(?P<param>weight|bias)"
)


def load_ldm_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read an LDM-layout VAE state dict from a ``torch.save`` file or a ``.safetensors`` file.

    Unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` (MAR's ``kl16.ckpt`` is ``{"model": state_dict}``), keeps
    only ``first_stage_model.*`` keys of a full latent-diffusion checkpoint and strips that prefix (and ``vae.``,
    ``module.``), and drops training-only ``loss.*`` keys.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: the file holds no mapping of parameter names to tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint: LDM VAE checkpoint {str(path)!r} not found (expected a file)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj = load_file(str(path))
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling failure is reported with the file name
            raise ValueError(f"checkpoint {str(path)!r}: not a tensor-only torch.save file ({err})") from err
    return _clean_state_dict(_unwrap(obj, path), path)


def _unwrap(obj: object, path: Path) -> dict[str, Tensor]:
    """Descend through ``state_dict``/``model`` wrappers to the ``{name: Tensor}`` mapping."""
    while isinstance(obj, dict) and not _is_state_dict(obj):
        key = next((k for k in CHECKPOINT_WRAPPERS if k in obj), None)
        if key is None:
            raise ValueError(f"checkpoint {str(path)!r}: expected a state dict or a dict with one of "
                             f"{CHECKPOINT_WRAPPERS}, found keys {sorted(map(str, obj))[:10]}")
        obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"checkpoint {str(path)!r}: expected a non-empty mapping of names to tensors")
    return obj


def _is_state_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def _clean_state_dict(state_dict: dict[str, Tensor], path: Path) -> dict[str, Tensor]:
    """Strip wrapper prefixes and drop training-only keys."""
    for prefix in STRIP_PREFIXES:
        if any(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    kept = {k: v for k, v in state_dict.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
    if not kept:
        raise ValueError(f"checkpoint {str(path)!r}: no VAE parameters left after dropping {TRAINING_ONLY_PREFIXES}")
    return kept


def _shape(state_dict: dict[str, Tensor], key: str) -> torch.Size:
    if key not in state_dict:
        raise ValueError(f"LDM VAE state dict: missing {key!r}, needed to infer the architecture")
    return state_dict[key].shape


def _levels(state_dict: dict[str, Tensor], prefix: str) -> list[int]:
    """Sorted distinct integers ``i`` of keys ``{prefix}{i}.*``."""
    found = {int(m.group(1)) for k in state_dict if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return sorted(found)


def ldm_vae_config(state_dict: dict[str, Tensor], sample_size: int = 256) -> dict:
    """Infer the diffusers ``AutoencoderKL`` config matching an LDM KL state dict (e.g. MAR's KL-16).

    Levels with ``encoder.down.{i}.attn.*`` keys become ``AttnDownEncoderBlock2D`` (MAR's KL-16: the last, 16x16
    level); ``decoder.up.{i}.attn.*`` become ``AttnUpDecoderBlock2D`` (diffusers lists up blocks deepest first).
    ``scaling_factor`` is 1.0: this project computes the latent scale from the latent cache.

    Raises:
        ValueError: a key needed to read the layout is missing, or a width is not a multiple of 32 (LDM's GroupNorm).
    """
    levels = _levels(state_dict, "encoder.down.")
    if not levels or levels != list(range(len(levels))):
        raise ValueError(f"LDM VAE state dict: expected encoder.down.0..N-1 levels, found {levels}")
    widths = [_shape(state_dict, f"encoder.down.{i}.block.0.conv1.weight")[0] for i in levels]
    if any(w % LDM_NORM_GROUPS for w in widths):
        raise ValueError(f"LDM VAE state dict: block widths {widths} must be multiples of {LDM_NORM_GROUPS}")
    enc_attn = {i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in state_dict}
    dec_attn = {i for i in levels if f"decoder.up.{i}.attn.0.q.weight" in state_dict}
    return {
        "in_channels": _shape(state_dict, "encoder.conv_in.weight")[1],
        "out_channels": _shape(state_dict, "decoder.conv_out.weight")[0],
        "down_block_types": tuple("AttnDownEncoderBlock2D" if i in enc_attn else "DownEncoderBlock2D" for i in levels),
        "up_block_types": tuple("AttnUpDecoderBlock2D" if i in dec_attn else "UpDecoderBlock2D"
                                for i in reversed(levels)),
        "block_out_channels": tuple(int(w) for w in widths),
        "layers_per_block": len(_levels(state_dict, "encoder.down.0.block.")),
        "act_fn": "silu",
        "latent_channels": _shape(state_dict, "post_quant_conv.weight")[0],
        "norm_num_groups": LDM_NORM_GROUPS,
        "sample_size": sample_size,
        "scaling_factor": 1.0,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in state_dict,
    }


def ldm_to_diffusers_key(key: str, num_levels: int) -> str | None:
    """The diffusers ``AutoencoderKL`` name of LDM parameter ``key`` (``None`` when no rule matches).

    ``decoder.up.{i}`` is diffusers' ``decoder.up_blocks.{num_levels - 1 - i}``; ``nin_shortcut`` is
    ``conv_shortcut``; attention ``norm/q/k/v/proj_out`` are ``group_norm/to_q/to_k/to_v/to_out.0``.
    """
    if key in {f"{name}.{param}" for name in ("quant_conv", "post_quant_conv") for param in ("weight", "bias")}:
        return key
    m = _KEY.fullmatch(key)
    if m is None:
        return None
    g = m.groupdict()
    part, param = g["part"], g["param"]
    if g["top"]:
        return f"{part}.{'conv_norm_out' if g['top'] == 'norm_out' else g['top']}.{param}"
    if g["mid"]:
        layer = _layer_name("attn" if g["mid"] == "attn_1" else "block", g["mid_layer"])
        return f"{part}.mid_block.{_MID_BLOCKS[g['mid']]}.{layer}.{param}" if layer else None
    level = int(g["level"]) if part == "encoder" else num_levels - 1 - int(g["level"])
    blocks = "down_blocks" if part == "encoder" else "up_blocks"
    if g["resample"]:
        return f"{part}.{blocks}.{level}.{'downsamplers' if part == 'encoder' else 'upsamplers'}.0.conv.{param}"
    layer = _layer_name(g["kind"], g["layer"])
    group = "resnets" if g["kind"] == "block" else "attentions"
    return f"{part}.{blocks}.{level}.{group}.{g['index']}.{layer}.{param}" if layer else None


def _layer_name(kind: str, layer: str) -> str | None:
    if kind == "attn":
        return _ATTN_NAMES.get(layer)
    return "conv_shortcut" if layer == "nin_shortcut" else layer


def _fit(tensor: Tensor, shape: torch.Size) -> Tensor | None:
    """``tensor`` reshaped to ``shape`` when equal, or a 1x1 conv ``[o, i, 1, 1]`` for a linear ``[o, i]``."""
    if tensor.shape == shape:
        return tensor
    if tensor.ndim == 4 and tensor.shape[2:] == (1, 1) and tensor.shape[:2] == shape:
        return tensor[:, :, 0, 0]
    return None


def map_ldm_state_dict(state_dict: dict[str, Tensor], target: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename every LDM key to diffusers and fit it to ``target``'s shapes.

    Raises:
        ValueError: listing unmapped LDM keys, diffusers keys left missing, and shape mismatches.
    """
    num_levels = len(_levels(state_dict, "encoder.down."))
    mapped: dict[str, Tensor] = {}
    unmapped, mismatched, seen = [], [], set()
    for key, tensor in state_dict.items():
        new = ldm_to_diffusers_key(key, num_levels)
        if new is None or new not in target:
            unmapped.append(key if new is None else f"{key} (-> {new}, not in the diffusers model)")
            continue
        seen.add(new)
        fitted = _fit(tensor, target[new].shape)
        if fitted is None:
            mismatched.append(f"{key}: {tuple(tensor.shape)}, expected {tuple(target[new].shape)} for {new}")
        else:
            mapped[new] = fitted
    _raise_problems(unmapped, sorted(set(target) - seen), mismatched)
    return mapped


def _raise_problems(unmapped: list[str], missing: list[str], mismatched: list[str], show: int = 12) -> None:
    """Raise one ValueError listing (the first ``show`` of) each kind of problem, if any."""
    kinds = (("unmapped LDM keys", unmapped), ("diffusers keys without an LDM value", missing),
             ("shape mismatches", mismatched))
    lines = [f"{title} ({len(items)}): " + "; ".join(items[:show]) + (" ..." if len(items) > show else "")
             for title, items in kinds if items]
    if lines:
        header = "LDM VAE state dict does not match its inferred AutoencoderKL layout:"
        raise ValueError("\n  ".join([header, *lines]))


def convert_ldm_kl16(state_dict: dict[str, Tensor], sample_size: int = 256) -> AutoencoderKL:
    """Convert an LDM-layout KL VAE state dict (MAR's KL-16: ch 128, ch_mult (1, 1, 2, 2, 4), 2 res blocks,
    16 latent channels, encoder attention at 16x16 and in both mid blocks) to a diffusers ``AutoencoderKL``.

    Every key must map and every diffusers parameter must receive a value of the right shape; attention 1x1 conv
    weights ``[C, C, 1, 1]`` become linear weights ``[C, C]``. Parameters keep the checkpoint's dtype.

    Returns:
        The converted ``AutoencoderKL`` in eval mode, on CPU.

    Raises:
        ValueError: unmapped or missing keys, or shape mismatches (all listed).
    """
    from diffusers import AutoencoderKL

    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
    with torch.device("meta"):
        vae = AutoencoderKL(**ldm_vae_config(state_dict, sample_size))
    mapped = map_ldm_state_dict(state_dict, vae.state_dict())
    vae.load_state_dict(mapped, strict=True, assign=True)
    return vae.eval()


def save_converted_vae(checkpoint: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Convert the LDM checkpoint file ``checkpoint`` and ``save_pretrained`` it to ``out_dir`` (a diffusers
    directory that ``load_vae(out_dir)`` loads). Written to a temporary directory beside ``out_dir``, then renamed.

    Raises:
        FileNotFoundError: ``checkpoint`` is missing.
        FileExistsError: ``out_dir`` exists and is not empty, and ``overwrite`` is false.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"--out {str(out)!r} exists and is not empty (pass --overwrite to replace it)")
    vae = convert_ldm_kl16(load_ldm_state_dict(checkpoint))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    tmp.chmod(0o755)  # mkdtemp's 0o700 would make the published directory private
    try:
        vae.save_pretrained(tmp)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; an existing ``dst`` is moved aside first and removed only after success."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old.{os.getpid()}")
        os.replace(dst, old)
    try:
        os.replace(src, dst)
    except BaseException:
        if old is not None:
            os.replace(old, dst)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def convert_main(argv: list[str]) -> None:
    """``lightning-ar convert-vae --checkpoint kl16.ckpt --out DIR``: LDM KL checkpoint to a diffusers directory."""
    parser = argparse.ArgumentParser(
        prog="lightning-ar convert-vae",
        description="Convert an LDM-layout KL VAE checkpoint (e.g. MAR's kl16.ckpt) to a diffusers AutoencoderKL "
                    "directory, usable as `--vae DIR` wherever a VAE is loaded.")
    parser.add_argument("--checkpoint", required=True, help="torch.save file ({'model': ...} or {'state_dict': ...}) "
                                                            "or .safetensors with LDM parameter names")
    parser.add_argument("--out", required=True, help="output directory (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    out = save_converted_vae(args.checkpoint, args.out, overwrite=args.overwrite)
    print(f"wrote diffusers AutoencoderKL to {out}")
