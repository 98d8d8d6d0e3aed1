"""A small CNN classifier of 8x8 digits: the feature extractor of the digits FID and the judge of conditional accuracy.

The classifier is trained deterministically on the ``train`` split of :class:`~lightning_ar.data.sources.DigitsSource`
in a few seconds on a CPU and cached on disk (see :func:`load_or_train_digits_classifier`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ar.data.sources import DigitsSource
from lightning_ar.seeding import seeded_generator

log = logging.getLogger(__name__)

#: Tag of the architecture and training recipe; bump it whenever either changes so that cached weights are retrained.
RECIPE_VERSION = "cnn32-64-64_f64_e20_shift1_1thread_v1"
CACHE_ENV = "LIGHTNING_AR_CACHE"


class DigitsClassifier(nn.Module):
    """CNN on ``[B, 1, 8, 8]`` digit images in ``[-1, 1]`` giving logits ``[B, 10]``.

    Args:
        num_features: Width of the penultimate layer returned by :meth:`features`.
        num_classes: Number of output classes.
    """

    def __init__(self, num_features: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.num_features = num_features
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 64, 4, 4)
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 64, 2, 2)
            nn.Flatten(), nn.Linear(64 * 4, num_features), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(num_features, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate-layer features ``[B, num_features]`` of images ``[B, 1, 8, 8]``."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, 8, 8):
            raise ValueError(f"DigitsClassifier expects images [B, 1, 8, 8], got {tuple(x.shape)}")
        return self.body(x.to(self.head.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` of images ``[B, 1, 8, 8]``."""
        return self.head(self.features(x))


def random_shift(images: Tensor, generator: torch.Generator, max_shift: int = 1) -> Tensor:
    """Shift each image ``[B, 1, H, W]`` by up to ``max_shift`` pixels per axis, filling with background ``-1``."""
    b, _, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)  # (B, 1, H + 2s, W + 2s)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b, 1), generator=generator)  # (B, 1) each
    rows = torch.arange(h) + dy  # (B, H)
    cols = torch.arange(w) + dx  # (B, W)
    return padded[torch.arange(b)[:, None, None], 0, rows[:, :, None], cols[:, None, :]][:, None]  # (B, 1, H, W)


def _train_loop(model: DigitsClassifier, x: Tensor, y: Tensor, epochs: int, gen: torch.Generator) -> None:
    """Adam with a cosine learning rate over ``epochs`` of shuffled, randomly shifted mini-batches of 64."""
    batch_size = 64
    steps = epochs * -(-len(y) // batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(batch_size):
            loss = F.cross_entropy(model(random_shift(x[idx], gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def train_digits_classifier(source: DigitsSource | None = None, epochs: int = 20, seed: int = 0) -> DigitsClassifier:
    """Train a :class:`DigitsClassifier` on the ``train`` split only, deterministically.

    The global RNG state is left untouched (training runs under ``torch.random.fork_rng``; shuffling and
    augmentation draw from a seeded ``torch.Generator``). Training uses one intra-op thread (restored afterwards):
    the result does not depend on the core count, and this tiny model trains much faster on one thread than on
    several contended ones.

    Args:
        source: The digits source (default ``DigitsSource()``).
        epochs: Passes over the train split.
        seed: Seed of the initialization, the shuffling and the augmentation.

    Returns:
        The trained classifier on the CPU, in eval mode, parameters frozen.
    """
    source = source if source is not None else DigitsSource()
    x, y = source.split("train")  # (N, 1, 8, 8), (N,)
    start, threads = time.perf_counter(), torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        # may be called inside a validation/test loop: training needs autograd whatever the caller's mode
        with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
            torch.manual_seed(seed)
            model = DigitsClassifier()
            _train_loop(model, x, y, epochs, seeded_generator(seed))
    finally:
        torch.set_num_threads(threads)
    log.info("trained the digits classifier in %.1f s", time.perf_counter() - start)
    return model.requires_grad_(False)


@torch.no_grad()
def classifier_accuracy(model: DigitsClassifier, images: Tensor, labels: Tensor) -> float:
    """Fraction of images ``[N, 1, 8, 8]`` that ``model`` assigns to their ``labels`` ``[N]``."""
    device = model.head.weight.device
    return (model(images.to(device)).argmax(-1) == labels.to(device)).float().mean().item()


def _cache_path(cache_dir: str | Path | None, source: DigitsSource) -> Path:
    """Path of the cached weights: the recipe version and the split seed are part of the name."""
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lightning_ar"
    return Path(cache_dir).expanduser() / f"digits_classifier_{RECIPE_VERSION}_split{source.seed}.pt"


def _try_load(path: Path) -> DigitsClassifier | None:
    """The classifier stored at ``path``, or ``None`` when it is missing, unreadable or from another recipe."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload["version"] != RECIPE_VERSION:
            return None
        model = DigitsClassifier()
        model.load_state_dict(payload["state_dict"])
    except FileNotFoundError:
        return None
    except Exception as err:  # corrupt or truncated file, foreign content: retrain
        log.warning("ignoring unreadable digits classifier cache %s (%s); retraining", path, err)
        return None
    return model.eval().requires_grad_(False)


def _save_atomic(model: DigitsClassifier, path: Path) -> None:
    """Write the weights to a temporary file next to ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"version": RECIPE_VERSION, "state_dict": model.state_dict()}, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_or_train_digits_classifier(
    cache_dir: str | Path | None = None, source: DigitsSource | None = None
) -> DigitsClassifier:
    """Load the cached digits classifier, or train it and cache it.

    Args:
        cache_dir: Cache directory; default ``$LIGHTNING_AR_CACHE`` or ``~/.cache/lightning_ar``.
        source: The digits source whose train split trains the classifier (default ``DigitsSource()``); its split
            seed is part of the file name, so that a classifier never sees another split's test images.

    Returns:
        The classifier on the CPU, in eval mode, parameters frozen.
    """
    source = source if source is not None else DigitsSource()
    path = _cache_path(cache_dir, source)
    model = _try_load(path)
    if model is None:
        model = train_digits_classifier(source)
        _save_atomic(model, path)
    return model
