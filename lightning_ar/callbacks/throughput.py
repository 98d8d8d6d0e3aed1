"""``batch_size``: the ``batch_size_fn`` of Lightning's ``ThroughputMonitor`` for this project's batches.

Training/validation/test batches are ``(latents [B, C, H, W], labels [B])`` and ``predict`` batches ``(labels [B],
indices [B])``; both have ``B`` samples. In YAML::

    - class_path: lightning.pytorch.callbacks.ThroughputMonitor
      init_args:
        batch_size_fn: lightning_ar.callbacks.batch_size

logs ``train/batches_per_sec``, ``train/samples_per_sec`` and per device ``train/device/samples_per_sec`` (also for
``validate``/``test``/``predict``) every ``log_every_n_steps``, as rolling averages over the last ``window_size``
batches (Lightning's ``Throughput``). It is logged by process 0, which assumes equal batch sizes on all processes.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def batch_size(batch: Sequence[Tensor] | Tensor) -> int:
    """Samples in a batch: the leading dimension of its first tensor."""
    first = batch if isinstance(batch, Tensor) else batch[0]
    return int(first.shape[0])
