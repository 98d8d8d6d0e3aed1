"""Reliability, non-finite losses: a NaN batch is detected at its step; ``skip`` leaves the model untouched, ``stop``
names the step and the last good checkpoint; the shipped configs stop."""

from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_ar import MARGenerator
from lightning_ar.callbacks import NonFiniteLoss, NonFiniteLossError
from lightning_ar.cli import main
from lightning_ar.data.sources import DigitsSource

REPO = Path(__file__).resolve().parents[2]

TINY = dict(width=16, encoder_depth=1, decoder_depth=1, num_heads=2, head_width=16, head_depth=1, num_iter=2,
            num_sampling_steps=2, dropout=0.0)
BAD_BATCH = 2


def _loader() -> DataLoader:
    latents = torch.randn(5 * 4, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    latents[BAD_BATCH * 4] = float("nan")  # one NaN item poisons batch BAD_BATCH
    return DataLoader(TensorDataset(latents, torch.arange(20) % 3), batch_size=4)


class Snapshot(Callback):
    """Parameters and AdamW step counts just before and after the bad batch."""

    def __init__(self) -> None:
        self.before = self.after = None

    @staticmethod
    def _state(trainer, module) -> tuple[dict, list]:
        optim = trainer.optimizers[0]
        steps = [float(s["step"]) for s in optim.state.values()]
        return {k: v.clone() for k, v in module.state_dict().items()}, steps

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == BAD_BATCH:
            self.before = self._state(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if batch_idx == BAD_BATCH:
            self.after = self._state(trainer, module)


def _fit(tmp_path, policy: str, *callbacks: Callback) -> tuple[L.Trainer, MARGenerator]:
    torch.manual_seed(0)
    model = MARGenerator(latent_shape=(1, 4, 4), num_classes=3, **TINY)
    trainer = L.Trainer(
        max_steps=5, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[NonFiniteLoss(policy), ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True),
                   *callbacks],
    )
    trainer.fit(model, _loader())
    return trainer, model


def test_skip_leaves_weights_and_optimizer_untouched_and_counts(tmp_path) -> None:
    snap = Snapshot()
    trainer, model = _fit(tmp_path, "skip", snap)
    guard = next(c for c in trainer.callbacks if isinstance(c, NonFiniteLoss))
    assert guard.skipped == 1
    assert trainer.global_step == 5
    (w0, s0), (w1, s1) = snap.before, snap.after
    assert all(torch.equal(w0[k], w1[k]) for k in w0), "the NaN step changed weights"
    assert s0 == s1, "the NaN step advanced AdamW"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert trainer.callback_metrics["train/nonfinite_skipped"] == 1


def test_stop_names_step_and_last_checkpoint(tmp_path) -> None:
    with pytest.raises(NonFiniteLossError, match=rf"step {BAD_BATCH}\b.*last good checkpoint: .*last\.ckpt"):
        _fit(tmp_path, "stop")
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert state["global_step"] == BAD_BATCH
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())


def test_policy_is_validated() -> None:
    with pytest.raises(ValueError, match="NonFiniteLoss.policy"):
        NonFiniteLoss("ignore")


class NaNDigits(DigitsSource):
    """The digits with NaN in every training item (stands in for a corrupted cache shard)."""

    def split(self, name):
        latents, labels = super().split(name)
        return (torch.full_like(latents, float("nan")) if name == "train" else latents), labels


def test_shipped_config_stops_on_a_nan_loss(tmp_path: Path, capsys) -> None:
    """Before: NaN data trained 20 steps into all-NaN weights with exit code 0. The shipped configs carry
    ``NonFiniteLoss(policy: stop)``: exit 1 at the first step, naming it and the last good checkpoint."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs/digits/mar.yaml"), "--config", str(REPO / "configs/debug.yaml"),
              "--data.source", "{class_path: test_reliability_nonfinite.NaNDigits}", "--data.latent_scale", "1.0",
              "--trainer.max_steps", "20", "--trainer.limit_train_batches", "1.0", "--trainer.limit_val_batches", "0",
              "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
              "--trainer.enable_progress_bar", "false"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert re.search(r"non-finite training loss or gradient at step 0 .*last good checkpoint: none saved", err), err
    assert not list(tmp_path.rglob("*.ckpt"))
