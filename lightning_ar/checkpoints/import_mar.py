"""Import an official MAR checkpoint (Li et al., 2024; github.com/LTH14/mar) as a ``MARGenerator`` Lightning checkpoint.

Official checkpoints are ``torch.save`` dicts with the keys ``model`` and ``model_ema`` (state dicts of MAR's ``MAR``
module); MAR weights are also distributed as ``.safetensors`` files holding one such state dict, which are read with
the ``safetensors`` package (same key mapping and checks). Every parameter maps one-to-one onto
:class:`~lightning_ar.MARGenerator`:

* ``fake_latent`` (MAR's null class for CFG) -> ``mar.null_class_emb``;
* ``{encoder,decoder,diffusion}_pos_embed_learned`` -> ``mar.{encoder,decoder,diffusion}_pos_embed``;
* every other transformer key (class embedding, ``z_proj``/``z_proj_ln``, timm blocks, norms, ``decoder_embed``,
  ``mask_token``) keeps its name under ``mar.``;
* ``diffloss.net`` (``SimpleMLPAdaLN``) -> ``head.net`` with ``res_blocks.i.{in_ln,adaLN_modulation}`` ->
  ``blocks.i.{norm,modulation}`` and ``final_layer.{linear,adaLN_modulation}`` -> ``final.{linear,modulation}``.

MAR flattens a latent patch as ``(c, p, q)``; this project as ``(p, q, c)``. For ``patch_size > 1`` the token
dimension of ``z_proj``, ``input_proj`` and both halves (noise, variance) of the head's output layer is permuted, so
the imported model computes exactly MAR's function in this project's token layout.

Command line::

    lightning-ar import-mar --checkpoint mar_base/checkpoint-last.pth --size base --out mar_base.ckpt
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch import Tensor

from lightning_ar.io import atomic_output
from lightning_ar.modules.generator import MARGenerator

# MAR multiplies the posterior samples of its KL-16 VAE by this constant (hard-coded in LTH14/mar's training and
# sampling code). An imported generator keeps it: its latents live in exactly that scaled space.
MAR_LATENT_SCALE = 0.2325
MAR_VAE_CHANNELS = 16


@dataclass(frozen=True)
class MARSize:
    """Architecture and evaluation defaults of one published MAR model (MAR README, ImageNet 256)."""

    width: int
    depth: int  # encoder blocks = decoder blocks
    num_heads: int
    head_width: int
    head_depth: int
    cfg: float


MAR_SIZES: dict[str, MARSize] = {
    "base": MARSize(768, 12, 12, 1024, 6, 2.9),
    "large": MARSize(1024, 16, 16, 1280, 8, 3.0),
    "huge": MARSize(1280, 20, 16, 1536, 12, 3.2),
}

# Our state-dict name -> MAR's name, applied in order (first match of each rule, all rules).
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^mar\.null_class_emb$", "fake_latent"),
    (r"^mar\.(encoder|decoder|diffusion)_pos_embed$", r"\1_pos_embed_learned"),
    (r"^mar\.", ""),
    (r"^head\.net\.blocks\.(\d+)\.norm\.", r"diffloss.net.res_blocks.\1.in_ln."),
    (r"^head\.net\.blocks\.(\d+)\.modulation\.", r"diffloss.net.res_blocks.\1.adaLN_modulation."),
    (r"^head\.net\.blocks\.(\d+)\.", r"diffloss.net.res_blocks.\1."),
    (r"^head\.net\.final\.modulation\.", "diffloss.net.final_layer.adaLN_modulation."),
    (r"^head\.net\.final\.linear\.", "diffloss.net.final_layer.linear."),
    (r"^head\.net\.", "diffloss.net."),
)


def official_name(name: str) -> str:
    """MAR's state-dict key for a ``MARGenerator`` state-dict key (e.g. ``mar.null_class_emb`` -> ``fake_latent``)."""
    for pattern, replacement in _RENAMES:
        name = re.sub(pattern, replacement, name)
    return name


