"""Every code block of the README is executed, so the README cannot drift.

:data:`BLOCKS` lists each block (by its first line) with how it is checked; :func:`test_every_readme_block_is_checked`
fails when a block is added, removed or reordered without updating that table. The commands run in-process through
``lightning_ar.cli.main`` in a scratch folder whose ``configs`` links to the repository's, so relative paths work as
written. Training blocks get a small budget (the debug overlays); ImageNet blocks run on tiny stand-ins (a 16-channel
LDM KL checkpoint, a 3-class ImageFolder of 32 px PNGs, a tiny official-layout MAR checkpoint, random Inception
weights), with only the options named in :data:`BLOCKS` changed. Multi-node launchers (torchrun, srun) cannot run
here: their ``lightning-ar`` arguments are parsed and instantiated (``run=False``), and the one-node ``fit`` of the
same config is run.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_ar.cli import build_cli, main

REPO = Path(__file__).resolve().parents[1]
DEBUG, DEBUG_REFINE = str(REPO / "configs/debug.yaml"), str(REPO / "configs/debug_refine.yaml")
QUIET = ["--trainer.enable_progress_bar", "false"]
CPU = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.strategy", "auto",
       "--trainer.precision", "32-true"]
CLASSES, PER_CLASS, SIZE = ("ant", "bee", "cat"), 4, 32

# (first line of the block, how the test checks it), in README order
BLOCKS = [
    ("make demo", "make -n shows both targets' commands; the demo driver itself runs (`lightning-ar demo --debug`) in "
                  "test_demo.py and from an installed wheel in test_package.py; `make test` is CI's own command"),
    ("lightning-ar fit     --config configs/digits/mar.yaml", "each line executed with configs/debug.yaml appended; "
                                                              "`...` is the checkpoint the first line wrote"),
    ("lightning-ar fit  --config configs/digits/refine.yaml", "executed with configs/debug_refine.yaml; GEN.ckpt and "
                                                              "REFINE.ckpt are the checkpoints written before"),
    ("import lightning as L", "exec'd with max_steps=5000 lowered to 3 and the test stage limited to one batch"),
    ("make install", "make -n shows each target's commands (install, test, lint); CI runs them for real"),
    ("lightning-ar convert-vae", "executed on a tiny 16-channel LDM KL checkpoint and a 3-class ImageFolder; the cache "
                                 "at 32 px on one CPU device"),
    ("torchrun --nnodes 4", "the arguments after `-m lightning_ar.cli` parsed and instantiated on the tiny cache "
                            "(4 nodes x 8 devices); the one-node `fit` of the text executed on it"),
    ("srun lightning-ar fit", "as the torchrun block: parsed and instantiated (without srun)"),
    ("lightning-ar import-mar", "executed on a tiny official-layout checkpoint, MAR_SIZES['base'] standing for its "
                                "size (= the debug overlay's model)"),
    ("lightning-ar fit --config configs/imagenet256/refine_mar_base.yaml", "executed with configs/debug_refine.yaml "
                                                                           "on the tiny cache and the tiny import"),
    ("srun lightning-ar predict", "executed without srun on one CPU device with the debug model (= the tiny import), "
                                  "2 AR steps, 2 samples per class; then `lightning-ar evaluate` "
                                  "of its samples against a stand-in reference batch (arr_0, mu, sigma) with random "
                                  "Inception weights"),
]


def readme_blocks() -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block of the README, in order."""
    return re.findall(r"^```(\w+)\n(.*?)^```", (REPO / "README.md").read_text(), flags=re.S | re.M)


def commands(code: str) -> list[str]:
    """The shell lines of a block, continuation lines joined."""
    return [line.strip() for line in code.replace("\\\n", " ").splitlines() if line.strip()]


def block(first_line: str) -> str:
    """The code of the README block that starts with ``first_line``."""
    found = [code for _, code in readme_blocks() if code.startswith(first_line)]
    assert len(found) == 1, f"README block starting {first_line!r}: found {len(found)}"
    return found[0]


