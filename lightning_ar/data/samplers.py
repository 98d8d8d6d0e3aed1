"""Samplers whose order depends on ``(seed, epoch)`` and on nothing else, for exact resume and N-process equality.

Both are ``DistributedSampler`` subclasses, so Lightning keeps them under DDP (it only replaces plain samplers) and
calls their ``set_epoch`` at every epoch start, also after resuming from a checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import Dataset, DistributedSampler


def shuffled_sampler(dataset: Dataset, world: int, rank: int, seed: int) -> DistributedSampler:
    """The training order: a permutation seeded by ``seed + epoch`` (independent of the global RNG), sharded."""
    return DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)


class BlockSampler(DistributedSampler):
    """Sequential order, sharded by whole blocks: block ``k`` = indices ``[k*B, (k+1)*B)`` goes to rank ``k % world``.

    With ``batch_size=B`` every batch is the same index block whatever the number of processes, so anything seeded
    per batch (``predict_step`` seeds generation by the batch's first index) gives the 1-process result. No index is
    repeated or dropped; ranks may get one block more than others.

    Args:
        dataset: The dataset (only its length is used).
        block_size: ``B``, the DataLoader's batch size.
        num_replicas: Number of processes.
        rank: This process.
    """

    def __init__(self, dataset: Dataset, block_size: int, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size, self.length = block_size, len(dataset)

    def _blocks(self) -> range:
        num_blocks = -(-self.length // self.block_size)
        return range(self.rank, num_blocks, self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        for k in self._blocks():
            yield from range(k * self.block_size, min((k + 1) * self.block_size, self.length))

    def __len__(self) -> int:
        return sum(min((k + 1) * self.block_size, self.length) - k * self.block_size for k in self._blocks())
