"""``ConditionBank``: ideal (teacher-forced) conditions per AR step, the target of every refinement."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_ar.nn.labelled_conditions import LabelledConditions


class ConditionBank(nn.Module):
    """Ideal conditions per bucket (AR step), filled by reservoir sampling; saved with the holder's state_dict.

    Buffers: ``conditions`` ``[num_buckets, capacity, D]`` float32, ``labels`` and ``positions``
    ``[num_buckets, capacity]`` long, ``count`` ``[num_buckets]`` (filled slots) and ``seen`` ``[num_buckets]``
    (items offered so far); with ``context_dim > 0`` also ``context`` ``[num_buckets, capacity, Fc]``, the context
    feature of each condition (:mod:`lightning_ar.nn.context_features`), kept in the same slot.
    """

    def __init__(self, num_buckets: int, capacity: int, dim: int, context_dim: int = 0) -> None:
        """Create an empty bank.

        Args:
            num_buckets: Number of buckets (one per AR step).
            capacity: Conditions kept per bucket.
            dim: Condition dimension ``D``.
            context_dim: Context feature dimension ``Fc`` stored beside each condition (0: none).
        """
        super().__init__()
        for name, value in (("num_buckets", num_buckets), ("capacity", capacity), ("dim", dim)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.register_buffer("conditions", torch.zeros(num_buckets, capacity, dim))
        self.register_buffer("labels", torch.zeros(num_buckets, capacity, dtype=torch.long))
        self.register_buffer("positions", torch.zeros(num_buckets, capacity, dtype=torch.long))
        self.register_buffer("count", torch.zeros(num_buckets, dtype=torch.long))
        self.register_buffer("seen", torch.zeros(num_buckets, dtype=torch.long))
        if context_dim < 0:
            raise ValueError(f"context_dim must be >= 0, got {context_dim}")
        self.context_dim = context_dim
        if context_dim:
            self.register_buffer("context", torch.zeros(num_buckets, capacity, context_dim))

    @property
    def num_buckets(self) -> int:
        """Number of buckets (AR steps)."""
        return self.conditions.shape[0]

    @property
    def capacity(self) -> int:
        """Conditions kept per bucket."""
        return self.conditions.shape[1]

    @property
    def dim(self) -> int:
        """Condition dimension ``D``."""
        return self.conditions.shape[2]

    def _check_bucket(self, bucket: int) -> None:
        if not 0 <= bucket < self.num_buckets:
            raise ValueError(f"bucket must be in [0, {self.num_buckets - 1}], got {bucket}")

    def _slots(self, bucket: int, n: int, generator: torch.Generator | None) -> Tensor:
        """Algorithm R slot of each of ``n`` offered items (``-1``: not kept), ``[n]``."""
        t = int(self.seen[bucket]) + torch.arange(n, dtype=torch.float64)  # (n,) 0-based offer index
        device = generator.device if generator is not None else "cpu"
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64).cpu()  # (n,)
        slots = torch.where(t < self.capacity, t, torch.floor(u * (t + 1))).long()  # (n,)
        return torch.where(slots < self.capacity, slots, -1).to(self.count.device)

    def add(
        self, bucket: int, z: Tensor, labels: Tensor, positions: Tensor, generator: torch.Generator | None = None,
        context: Tensor | None = None,
    ) -> None:
        """Offer ``z`` ``[n, D]`` with ``labels`` ``[n]`` and ``positions`` ``[n]`` to ``bucket`` (reservoir sampling).

        Every item offered to a bucket ends up in it with equal probability ``min(1, capacity / seen)``. A bank with
        ``context_dim > 0`` needs the items' ``context`` ``[n, Fc]`` (and one without refuses it).
        """
        self._check_bucket(bucket)
        self.check_compatible(z.shape[-1], self.num_buckets)
        if (context is None) != (self.context_dim == 0) or (context is not None and context.shape != (len(z),
                                                                                                    self.context_dim)):
            raise ValueError(f"this bank stores context features of dimension {self.context_dim}; got "
                             f"{None if context is None else tuple(context.shape)} for {len(z)} conditions")
        slots = self._slots(bucket, len(z), generator)  # (n,)
        items = torch.arange(len(z), device=slots.device)[slots >= 0]
        winner = torch.full((self.capacity,), -1, dtype=torch.long, device=slots.device)
        winner.scatter_reduce_(0, slots[slots >= 0], items, reduce="amax")  # last offer wins, as in sequence
        filled = (winner >= 0).nonzero().squeeze(1)  # (f,)
        src = winner[filled].to(z.device)
        self.conditions[bucket, filled] = z.detach()[src].to(self.conditions)
        self.labels[bucket, filled] = labels[src].to(self.labels)
        self.positions[bucket, filled] = positions[src].to(self.positions)
        if context is not None:
            self.context[bucket, filled] = context.detach()[src].to(self.context)
        self.seen[bucket] += len(z)
        self.count[bucket] = torch.clamp(self.seen[bucket], max=self.capacity)

    def get(self, bucket: int) -> LabelledConditions:
        """Copy of the filled part of ``bucket``: conditions ``[c, D]``, labels ``[c]``, positions ``[c]``."""
        self._check_bucket(bucket)
        c = int(self.count[bucket])
        if c == 0:
            raise ValueError(f"ConditionBank bucket {bucket} is empty; fill it (OTRefinement.fit) before refining")
        return LabelledConditions(self.conditions[bucket, :c].clone(), self.labels[bucket, :c].clone(),
                                  self.positions[bucket, :c].clone())

    def context_of(self, bucket: int) -> Tensor:
        """Copy of the context features ``[c, Fc]`` of the filled part of ``bucket`` (same order as :meth:`get`)."""
        if self.context_dim == 0:
            raise ValueError("this ConditionBank stores no context features (context_dim=0)")
        self.get(bucket)  # checks the bucket and that it is filled
        return self.context[bucket, : int(self.count[bucket])].clone()

    def sample(self, bucket: int, n: int, generator: torch.Generator | None = None) -> LabelledConditions:
        """Random subset of ``min(n, count)`` entries of ``bucket``, without replacement."""
        z, labels, positions = self.get(bucket)
        if n >= len(z):
            return LabelledConditions(z, labels, positions)
        device = generator.device if generator is not None else "cpu"
        idx = torch.randperm(len(z), generator=generator, device=device)[:n].to(z.device)  # (n,)
        return LabelledConditions(z[idx], labels[idx], positions[idx])

    def check_compatible(self, dim: int, num_buckets: int) -> None:
        """Raise ``ValueError`` unless the bank matches a generator's condition ``dim`` and AR step count."""
        if dim != self.dim:
            raise ValueError(f"bank has dimension {self.dim} but the generator's conditions have {dim}")
        if num_buckets != self.num_buckets:
            raise ValueError(f"bank has {self.num_buckets} buckets but the generator has {num_buckets} AR steps")
