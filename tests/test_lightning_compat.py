"""``own_hyperparameters``: the one wrapped use of a private Lightning symbol does what nested builds rely on."""

from __future__ import annotations

import lightning as L

from lightning_ar.lightning_compat import own_hyperparameters


class _Tiny(L.LightningModule):
    def __init__(self, a: int = 1) -> None:
        super().__init__()
        self.save_hyperparameters()


def test_a_nested_module_keeps_its_own_hyperparameters() -> None:
    from lightning.pytorch.core.mixins import hparams_mixin

    token = hparams_mixin._given_hyperparameters.set({"outer": 1})  # what LightningCLI sets while instantiating
    try:
        assert dict(_Tiny(a=2).hparams) == {"outer": 1}  # the injection the wrapper exists for is still there
        with own_hyperparameters():
            assert dict(_Tiny(a=2).hparams) == {"a": 2}
        assert hparams_mixin._given_hyperparameters.get() == {"outer": 1}  # restored after the block
    finally:
        hparams_mixin._given_hyperparameters.reset(token)
