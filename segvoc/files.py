"""Writing files so that a crash or a kill never leaves a half-written one: the one temp-file + fsync + rename."""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO


def _fsync_folder(folder: Path) -> None:
    # The rename is durable only once the folder's entry reaches the disk. Some filesystems (and Windows) cannot
    # fsync a folder; that weakens durability after a power cut, never the atomicity of the rename.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def temp_name(target: Path) -> Path:
    """The hidden temporary file next to ``target`` that ``atomic_write`` writes first: ``.<name>.<random>.tmp``."""
    return target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"


def remove_stale_temps(target: Path) -> None:
    """Delete the temporary files of ``target`` that a killed write left behind."""
    pattern = os.path.join(glob.escape(str(target.parent)), f".{glob.escape(target.name)}.*.tmp")
    for stale in glob.glob(pattern):
        with contextlib.suppress(OSError):
            os.remove(stale)


@contextlib.contextmanager
def atomic_open(target: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``target`` for writing; on a clean exit flush, fsync and rename it over
    ``target``, so readers see the old file or the new one, complete. On an exception the temporary file is removed
    and the exception propagates (``OSError`` as it came: callers name the folder in their message). Temporary
    files of earlier killed writes to ``target`` are removed after a successful one."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(target)
    try:
        with open(tmp, mode.replace("w", "x")) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(target.parent)
    remove_stale_temps(target)


def atomic_write_text(target: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``target`` atomically (see ``atomic_open``); return the path."""
    with atomic_open(target, "w") as f:
        f.write(text)
    return Path(target)


def atomic_save(target: str | Path, write: Callable[[IO], None]) -> Path:
    """Call ``write(file)`` on a binary temporary file and move it over ``target`` atomically; return the path."""
    with atomic_open(target, "wb") as f:
        write(f)
    return Path(target)