def _count_blocks(official: Mapping[str, Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.")
    return len({m.group(1) for key in official if (m := pattern.match(key))})


def _require(official: Mapping[str, Tensor], *keys: str) -> None:
    missing = [k for k in keys if k not in official]
    if missing:
        raise ValueError(f"--checkpoint is not an official MAR state dict: missing keys {missing}")


def generator_hparams(official: Mapping[str, Tensor], size: str | MARSize) -> dict:
    """``MARGenerator`` arguments for ``official`` weights of MAR-``size`` (a name of :data:`MAR_SIZES`, or a
    :class:`MARSize` for a custom model trained with MAR's code); the latent shape, patch size and buffer size are
    read from the weights (``z_proj``: token dim ``16 p^2``; ``diffusion_pos_embed_learned``: token count).

    Raises:
        ValueError: unknown ``size``, weights that are not MAR's, or weights of another size (naming the likely one).
    """
    spec = size if isinstance(size, MARSize) else MAR_SIZES.get(size)
    if spec is None:
        raise ValueError(f"--size must be one of {sorted(MAR_SIZES)}, got {size!r}")
    _require(official, "z_proj.weight", "diffusion_pos_embed_learned", "encoder_pos_embed_learned", "class_emb.weight")
    _check_size(official, f"--size {size}" if isinstance(size, str) else str(spec), spec)
    token_dim, seq_len = official["z_proj.weight"].shape[1], official["diffusion_pos_embed_learned"].shape[1]
    patch, grid = math.isqrt(token_dim // MAR_VAE_CHANNELS), math.isqrt(seq_len)
    if MAR_VAE_CHANNELS * patch * patch != token_dim or grid * grid != seq_len:
        raise ValueError(
            f"z_proj.weight {tuple(official['z_proj.weight'].shape)} / diffusion_pos_embed_learned "
            f"{tuple(official['diffusion_pos_embed_learned'].shape)}: expected {MAR_VAE_CHANNELS}*p^2 token dims and a "
            "square token grid"
        )
    return dict(
        latent_shape=(MAR_VAE_CHANNELS, grid * patch, grid * patch), num_classes=official["class_emb.weight"].shape[0],
        latent_scale=MAR_LATENT_SCALE, patch_size=patch, width=spec.width, encoder_depth=spec.depth,
        decoder_depth=spec.depth, num_heads=spec.num_heads, mlp_ratio=4.0,
        buffer_size=official["encoder_pos_embed_learned"].shape[1] - seq_len, dropout=0.1, label_drop_prob=0.1,
        head_width=spec.head_width, head_depth=spec.head_depth, diffusion_batch_mul=4, num_train_timesteps=1000,
        mask_ratio_min=0.7, mask_ratio_std=0.25, num_iter=64, cfg=spec.cfg, cfg_schedule="linear", temperature=1.0,
        num_sampling_steps=100, sampler="ddpm", timestep_spacing="linspace",
    )


def _architecture(official: Mapping[str, Tensor]) -> tuple[int, int, int, int, int]:
    """(width, encoder blocks, decoder blocks, head width, head blocks) found in ``official``."""
    return (
        official["z_proj.weight"].shape[0], _count_blocks(official, "encoder_blocks."),
        _count_blocks(official, "decoder_blocks."),
        official["diffloss.net.input_proj.weight"].shape[0] if "diffloss.net.input_proj.weight" in official else 0,
        _count_blocks(official, "diffloss.net.res_blocks."),
    )


def _check_size(official: Mapping[str, Tensor], label: str, spec: MARSize) -> None:
    found = _architecture(official)
    expected = (spec.width, spec.depth, spec.depth, spec.head_width, spec.head_depth)
    if found == expected:
        return
    likely = [name for name, s in MAR_SIZES.items() if (s.width, s.depth, s.depth, s.head_width, s.head_depth) == found]
    hint = f"; it looks like --size {likely[0]}" if likely else ""
    raise ValueError(
        f"{label} expects (width, encoder blocks, decoder blocks, head width, head blocks) = {expected}, "
        f"but the checkpoint has {found}{hint}"
    )


def token_permutation(patch_size: int, channels: int) -> Tensor:
    """``perm[j]``: MAR's ``(c, p, q)`` token index of this project's ``(p, q, c)`` index ``j`` (``[p*p*C]``)."""
    p, q, c = torch.meshgrid(torch.arange(patch_size), torch.arange(patch_size), torch.arange(channels), indexing="ij")
    return (c * patch_size * patch_size + p * patch_size + q).flatten()


def _to_our_layout(name: str, value: Tensor, perm: Tensor) -> Tensor:
    """Permute the token dimension of the parameters that read or write tokens."""
    if name in ("mar.z_proj.weight", "head.net.input_proj.weight"):
        return value[:, perm]  # (W, Dt) columns
    if name.startswith("head.net.final.linear."):
        half = value.shape[0] // 2
        return torch.cat([value[:half][perm], value[half:][perm]])  # (2 Dt, ...) rows: noise, variance
    return value


def convert_state_dict(official: Mapping[str, Tensor], generator: MARGenerator) -> dict[str, Tensor]:
    """Map MAR's state dict onto ``generator``'s (every official key used, every generator key filled, shapes equal).

    Raises:
        ValueError: naming the missing, unused and shape-mismatched keys.
    """
    expected = generator.state_dict()
    perm = token_permutation(generator.hparams.patch_size, generator.latent_shape[0])
    converted, missing, wrong = {}, [], []
    for name, target in expected.items():
        source = official_name(name)
        if source not in official:
            missing.append(source)
        elif tuple(official[source].shape) != tuple(target.shape):
            wrong.append(f"{source} {tuple(official[source].shape)} (expected {tuple(target.shape)} for {name})")
        else:
            converted[name] = _to_our_layout(name, official[source], perm).to(target.dtype)
    unused = sorted(set(official) - {official_name(n) for n in expected})
    if missing or wrong or unused:
        raise ValueError(
            "official MAR state dict does not match MARGenerator: "
            f"missing keys {missing}, wrong shapes {wrong}, unused keys {unused}"
        )
    return converted


def is_safetensors(path: str | Path) -> bool:
    """Whether ``path`` is a safetensors file (by its ``.safetensors`` suffix, or by its header: an 8-byte
    little-endian length followed by a JSON object)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"--checkpoint {path}: not a readable safetensors file ({err})") from None


def load_official(path: str | Path, which: str = "model_ema") -> dict[str, Tensor]:
    """The ``which`` state dict (``model_ema`` or ``model``) of an official checkpoint; ``model`` when the EMA one
    is absent (with a message on stderr). A bare state dict is accepted as is; a ``.safetensors`` file is one bare
    state dict (``which`` does not apply)."""
    if which not in ("model_ema", "model"):
        raise ValueError(f"--which must be 'model_ema' or 'model', got {which!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint: {path} does not exist")
    if is_safetensors(path):
        return _load_safetensors(path)
    with torch.serialization.safe_globals([argparse.Namespace]):  # MAR also saves its argparse args
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"--checkpoint {path}: expected a dict with 'model'/'model_ema', got {type(checkpoint)}")
    if "z_proj.weight" in checkpoint:
        return checkpoint
    if checkpoint.get(which) is None and which == "model_ema" and checkpoint.get("model") is not None:
        print(f"import-mar: {path} has no 'model_ema' weights; importing 'model'", file=sys.stderr)
        which = "model"
    if checkpoint.get(which) is None:
        raise ValueError(f"--checkpoint {path}: no {which!r} state dict (keys: {sorted(checkpoint)})")
    return checkpoint[which]


def import_mar_checkpoint(
    checkpoint: str | Path, size: str | MARSize, out: str | Path, which: str = "model_ema"
) -> Path:
    """Convert an official MAR checkpoint into a Lightning checkpoint of :class:`MARGenerator` at ``out``.

    The output holds ``state_dict``, ``hyper_parameters`` (with LightningCLI's ``_class_path``) and
    ``pytorch-lightning_version`` (what ``--ckpt_path``, ``MARGenerator.load_from_checkpoint`` and
    ``OTRefinement(generator=out)`` read); it is written atomically.

    Args:
        checkpoint: Official checkpoint (``torch.save`` dict with ``model``/``model_ema``, a bare state dict, or a
            ``.safetensors`` state dict).
        size: ``base``, ``large``, ``huge`` or a :class:`MARSize`.
        out: Output ``.ckpt`` path.
        which: ``model_ema`` (default; falls back to ``model`` when absent) or ``model``.

    Returns:
        ``out``.
    """
    official = load_official(checkpoint, which)
    hparams = generator_hparams(official, size)
    generator = MARGenerator(**hparams)
    state_dict = convert_state_dict(official, generator)
    generator.load_state_dict(state_dict, strict=True)
    payload = {  # hyper_parameters with LightningCLI's _class_path: `--ckpt_path` and `load_from_checkpoint` read it
        "state_dict": generator.state_dict(),
        "hyper_parameters": {"_class_path": "lightning_ar.MARGenerator", **dict(generator.hparams)},
        "pytorch-lightning_version": L.__version__, "epoch": 0, "global_step": 0,
        "mar_import": {"checkpoint": str(checkpoint), "size": str(size), "which": which},
    }
    with atomic_output(out) as tmp:
        torch.save(payload, tmp)
    return Path(out)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-ar import-mar",
        description="Convert an official MAR checkpoint (github.com/LTH14/mar) into a MARGenerator .ckpt.",
    )
    parser.add_argument("--checkpoint", required=True,
                        help="official checkpoint (.pth with model/model_ema) or a .safetensors state dict")
    parser.add_argument("--size", required=True, choices=sorted(MAR_SIZES), help="MAR-B, MAR-L or MAR-H")
    parser.add_argument("--out", required=True, help="output Lightning checkpoint (.ckpt)")
    parser.add_argument("--which", default="model_ema", choices=("model_ema", "model"), help="weights to import")
    return parser


def import_main(argv: list[str]) -> None:
    """``lightning-ar import-mar --checkpoint PATH --size base|large|huge --out OUT.ckpt [--which model_ema|model]``.

    Args:
        argv: The arguments after ``import-mar``.
    """
    args = _parser().parse_args(argv)
    out = import_mar_checkpoint(args.checkpoint, args.size, args.out, args.which)
    print(f"import-mar: wrote {out} (MAR-{args.size}, {args.which})")
