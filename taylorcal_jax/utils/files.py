"""Files written whole or not at all.

A file is written under a temporary name next to its target and renamed over it when complete
(`os.replace`, atomic on POSIX file systems), so a reader, or the next run after a kill
mid-write, finds the old file or the new one, never a truncated one. The temporary name
carries the writer's pid, so that processes writing the same file at once (each host of a
multi-process run building the same cache) never write into one temporary file, and ends in
`PARTIAL`, which the workdir's clean-up (`run/workdir.remove_partials`) looks for.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator

PARTIAL = ".partial"


def temporary_name(path: str) -> str:
    return f"{path}.{os.getpid()}{PARTIAL}"


@contextlib.contextmanager
def replaced_when_done(path: str) -> Iterator[str]:
    """Yields a temporary file name to write; it is renamed to `path` if the block completes
    and removed if it raises."""
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_bytes(path: str, data: bytes) -> None:
    """Writes `data` to `path`, flushed to the disk before the rename (so that a crash of the
    machine, not only of the process, leaves the old file or the whole new one)."""
    with replaced_when_done(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str, obj, *, default=None) -> None:
    write_text(path, json.dumps(obj, indent=1, default=default) + "\n")
