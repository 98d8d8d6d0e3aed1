"""Embedded sources and the data module: fixed disjoint splits, scale, shapes, predict labels, bad options."""

from __future__ import annotations

import pytest
import torch

from lightning_ar import DigitsSource, GMMSource, LatentDataModule


def test_digits_splits_are_fixed_disjoint_and_stratified() -> None:
    src = DigitsSource()
    sizes = {s: len(src.split(s)[1]) for s in ("train", "val", "test")}
    assert sizes == {"train": 1437, "val": 180, "test": 180}
    flat = {s: {tuple(x.flatten().tolist()) for x in src.split(s)[0]} for s in sizes}
    assert not flat["train"] & flat["test"] and not flat["val"] & flat["test"]
    assert torch.equal(src.split("test")[0], DigitsSource().split("test")[0])
    assert torch.bincount(src.split("test")[1]).min() >= 17
    x = src.split("train")[0]
    assert x.shape[1:] == (1, 8, 8) and x.min() == -1.0 and x.max() == 1.0


def test_datamodule_scale_and_batches() -> None:
    dm = LatentDataModule("digits", batch_size=8)
    train = DigitsSource().split("train")[0]
    assert dm.latent_scale == pytest.approx(1.0 / train.std().item())
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 8, 8) and y.dtype == torch.int64
    scaled = torch.cat([b[0] for b in dm.test_dataloader()])
    assert torch.allclose(scaled, DigitsSource().split("test")[0] * dm.latent_scale)


def test_predict_labels_cover_every_class_once_per_index() -> None:
    dm = LatentDataModule("gmm", batch_size=7, predict_per_class=3)
    labels, indices = map(torch.cat, zip(*dm.predict_dataloader()))
    assert indices.tolist() == list(range(12))
    assert torch.bincount(labels).tolist() == [3, 3, 3, 3]


def test_gmm_latents_match_known_distribution() -> None:
    src = GMMSource()
    x, y = src.split("train")
    assert x.shape == (4000, 4, 4, 4)
    tokens = src.to_tokens(x[y == 2]).flatten(1).double()
    assert torch.allclose(tokens.mean(0), src.means[2].flatten(), atol=0.08)
    cov = torch.cov(tokens.T)
    assert (cov - src.covariance).abs().max() < 0.06
    # exact log-density agrees with a direct formula
    d = tokens.shape[1]
    diff = tokens[:3] - src.means[2].flatten()
    direct = -0.5 * (diff @ torch.linalg.solve(src.covariance, diff.T)).diagonal() - 0.5 * (
        d * torch.log(torch.tensor(2 * torch.pi, dtype=torch.float64)) + torch.logdet(src.covariance))
    assert torch.allclose(src.log_prob(x[y == 2][:3], torch.tensor([2, 2, 2])), direct)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"source": "cifar"}, "data.source must be one of"), ({"batch_size": 0}, "data.batch_size"),
     ({"latent_scale": -1.0}, "data.latent_scale")],
)
def test_datamodule_rejects_bad_options(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LatentDataModule(**kwargs)
