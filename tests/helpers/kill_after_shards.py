"""Run ``lightning-ar`` with every process SIGKILLing its process group after writing N shards (a killed job).

    KILL_AFTER_SHARDS=N python tests/helpers/kill_after_shards.py cache --image_dir ... --devices 2 --strategy ddp

Lightning's DDP launcher starts the other ranks by running this script again (same arguments, same environment), so
the patch applies on every rank.
"""

from __future__ import annotations

import os
import signal

from lightning_ar.cli import main
from lightning_ar.data.cache import ShardWriter


def patch(after: int) -> None:
    """Make ``ShardWriter`` kill the process group once it has written ``after`` shards."""
    write = ShardWriter.write_on_batch_end

    def write_then_maybe_kill(self, *args, **kwargs) -> None:
        write(self, *args, **kwargs)
        if self.written >= after:
            os.killpg(os.getpgrp(), signal.SIGKILL)

    ShardWriter.write_on_batch_end = write_then_maybe_kill


if __name__ == "__main__":
    patch(int(os.environ["KILL_AFTER_SHARDS"]))
    main()