@contextmanager
def working_dir(path: Path) -> Iterator[None]:
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def run(line: str, *extra: str, replace: dict[str, str] | None = None) -> None:
    """One README command line through ``lightning_ar.cli.main`` (``srun`` dropped), ``extra`` appended."""
    for old, new in (replace or {}).items():
        line = line.replace(old, new)
    argv = shlex.split(line, comments=True)
    argv = argv[1:] if argv[0] == "srun" else argv
    assert argv[0] == "lightning-ar", line
    main(argv[1:] + list(extra))


def scratch(root: Path) -> Path:
    """A folder where the README's relative ``configs/...`` paths resolve."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "configs").symlink_to(REPO / "configs")
    return root


def test_every_readme_block_is_checked() -> None:
    firsts = [code.splitlines()[0] for _, code in readme_blocks()]
    assert len(firsts) == len(BLOCKS), f"README has {len(firsts)} blocks, BLOCKS lists {len(BLOCKS)}: {firsts}"
    for first, (expected, how) in zip(firsts, BLOCKS):
        assert first.startswith(expected), (first, expected)
        assert how
    assert [lang for lang, _ in readme_blocks()].count("python") == 1


def _dry_run(target: str) -> str:
    return subprocess.run(["make", "-n", "-B", target], cwd=REPO, capture_output=True, text=True, check=True).stdout


def test_step_5_states_the_protocol() -> None:
    text = (REPO / "README.md").read_text()
    step5 = text[text.index("**5. Evaluate**"): text.index("Cost, measured on one H200")]
    for phrase in ("published protocol", "50,000", "VIRTUAL_imagenet256_labeled.npz", "`mu`/`sigma`", "pool_3",
                   "--reference-stats", "fid_reference", "*Comparable*", "*Not comparable*", "2.31", "281.7"):
        assert phrase in step5, phrase


def test_make_targets_exist() -> None:
    quick, development = commands(block("make demo")), commands(block("make install"))
    assert [shlex.split(line, comments=True) for line in quick] == [["make", "demo"], ["make", "test"]]
    assert [shlex.split(line, comments=True) for line in development] == [["make", t] for t in ("install", "test",
                                                                                                  "lint")]
    assert "-m lightning_ar.demo" in _dry_run("demo") and "-m pytest" in _dry_run("test")
    assert "pip install" in _dry_run("install") and ".[dev]" in _dry_run("install")
    assert "ruff check" in _dry_run("lint")


# ------------------------------------------------------------------------------------------------- digits blocks
@pytest.mark.slow
def test_cli_blocks_run(tmp_path: Path) -> None:
    root = scratch(tmp_path / "cli")
    with working_dir(root):
        lines = commands(block("lightning-ar fit     --config configs/digits/mar.yaml"))
        fit, test, predict, gmm, debug_fit, print_config = lines
        run(fit, "--config", DEBUG, *QUIET)
        ckpt = root / "outputs/digits/mar/version_0/checkpoints/last.ckpt"
        assert ckpt.is_file() and str(ckpt.relative_to(root)) in test  # the path the README names
        run(test, "--config", DEBUG, *QUIET)
        run(predict, "--config", DEBUG, *QUIET, replace={"...": str(ckpt)})
        assert list((root / "outputs/digits/mar").glob("version_*/predictions/samples_rank0_batch*.npz"))
        run(gmm, "--config", DEBUG, *QUIET)
        run(debug_fit, *QUIET)
        with pytest.raises(SystemExit) as printed:
            run(print_config)
        assert printed.value.code in (0, None)
        refine_fit, refine_test = commands(block("lightning-ar fit  --config configs/digits/refine.yaml"))
        run(refine_fit, "--config", DEBUG_REFINE, *QUIET, replace={"GEN.ckpt": str(ckpt)})
        refined = root / "outputs/digits/refine/version_0/checkpoints/last.ckpt"
        run(refine_test, "--config", DEBUG_REFINE, *QUIET, replace={"GEN.ckpt": str(ckpt), "REFINE.ckpt": str(refined)})
        assert list((root / "outputs/digits/refine").glob("version_*/results.md"))


@pytest.mark.slow
def test_python_block_runs(tmp_path: Path) -> None:
    code = block("import lightning as L")
    assert "max_steps=5000" in code  # the budget override below must find what it replaces
    code = code.replace("max_steps=5000", "max_steps=3, limit_test_batches=1, enable_progress_bar=False")
    namespace: dict = {}
    with working_dir(scratch(tmp_path / "python")):
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["latents"].shape == (3, 1, 8, 8) and torch.isfinite(namespace["latents"]).all()
    assert list((tmp_path / "python" / "lightning_logs").glob("version_*/results.md"))


# ----------------------------------------------------------------------------------------------- ImageNet blocks
def _stand_ins(root: Path) -> None:
    """MAR's KL-16 checkpoint and ImageNet, in miniature, where the README's commands expect them."""
    from helpers.ldm_reference import LDMAutoencoderKL

    torch.manual_seed(0)
    vae = LDMAutoencoderKL(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z=16, encoder_attn={2}, decoder_attn=set())
    (root / "pretrained_models/vae").mkdir(parents=True)
    torch.save({"model": vae.state_dict()}, root / "pretrained_models/vae/kl16.ckpt")  # MAR's kl16.ckpt layout
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / "imagenet/train" / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "imagenet/train" / name / f"{i}.png")


def _tiny_official(root: Path) -> None:
    """A MAR-layout checkpoint of the debug overlay's model size for the tiny cache (16x8x8 latents, 64 tokens)."""
    from helpers.official_mar import random_official

    layout = dict(width=32, depth=1, head_width=32, head_depth=1, token_dim=16, seq_len=64, buffer=64,
                  classes=len(CLASSES))
    folder = root / "pretrained_models/mar/mar_base"
    folder.mkdir(parents=True)
    torch.save({"model": random_official(0, **layout), "model_ema": random_official(1, **layout)},
               folder / "checkpoint-last.pth")


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Steps 1 and 3 of "ImageNet scale" executed on the stand-ins: convert-vae, cache, import-mar."""
    from lightning_ar.checkpoints import MARSize, import_mar

    root = scratch(tmp_path_factory.mktemp("imagenet"))
    _stand_ins(root)
    _tiny_official(root)
    convert, cache = commands(block("lightning-ar convert-vae"))
    data = {"/data/imagenet/train": str(root / "imagenet/train"), "/data/in256": str(root / "in256")}
    with working_dir(root), pytest.MonkeyPatch.context() as patch:
        run(convert)
        run(cache, "--image_size", str(SIZE), "--batch_size", "4", "--num_workers", "0", "--shard_size", "5",
            "--devices", "1", "--strategy", "auto", "--accelerator", "cpu", replace=data)
        patch.setitem(import_mar.MAR_SIZES, "base", MARSize(32, 1, 2, 32, 1, 2.9))  # the debug overlay's model
        run(block("lightning-ar import-mar").strip())
    return root


def _data(root: Path) -> dict[str, str]:
    return {"/data/in256": str(root / "in256")}


@pytest.mark.slow
def test_stand_in_cache_and_import(imagenet: Path) -> None:
    from lightning_ar.data.shards import validate_cache

    meta = validate_cache(imagenet / "in256")
    assert (meta.num_items, meta.latent_shape, meta.class_names) == (12, (16, 8, 8), list(CLASSES))
    state = torch.load(imagenet / "mar_base.ckpt", weights_only=False)
    assert state["hyper_parameters"]["latent_shape"] == (16, 8, 8) and state["hyper_parameters"]["cfg"] == 2.9


@pytest.mark.slow
def test_training_blocks(imagenet: Path) -> None:
    """Step 2: the one-node fit runs; the torchrun and srun argument lists build the same run at 4 x 8 devices."""
    one_node = "lightning-ar fit --config configs/imagenet256/mar_base.yaml --data.cache_dir /data/in256"
    assert f"One node: `{one_node}`" in (REPO / "README.md").read_text().replace("\n", " ")
    small = ["--config", DEBUG, *CPU, "--data.val_fraction", "0.5", "--data.num_workers", "0",
             "--trainer.limit_val_batches", "1.0", *QUIET]
    with working_dir(imagenet):
        run(one_node, *small, replace=_data(imagenet))
        assert list((imagenet / "outputs/imagenet256/mar_base").glob("version_*/checkpoints/last.ckpt"))
        assert list((imagenet / "outputs/imagenet256/mar_base").glob("version_*/samples/val_epoch000.png"))
        launched = [commands(block("torchrun --nnodes 4"))[0], commands(block("srun lightning-ar fit"))[0]]
        for line in launched:
            argv = shlex.split(line.replace("/data/in256", str(imagenet / "in256")))
            argv = argv[argv.index("fit") + 1:]  # after `-m lightning_ar.cli` / `srun lightning-ar`
            cli = build_cli(argv + ["--config", DEBUG], run=False)
            assert (cli.trainer.num_nodes, cli.trainer.num_devices, cli.trainer.world_size) == (4, 8, 32)
            assert cli.model.hparams.base_lr == 1e-4 and cli.datamodule.latent_shape == (16, 8, 8)


@pytest.mark.slow
def test_refine_block(imagenet: Path) -> None:
    line = commands(block("lightning-ar fit --config configs/imagenet256/refine_mar_base.yaml"))[0]
    with working_dir(imagenet):
        run(line, "--config", DEBUG_REFINE, *CPU, "--data.val_fraction", "0.5", "--data.num_workers", "0",
            "--trainer.limit_val_batches", "1.0", *QUIET, replace=_data(imagenet))
    assert list((imagenet / "outputs/imagenet256/refine_mar_base").glob("version_*/checkpoints/last.ckpt"))


def _reference_batch(root: Path, weights: Path) -> None:
    """A stand-in ``VIRTUAL_imagenet256_labeled.npz``: ``arr_0`` images plus ``mu``/``sigma`` of their pool_3
    features (the full-rank covariance ADM's would have, from many more images)."""
    from lightning_ar.metrics import InceptionFeatures

    images = np.stack([np.asarray(Image.open(p)) for p in sorted((root / "imagenet/train").rglob("*.png"))])
    with torch.no_grad():
        features = InceptionFeatures(weights_path=weights)(torch.from_numpy(images).permute(0, 3, 1, 2))[0].double()
    mu, sigma = features.mean(0).numpy(), np.cov(features.numpy(), rowvar=False) + 1e-2 * np.eye(2048)
    np.savez(root / "VIRTUAL_imagenet256_labeled.npz", arr_0=images, mu=mu, sigma=sigma)


def _predict(root: Path, ckpt: str) -> Path:
    """Step 5's ``predict`` line (``mar_base.ckpt`` replaced by ``ckpt``); returns the gathered ADM ``.npz``."""
    predict = commands(block("srun lightning-ar predict"))[0]
    with working_dir(root):
        run(predict, "--config", DEBUG, *CPU, "--data.predict_per_class", "2", "--model.init_args.num_iter", "2",
            "--trainer.limit_predict_batches", "1.0", "--data.num_workers", "0", *QUIET,
            replace={**_data(root), "mar_base.ckpt": ckpt})
    return root / "samples/mar_base/samples.npz"


@pytest.mark.slow
def test_evaluation_block(imagenet: Path) -> None:
    """Step 5: predict the ADM samples from the imported checkpoint, then score them by the published protocol
    (stored mu/sigma)."""
    from helpers.inception import random_inception_weights

    with np.load(_predict(imagenet, "mar_base.ckpt")) as samples:
        assert samples["arr_0"].shape == (2 * len(CLASSES), SIZE, SIZE, 3)
    weights = imagenet / "inception.pth"
    random_inception_weights(weights)
    _reference_batch(imagenet, weights)
    evaluate = commands(block("srun lightning-ar predict"))[1]
    with working_dir(imagenet):
        run(evaluate, "--inception-weights", str(weights), "--device", "cpu", "--batch-size", "8")
    results = json.loads((imagenet / "samples/mar_base/eval.json").read_text())
    assert results["fid_reference"] == "mu/sigma of VIRTUAL_imagenet256_labeled.npz"
    assert results["num_samples"] == 2 * len(CLASSES)
    assert all(math.isfinite(results[k]) for k in ("fid", "is", "precision", "recall", "fid_floor"))
