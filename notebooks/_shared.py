"""Helpers shared by the theory-verification notebooks (``notebooks/0*.ipynb``).

- :func:`find_repo_root` / :func:`setup`: locate the repository (walk up from the working directory until
  ``configs/`` and ``lightning_ar/`` exist), ``chdir`` there, and read the ``FAST`` switch
  (``LIGHTNING_AR_NOTEBOOK_FAST=1``: tiny budgets, as in the tests) and the output folder
  (``LIGHTNING_AR_NOTEBOOK_OUT``, default ``outputs/notebooks``).
- :func:`train_or_load_digits`: train a digits generator with the project's own CLI entry point
  (``lightning_ar.cli.build_cli`` on ``configs/digits/mar.yaml``) for a given number of steps, and cache the
  checkpoint in the output folder, keyed by the config text and the budget; later notebooks reuse it.
- :func:`build_refinement`: an :class:`~lightning_ar.OTRefinement` around that checkpoint whose ideal-condition
  banks are filled by teacher forcing (``fill_bank``) on the digits' train split (the flow's bank) and val split
  (the held-out bank, used only to measure).
- :func:`generate_pools`: generate seeded batches with a trace and pool each AR step's conditions
  (:func:`lightning_ar.theory.conditions.pool_steps`), and :func:`real_context_pools`: the same pools for error-free
  conditions (teacher-forced real digits of an unused split, as many images): the control that the condition
  statistics must read as "no error" (dispersion ratio ~1; its divergence is the finite-sample floor).
- :func:`heldout_references`: the held-out ideal conditions of every AR step, the reference of those statistics.
- :func:`show`, :func:`digits_grid`: figure output.

This is glue for the notebooks, not part of the package.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

FAST_ENV = "LIGHTNING_AR_NOTEBOOK_FAST"
OUT_ENV = "LIGHTNING_AR_NOTEBOOK_OUT"
GENERATOR_ENV = "LIGHTNING_AR_NOTEBOOK_GENERATOR"  # use this MARGenerator checkpoint instead of training one
MAR_CONFIG = "configs/digits/mar.yaml"
REFINE_CONFIG = "configs/digits/refine.yaml"

# Training budgets of the digits generator (optimizer steps of configs/digits/mar.yaml's model; the config's own
# schedule is 4000 steps). FAST is what the tests run: a barely trained model, so its numbers say little.
TRAIN_STEPS = {True: 250, False: 2000}

# Banks of the refinement (build_refinement): FAST fills the flow's bank from 10 train batches with 2 teacher-forcing
# passes; the full budget uses the whole train split with configs/digits/refine.yaml's capacities and 4 passes.
REFINE_BUDGET = {
    True: dict(train_batches=10, teacher_passes=2, bank_capacity=1024, heldout_capacity=1024, target_size=512),
    False: dict(train_batches=None, teacher_passes=4),
}


def find_repo_root(start: str | Path | None = None) -> Path:
    """The first folder at or above ``start`` (default: the working directory) holding ``configs/`` and
    ``lightning_ar/``."""
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "configs").is_dir() and (folder / "lightning_ar").is_dir():
            return folder
    raise FileNotFoundError(f"no lightning-ar repository (a folder with configs/ and lightning_ar/) above {here}")


def is_fast() -> bool:
    """``LIGHTNING_AR_NOTEBOOK_FAST`` set to anything but ``""``, ``0``, ``false`` or ``no``."""
    return os.environ.get(FAST_ENV, "").strip().lower() not in ("", "0", "false", "no")


def quiet() -> None:
    """Silence Lightning's info messages (tips, seeding, device summary) and library warnings in notebook output."""
    import logging
    import warnings

    import lightning  # noqa: F401  (configures its loggers on import: set the levels after)

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "lightning_fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


def setup() -> tuple[Path, bool, Path]:
    """``chdir`` to the repository root; return ``(root, FAST, out_dir)`` (the output folder is created).

    Also silences Lightning's info messages (:func:`quiet`)."""
    quiet()
    root = find_repo_root()
    os.chdir(root)
    out = Path(os.environ.get(OUT_ENV) or root / "outputs" / "notebooks").resolve()
    out.mkdir(parents=True, exist_ok=True)
    return root, is_fast(), out


def _ema_decay(steps: int) -> float:
    """EMA decay for a run of ``steps``: the config's 0.999 for full runs, a window of ~steps/10 for short ones
    (an EMA that starts at the initial weights would otherwise still be mostly the untrained network)."""
    return float(min(0.999, max(0.9, 1.0 - 10.0 / max(steps, 1))))


