"""The workdir: one run at a time, outputs written atomically, a record of every stage.

    <workdir>/.lock         held (fcntl.flock) by the running process; names its pid, host
                            and start time. The kernel drops the lock when the process dies,
                            even by kill -9, so a lock file nobody holds is stale and is taken
                            over (with a message).
    <workdir>/stages.json   per stage: fingerprint, the settings and inputs behind it, status
                            ("pending" once a run plans to rerun it, "running", then "done",
                            "failed" or "interrupted" (Ctrl-C); a kill -9 leaves "running"),
                            result, start/finish time, seconds, and the mesh sizes that shape
                            its checkpoints where they do.
    <workdir>/config.json   the history of runs in this workdir: {"runs": [{command, started,
                            host, pid, stages, config}, ...]}, the newest last.

Every output goes through a temporary name ending in `.partial` and is renamed into place
when complete (`write_json`, `write_bytes`, `output_dir`), so a killed run leaves either the
old output, the new one, or a `.partial` leftover that the next run deletes
(`remove_partials`) before it starts.

Several processes (jax.distributed) run one program and compute the same outputs; process 0
alone holds the lock and writes or removes anything in the workdir. Each writing or removing
call ends at a barrier (utils/hosts.sync) that every process reaches, so that no process
reads a file before it exists; the other processes write into a private temporary directory
that is deleted (an output is often made by a collective, e.g. a gather of parameters split
across processes, which every process must join).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator

from taylorcal_jax.errors import ConfigError, UserError
from taylorcal_jax.utils import files, hosts

LOCK_FILE = ".lock"
RECORDS_FILE = "stages.json"
HISTORY_FILE = "config.json"
PARTIAL = files.PARTIAL


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def check_workdir(path: str) -> None:
    """One-line errors for a workdir that cannot be used (before anything is written)."""
    if not path:
        raise ConfigError("--workdir is empty", "pass a directory, e.g. --workdir=workdirs/tiny")
    if "://" in path:  # the lock, records and outputs are local file operations
        raise ConfigError(
            f"--workdir={path} is a URL; the workdir must be a directory of a file system",
            "on a pod, a shared file system with POSIX locks every host mounts (e.g. NFS)",
        )
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(
            f"workdir {path} exists and is not a directory",
            "pass a directory (new or from an earlier run) to --workdir",
        )
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ConfigError(f"cannot create workdir {path}: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"workdir {path} is not writable ({probe})", "choose another --workdir")


# ------------------------------------------------------------------------------- the lock


LOOK_PATIENCE_S = 1.0  # how long taking the lock waits out a look at it


class WorkdirLock:
    """Exclusive lock of a workdir for the life of a run (a context manager), held by
    process 0; the other processes wait at a barrier until it holds it.

    `say(line)` reports a stale lock taken over. A live holder raises UserError naming it.
    """

    def __init__(self, workdir: str, say: Callable[[str], None]):
        self.path = os.path.join(workdir, LOCK_FILE)
        self.say = say
        self._fd: int | None = None

    def acquire(self) -> None:
        # process 0 takes the lock; every process learns whether it could (hosts.main_value),
        # so that all of them stop with its one-line error instead of the others waiting at
        # the next barrier until JAX's timeout
        hosts.main_value(self._take, f"locking {os.path.dirname(self.path)}")

    def _take(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                holder = _flock_or_holder(fd, fcntl.LOCK_EX)
                # a --dry_run's look (lock_holder) holds a shared lock for an instant: a
                # holder that lets go within a second was such a look, not a run
                deadline = time.monotonic() + LOOK_PATIENCE_S
                while holder is not None and time.monotonic() < deadline:
                    time.sleep(0.05)
                    holder = _flock_or_holder(fd, fcntl.LOCK_EX)
            except OSError:
                os.close(fd)
                raise
            if holder is not None:
                os.close(fd)
                raise UserError(
                    f"workdir {os.path.dirname(self.path)} is in use by pid "
                    f"{holder.get('pid', '?')} on {holder.get('host', '?')} "
                    f"(started {holder.get('started', '?')})",
                    "wait for that run to finish, or use another --workdir",
                ) from None
            # The file may have been unlinked by a finishing holder between open and flock.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            break
        stale = _read_holder(fd)
        if stale:
            self.say(
                f"taking over the lock of pid {stale.get('pid', '?')} on "
                f"{stale.get('host', '?')} (started {stale.get('started', '?')}), which is no "
                "longer running"
            )
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def lock_holder(workdir: str) -> dict | None:
    """The {pid, host, started} of a run holding `workdir`'s lock now, or None (a look that
    takes nothing: --dry_run)."""
    path = os.path.join(workdir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        return _flock_or_holder(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)  # (closing drops a shared lock taken here)


def _flock_or_holder(fd: int, mode: int) -> dict | None:
    """Takes flock `mode` on `fd` without waiting: None if it did, else the record of the
    process holding the lock ({} if unreadable)."""
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        return _read_holder(fd)
    return None


def _read_holder(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data.decode()) if data else {}
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------------ atomic outputs


@contextlib.contextmanager
def _elsewhere() -> Iterator[str]:
    """A private temporary directory (for the outputs of processes other than 0), deleted
    afterwards."""
    with tempfile.TemporaryDirectory(prefix="taylorcal_discard_") as tmp:
        yield tmp


def write_bytes(path: str, data: bytes) -> None:
    if hosts.is_main():
        files.write_bytes(path, data)
    hosts.sync(f"write {path}")


def write_json(path: str, obj, *, default=None) -> None:
    write_bytes(path, (json.dumps(obj, indent=1, default=default) + "\n").encode())


@contextlib.contextmanager
def output_file(path: str) -> Iterator[str]:
    """Yields a temporary path to write; renamed to `path` if the block completes."""
    if not hosts.is_main():
        with _elsewhere() as tmp:
            yield os.path.join(tmp, os.path.basename(path))
        hosts.sync(f"write {path}")
        return
    with files.replaced_when_done(path) as tmp:
        yield tmp
    hosts.sync(f"write {path}")


@contextlib.contextmanager
def output_dir(path: str) -> Iterator[str]:
    """Yields an empty temporary directory; it replaces `path` if the block completes."""
    if not hosts.is_main():
        with _elsewhere() as tmp:
            yield tmp
        hosts.sync(f"write {path}")
        return
    tmp = files.temporary_name(path)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        _remove(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    hosts.sync(f"write {path}")


def remove(path: str) -> None:
    """Deletes the file or directory `path` (process 0; every process waits for it)."""
    if hosts.is_main():
        _remove(path)
    hosts.sync(f"remove {path}")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def remove_partials(workdir: str) -> list[str]:
    """Deletes every `*.partial` file or directory under `workdir` (process 0; every process
    waits for it); returns their paths (none on the other processes)."""
    found = []
    if not hosts.is_main():
        hosts.sync(f"remove partials {workdir}")
        return found
    for root, dirs, names in os.walk(workdir):
        for name in list(dirs) + names:
            if name.endswith(PARTIAL):
                found.append(os.path.join(root, name))
        dirs[:] = [d for d in dirs if not d.endswith(PARTIAL)]
    for path in found:
        _remove(path)
    hosts.sync(f"remove partials {workdir}")
    return found


# ------------------------------------------------------------------- records and history


def read_records(workdir: str) -> dict[str, dict]:
    """{stage: record} of stages.json ({} when absent)."""
    path = os.path.join(workdir, RECORDS_FILE)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            records = json.load(f)["stages"]
        if not isinstance(records, dict) or not all(isinstance(r, dict) for r in records.values()):
            raise ValueError('not {"stages": {stage: record}}')
        return records
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"{path} is unreadable ({e})",
            "delete it and pass --rerun=all to rerun every stage in this workdir",
        ) from e


def write_records(workdir: str, records: dict[str, dict]) -> None:
    write_json(os.path.join(workdir, RECORDS_FILE), {"stages": records})


def append_history(workdir: str, run: dict) -> None:
    """Appends `run` to config.json's list of runs (a plain resolved config becomes run 0)."""
    path = os.path.join(workdir, HISTORY_FILE)
    runs = []
    if os.path.exists(path):
        with open(path) as f:
            try:
                old = json.load(f)
            except ValueError:
                old = None
        if isinstance(old, dict) and isinstance(old.get("runs"), list):
            runs = old["runs"]
        elif old is not None:
            runs = [{"command": None, "started": None, "config": old}]
    write_json(path, {"runs": runs + [run]})


def read_history(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, HISTORY_FILE)) as f:
        return json.load(f)["runs"]
