"""Files written complete or not at all, for every layer (standard library only).

checkpoint.py, figures.py, curves.py and reflow.py all replace files that a reader (a resumed run,
`python -m difftrain.report`, a browser on samples.html) may open at any moment; they share this
one writer instead of each renaming its own temporary file.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

# Leftovers of a write cut short start with this, so folder scans (findlast) can skip them.
TEMP_PREFIX = ".tmp-"


def fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename is durable only once its folder is); a no-op on Windows."""
    if os.name == "nt":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_file_atomically(path: Path, write: Callable[[Path], None], *, exclusive: bool = False) -> Path:
    """Create `path` complete or not at all: `write(temp)` fills a temporary file beside it, which is
    flushed and then renamed (or, with `exclusive`, hard-linked so an existing `path` is never
    replaced: FileExistsError instead). The temporary name is unique per process and call, so two
    processes redrawing the same file never write into each other's. Returns `path`."""
    path = Path(path)
    temp = path.with_name(f"{TEMP_PREFIX}{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    try:
        write(temp)
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        if exclusive:
            _link_exclusive(temp, path)
        else:
            os.replace(temp, path)
        fsync_folder(path.parent)
    finally:
        temp.unlink(missing_ok=True)
    return path


def _link_exclusive(temp: Path, path: Path) -> None:
    try:
        os.link(temp, path)  # fails if path exists, unlike a rename
    except FileExistsError:
        raise
    except OSError:
        # A file system without hard links: still exclusive ('x'), though no longer atomic.
        with open(path, "xb") as handle:
            handle.write(temp.read_bytes())
            handle.flush()
            os.fsync(handle.fileno())


__all__ = ["TEMP_PREFIX", "fsync_folder", "write_file_atomically"]