def _cache_key(config: Path, steps: int, extra: list[str]) -> str:
    import lightning_ar

    text = json.dumps([config.read_text(), steps, extra, lightning_ar.__version__])
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def train_or_load_digits(
    budget_steps: int,
    out_dir: str | Path,
    config: str | Path = MAR_CONFIG,
    extra: list[str] | None = None,
    verbose: bool = True,
):
    """A digits :class:`~lightning_ar.MARGenerator` trained for ``budget_steps`` steps (cached).

    Trains through the project's CLI (``fit --config configs/digits/mar.yaml --trainer.max_steps N``) with no
    logger, no validation-time callbacks and an EMA of the weights (decay adapted to the budget), then saves the
    (EMA) weights to ``<out_dir>/digits_mar_<N>steps_<hash>.ckpt``. A later call with the same config text, budget
    and ``extra`` arguments loads that file instead of training.

    Returns:
        ``(generator, checkpoint_path, info)``; ``info`` has ``trained`` (bool) and ``seconds``.
    """
    from lightning_ar import MARGenerator

    given = os.environ.get(GENERATOR_ENV, "").strip()
    if given and not is_fast():
        start = time.perf_counter()
        model = MARGenerator.load_from_checkpoint(given, map_location="cpu").eval()
        return model, Path(given), {"trained": False, "seconds": time.perf_counter() - start}
    config, out_dir = Path(config).resolve(), Path(out_dir)
    extra = list(extra or [])
    ckpt = out_dir / f"digits_mar_{budget_steps}steps_{_cache_key(config, budget_steps, extra)}.ckpt"
    start = time.perf_counter()
    if ckpt.is_file():
        try:
            model = MARGenerator.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True).eval()
            return model, ckpt, {"trained": False, "seconds": time.perf_counter() - start}
        except Exception as err:  # stale cache (e.g. the architecture changed): train again
            print(f"cached checkpoint {ckpt.name} could not be loaded ({err!r}); training again")
    from lightning_ar.cli import build_cli

    callbacks = [
        {
            "class_path": "lightning.pytorch.callbacks.EMAWeightAveraging",
            "init_args": {"decay": _ema_decay(budget_steps)},
        }
    ]
    run_dir = out_dir / "runs" / ckpt.stem
    cli = build_cli(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.max_steps",
            str(budget_steps),
            "--trainer.default_root_dir",
            str(run_dir),
            "--trainer.logger",
            "false",
            "--trainer.enable_checkpointing",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.enable_model_summary",
            "false",
            "--trainer.check_val_every_n_epoch",
            "100000",  # no validation: the notebooks measure themselves
            "--trainer.callbacks",
            json.dumps(callbacks),
            *extra,
        ]
    )
    tmp = ckpt.with_suffix(".tmp")
    cli.trainer.save_checkpoint(tmp, weights_only=True)
    os.replace(tmp, ckpt)
    seconds = time.perf_counter() - start
    if verbose:
        loss = cli.trainer.callback_metrics.get("train/loss")
        loss_txt = f", last train/loss {float(loss):.4f}" if loss is not None else ""
        print(f"trained {budget_steps} steps in {seconds:.1f} s{loss_txt}; saved {ckpt}")
    return cli.model.eval(), ckpt, {"trained": True, "seconds": seconds}


