"""Crash-safe checkpoints: Lightning's checkpoint I/O writing each file atomically (``segvoc.files``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from segvoc.errors import SegvocError
from segvoc.files import atomic_save

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint I/O that never leaves a truncated checkpoint behind.

    ``save_checkpoint`` writes into ``.<name>.<random>.tmp`` in the target's folder, flushes and fsyncs it, then
    renames it over the target: a kill at any moment leaves the previous file or the new one, complete. The temporary
    file is removed when the write fails; one left by a kill (never named ``*.ckpt``) is removed by the next
    successful save of the same name. An ``OSError`` (disk full, no permission, folder cannot be made) becomes a
    ``SegvocError`` naming the folder. Remote (``scheme://``) paths are left to ``TorchCheckpointIO``.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = Path(path)
        try:
            atomic_save(target, lambda f: torch.save(checkpoint, f))
        except OSError as exc:
            raise SegvocError(
                f"Cannot write the checkpoint {target.name} into {target.parent}: {exc.strerror or exc}. Free some "
                "disk space there and check that you may write to it, or write the run elsewhere with "
                "hydra.run.dir=/other/folder."
            ) from exc
