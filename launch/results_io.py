"""Provenance and writing of benchmark result files (launch/results/*.json), and the progress
lines of the scripts that make them.

Every result records the device, the JAX version, the date and the exact command, so that a
figure can be traced to the run that produced it and rerun.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the code a measurement depends on: the package and the launch scripts (folder, file suffix)
SOURCE = (("taylorcal_jax", ".py"), ("launch", ".py"))
# the settings a run may read besides: the configs and the launch scripts' shell wrappers
# (a digest of their own, so that source digests recorded before it still name their commits)
SETTINGS = (("configs", ".py"), ("launch", ".sh"))


def _git(*args: str, repo: str = REPO) -> str:
    return subprocess.run(
        ["git", "-C", repo, *args], capture_output=True, text=True, timeout=60, check=True
    ).stdout


def git_revision() -> str | None:
    """The repository's commit ("<hash>+dirty" with uncommitted changes), or None outside git.
    A copy of the working tree can carry a stale .git (the device machine's does): there the
    figure is wrong, and source_digest() is what identifies the code."""
    try:
        run = lambda *a: _git(*a).strip()  # noqa: E731
        rev = run("rev-parse", "--short=12", "HEAD")
        dirty = bool(run("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty else "")


def _digest(entries) -> str:
    """sha256 (12 hex digits) over sorted "<path> <git blob id>" lines."""
    lines = "".join(f"{path} {blob}\n" for path, blob in sorted(entries))
    return hashlib.sha256(lines.encode()).hexdigest()[:12]


def _selected(path: str, selection) -> bool:
    top = path.split("/", 1)[0]
    return any(top == folder and path.endswith(suffix) for folder, suffix in selection)


def source_digest(root: str = REPO, selection=SOURCE) -> str:
    """Digest of the files `selection` names ((folder, suffix) pairs, SOURCE: the .py files of
    the package and of launch/) as they are on disk: each file's path and git blob id (sha1 of
    b"blob <size>\\0" + bytes), so that it equals source_digest_at(commit) for the commit whose
    tree holds these files, with no .git needed where it is taken."""
    entries = []
    for top in sorted({folder for folder, _ in selection}):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, top)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for name in filenames:
                path = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
                if _selected(path, selection):
                    with open(os.path.join(dirpath, name), "rb") as f:
                        data = f.read()
                    blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
                    entries.append((path, blob))
    return _digest(entries)


def settings_digest(root: str = REPO) -> str:
    """source_digest() of SETTINGS: the configs and the shell wrappers a run may read."""
    return source_digest(root, SETTINGS)


def source_digest_at(commit: str, repo: str = REPO, selection=SOURCE) -> str:
    """source_digest() of the tree of `commit` (from git's object ids; reads no file)."""
    folders = sorted({folder for folder, _ in selection})
    listing = _git("ls-tree", "-r", commit, "--", *folders, repo=repo)
    entries = []
    for line in listing.splitlines():
        meta, path = line.split("\t", 1)
        if _selected(path, selection):
            entries.append((path, meta.split()[2]))
    return _digest(entries)


def commits_with_digest(
    digest: str, max_count: int = 500, repo: str = REPO, selection=SOURCE
) -> list[str]:
    """Commits (newest first, among the last max_count) whose source_digest_at is `digest`
    (selection=SETTINGS: whose settings_digest is)."""
    revs = _git("rev-list", f"--max-count={max_count}", "HEAD", repo=repo).split()
    return [r for r in revs if source_digest_at(r, repo, selection) == digest]


def command_line() -> str:
    """This process's command: the interpreter's name and sys.argv."""
    return " ".join([os.path.basename(sys.executable)] + sys.argv)


def invocation() -> dict:
    """{"date", "command", "xla_flags", "git", "source_digest", "settings_digest"} of this
    process (xla_flags: its XLA_FLAGS, which change the compiled programs); starts no JAX (for
    a process that leaves the accelerator to its children)."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "git": git_revision(),
        "source_digest": source_digest(),
        "settings_digest": settings_digest(),
    }


def provenance() -> dict:
    """{"device", "jax_version"} and `invocation()` of this process."""
    import jax

    from taylorcal_jax.train.stages import device_description

    return {"device": device_description(), "jax_version": jax.__version__, **invocation()}


def write_text(path: str, text: str) -> str:
    """Writes `path` whole: under a temporary name, then renamed, so that a reader never sees
    half a file and a run cut while writing leaves the previous one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".partial", "w") as f:
        f.write(text)
    os.replace(path + ".partial", path)
    return path


def write_result(out_dir: str, stem: str, tag: str, small: bool, result: dict) -> str:
    """Writes <out_dir>/<stem>_<tag>.json (tag: given, "small", or the device kind)."""
    if not tag:
        import jax

        tag = "small" if small else jax.devices()[0].device_kind.replace(" ", "_")
    return write_text(os.path.join(out_dir, f"{stem}_{tag}.json"), json.dumps(result, indent=1))


def percent_cell(x) -> str:
    """A fraction as a Markdown table cell: "12.3%", or "n/a" for None."""
    return "n/a" if x is None else f"{x:.1%}"


def gib_cell(nbytes) -> str:
    """Bytes as GiB with two decimals for a Markdown table cell ("" for None)."""
    return "" if nbytes is None else f"{nbytes / 2**30:.2f}"


def progress_log(t0: float | None = None) -> Callable[[str], None]:
    """log(message): prints "[     N s] message" to stdout at once (flushed), N the whole seconds
    since t0 (a time.perf_counter() reading; the call's own time when None), so that each line
    of a long run says when it came."""
    start = time.perf_counter() if t0 is None else t0

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:6.0f} s] {message}", flush=True)

    return log


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="The source digest of this working tree, or the commits that have a digest "
        "(to find the code behind a result file written on a machine whose .git is stale)."
    )
    ap.add_argument("digest", nargs="?", help="print the commits with this source_digest")
    ap.add_argument("--max-count", type=int, default=500, help="commits searched, newest first")
    ap.add_argument(
        "--settings",
        action="store_true",
        help="the digest is a settings_digest (configs/*.py, launch/*.sh)",
    )
    a = ap.parse_args(argv)
    selection = SETTINGS if a.settings else SOURCE
    if a.digest is None:
        print(source_digest(selection=selection))
        return 0
    found = commits_with_digest(a.digest, a.max_count, selection=selection)
    for rev in found:
        print(_git("log", "-1", "--format=%h %ad %s", "--date=iso", rev).strip())
    if not found:
        print(
            f"no commit among the last {a.max_count} has that digest, {a.digest}", file=sys.stderr
        )
    return 0 if found else 1


if __name__ == "__main__":
    sys.exit(main())