def digits_split(split: str, latent_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled latents ``[N, 1, 8, 8]`` and labels ``[N]`` of a digits split, as the data module batches them."""
    from lightning_ar import DigitsSource

    latents, labels = DigitsSource().split(split)
    return latents * latent_scale, labels


@torch.no_grad()
def build_refinement(
    generator_ckpt: str | Path,
    train_batches: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
    **init_args,
):
    """An :class:`~lightning_ar.OTRefinement` of the checkpoint with filled banks.

    The flow's bank is filled by ``fill_bank`` on the first ``train_batches`` batches (all when ``None``) of the
    digits train split, the held-out bank on the whole val split. ``init_args`` override the defaults of
    ``configs/digits/refine.yaml`` (read with omegaconf), e.g. ``bank_capacity``, ``flow_steps``, ``target_size``.

    Returns:
        ``(refinement, info)`` with ``info["seconds"]`` (bank filling) and the bank counts.
    """
    from omegaconf import OmegaConf

    from lightning_ar import OTRefinement

    cfg = OmegaConf.to_container(OmegaConf.load(REFINE_CONFIG).model.init_args)
    cfg.pop("generator", None)
    cfg.update(init_args)
    start = time.perf_counter()
    ref = OTRefinement(str(generator_ckpt), **cfg).eval()
    scale = float(ref.mar_generator.hparams.latent_scale)
    gen = torch.Generator().manual_seed(seed)
    for split, bank, limit in (("train", ref.bank, train_batches), ("val", ref.heldout, None)):
        latents, labels = digits_split(split, scale)
        order = torch.randperm(len(labels), generator=gen)
        for j, i in enumerate(range(0, len(order), batch_size)):
            if limit is not None and j >= limit:
                break
            idx = order[i : i + batch_size]
            ref.fill_bank(bank, latents[idx], labels[idx], gen)
    info = {
        "seconds": time.perf_counter() - start,
        "bank_count": ref.bank.count.tolist(),
        "heldout_count": ref.heldout.count.tolist(),
    }
    return ref, info


def heldout_references(ref) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per AR step the held-out ideal conditions ``(z [M, D], labels [M], positions [M])`` of the refinement."""
    return [ref.heldout.get(k) for k in range(len(ref.schedule))]


@torch.no_grad()
def generate_pools(ref, labels: torch.Tensor, seeds: list[int], mode: str, **kwargs):
    """Generate one batch per seed with refinement ``mode`` and a trace; pool each AR step's conditions.

    Returns:
        ``(pools, latents, traces)``: :class:`~lightning_ar.theory.conditions.StepPool` per AR step (images of all
        seeds, in seed order), the ``[B, 1, 8, 8]`` latents per seed and the traces.
    """
    from lightning_ar import GenerationTrace
    from lightning_ar.theory.conditions import pool_steps

    traces, latents = [], []
    for seed in seeds:
        traces.append(GenerationTrace())
        latents.append(ref.generate(labels, refine=mode, generator=torch.Generator().manual_seed(seed),
                                    trace=traces[-1], **kwargs))
    return pool_steps(traces), latents, traces


@torch.no_grad()
def real_context_pools(ref, per_class: int, repeats: int, seed: int = 0, split: str = "test"):
    """Pools of conditions that carry *no* generation error: teacher forcing on real digits of ``split``.

    ``per_class`` real digits of each class of ``split`` (used by neither bank) are teacher-forced at every AR step,
    ``repeats`` times with fresh random orders (as sampling draws orders), so the pool has as many images as
    ``repeats`` generated batches of ``arange(10).repeat_interleave(per_class)``.

    Returns:
        :class:`~lightning_ar.theory.conditions.StepPool` per AR step (``raw == refined``; ``clusters``: the image
        draw).
    """
    from lightning_ar.nn.mar import patchify
    from lightning_ar.nn.teacher_forcing import teacher_forced_conditions
    from lightning_ar.theory.conditions import StepPool

    gen = ref.mar_generator
    latents, labels = digits_split(split, float(gen.hparams.latent_scale))
    g = torch.Generator().manual_seed(seed)
    parts = [[] for _ in ref.schedule]
    for r in range(repeats):
        idx = torch.cat([torch.nonzero(labels == c).squeeze(1)[torch.randperm(int((labels == c).sum()), generator=g)]
                         [:per_class] for c in range(int(gen.hparams.num_classes))])
        tokens = patchify(latents[idx], int(gen.hparams.patch_size))
        for k in range(len(ref.schedule)):
            sc = teacher_forced_conditions(gen.mar, tokens, labels[idx], ref.schedule, k, g)
            n = len(sc.conditions) // len(idx)
            images = r * len(idx) + torch.arange(len(idx)).repeat_interleave(n)
            parts[k].append((sc.conditions, sc.labels, sc.positions, images))
    pools = []
    for chunks in parts:
        z, lab, pos, img = (torch.cat([c[i] for c in chunks]) for i in range(4))
        pools.append(StepPool(z, z, lab, pos, img))
    return pools


def digits_grid(latents: torch.Tensor, nrow: int) -> np.ndarray:
    """``[B, 1, 8, 8]`` unscaled latents in ``[-1, 1]`` -> one ``[rows*9-1, nrow*9-1]`` image (1-pixel gaps)."""
    images = latents.detach().float().cpu().clamp(-1, 1)[:, 0].numpy()  # (B, 8, 8)
    rows = int(np.ceil(len(images) / nrow))
    grid = np.full((rows * 9 - 1, nrow * 9 - 1), np.nan)
    for j, img in enumerate(images):
        r, c = divmod(j, nrow)
        grid[r * 9 : r * 9 + 8, c * 9 : c * 9 + 8] = img
    return grid


def show(fig, out_dir: str | Path, name: str, dpi: int = 80, colors: int = 64) -> None:
    """Write ``fig`` to ``<out_dir>/<name>.png`` and display it in the notebook; close it.

    The PNG is quantized to a ``colors``-colour palette (about 4x smaller than matplotlib's RGBA output, with no
    visible loss on line plots), which keeps the executed notebooks small.
    """
    import io

    import matplotlib.pyplot as plt
    from IPython.display import Image, display
    from PIL import Image as PILImage

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    plt.close(fig)
    image = PILImage.open(buf).convert("RGB").quantize(colors=colors, method=PILImage.Quantize.MEDIANCUT)
    path = Path(out_dir) / f"{name}.png"
    image.save(path, format="PNG", optimize=True)
    display(Image(data=path.read_bytes(), format="png"))
