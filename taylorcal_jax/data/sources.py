"""Text sources: which documents there are, listed before any of them is read.

A source is listed as `Entry(id, open_bytes)` records sorted by id; reading and checking
the bytes is reading.py's job, so listing a large tree costs one directory walk and no
reads, and a run that needs the first N documents reads only as far as it must. The id is
stable across machines (a path relative to the source root, or a dataset row key).

Source specs (a string, validated by `parse_source`):

    stdlib                 the running interpreter's standard library `.py` files
                           (`sysconfig.get_paths()["stdlib"]`, without site-packages)
    files:<glob>[,<glob>]  local files (recursive `**` allowed; a directory means every
                           file under it); a bare path or glob without the prefix is
                           accepted too
    hf:<name>[:<config>]   a Hugging Face `datasets` dataset (needs `datasets` and either
                           a local cache or a network); its `text` column, split "train"
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import io
import json
import os
import sys
import sysconfig
from collections.abc import Callable
from typing import BinaryIO

from taylorcal_jax.data.errors import DataError

_SKIP_DIRS = ("site-packages", "dist-packages", "__pycache__")
_TEST_DIRS = ("test", "tests", "idle_test")


@dataclasses.dataclass(frozen=True)
class Entry:
    """A document not read yet: its id, and a function that opens its bytes for reading."""

    id: str
    open_bytes: Callable[[], BinaryIO]


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    kind: str  # "stdlib" | "files" | "hf"
    args: tuple[str, ...] = ()


def parse_source(spec: str) -> SourceSpec:
    """Parses a source string (see module docstring); raises DataError for unknown kinds."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError("data.source must be a non-empty string, e.g. 'stdlib'")
    spec = spec.strip()
    if spec == "stdlib":
        return SourceSpec("stdlib")
    if spec.startswith("hf:"):
        parts = spec[3:].split(":")
        if not parts[0] or len(parts) > 2:
            raise DataError(f"bad HF source {spec!r}; use 'hf:<name>' or 'hf:<name>:<config>'")
        return SourceSpec("hf", tuple(parts))
    if spec.startswith("files:"):
        spec = spec[len("files:") :]
    elif ":" in spec.split(os.sep)[0] and not os.path.exists(spec):
        raise DataError(
            f"unknown data source {spec!r}; use 'stdlib', 'files:<glob>' or 'hf:<name>[:<config>]'"
        )
    globs = tuple(g for g in spec.split(",") if g)
    if not globs:
        raise DataError("files: source needs at least one path or glob, e.g. 'files:docs/**/*.md'")
    return SourceSpec("files", globs)


def resolved_source(spec: str) -> str:
    """What `spec` reads on this machine from this directory: the standard library's root and
    the interpreter's version for `stdlib`; for `files:` the absolute globs (relative ones are
    resolved against the working directory) and a digest of the files they match, each by
    size and modification time; the spec itself for `hf:`. Caches and fingerprints key on it,
    so that the same spec run elsewhere, or over edited files, never reuses other documents."""
    src = parse_source(spec)
    if src.kind == "stdlib":
        return f"stdlib:{stdlib_root()}:{sys.version.split()[0]}"
    if src.kind == "files":
        # the files the globs match, each by size and modification time: edited, added or
        # removed text is other text
        listing = []
        for path in matched_files(src.args):
            try:
                st = os.stat(path)
            except OSError as e:  # removed since the glob
                raise DataError(f"{path}: {e.strerror}; is the corpus being changed?") from e
            listing.append((path, st.st_size, st.st_mtime_ns))
        digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]
        globs = ",".join(os.path.abspath(os.path.expanduser(g)) for g in src.args)
        return f"files:{globs}:{len(listing)} files {digest}"
    return spec.strip()


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_paths(include_tests: bool = True) -> list[str]:
    """Sorted relative paths of the standard library's `.py` files."""
    root = stdlib_root()
    skip = _SKIP_DIRS + (() if include_tests else _TEST_DIRS)
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        for name in filenames:
            if name.endswith(".py"):
                out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(out)


def _file_entry(doc_id: str, path: str) -> Entry:
    return Entry(doc_id, functools.partial(open, path, "rb"))


def _stdlib_entries(include_tests: bool) -> list[Entry]:
    root = stdlib_root()
    return [_file_entry(p, os.path.join(root, p)) for p in stdlib_paths(include_tests)]


def matched_files(globs: tuple[str, ...]) -> list[str]:
    """The sorted absolute paths of the files `globs` match (a directory: every file under
    it); DataError naming a glob that matches none."""
    paths: set[str] = set()
    for pattern in globs:
        pattern = os.path.expanduser(pattern)
        if os.path.isdir(pattern):
            pattern = os.path.join(pattern, "**", "*")
        matched = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
        if not matched:
            raise DataError(
                f"no files match {pattern!r}; check the path (and quote globs in a shell, "
                "e.g. --config.data.source='files:docs/**/*.md')"
            )
        paths.update(os.path.abspath(p) for p in matched)
    return sorted(paths)


def _file_entries(globs: tuple[str, ...]) -> list[Entry]:
    paths = matched_files(globs)
    common = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
    return [_file_entry(os.path.relpath(p, common), p) for p in paths]


def _hf_row_bytes(dataset, row: int) -> BinaryIO:
    return io.BytesIO((dataset[row]["text"] or "").encode("utf-8"))


def _hf_entries(name: str, config: str | None) -> list[Entry]:
    try:
        import datasets  # noqa: PLC0415
    except ImportError as e:
        raise DataError(
            "source 'hf:...' needs the `datasets` package: pip install 'taylorcal_jax[datasets]'"
        ) from e
    try:
        ds = datasets.load_dataset(name, config, split="train")
    except Exception as e:  # offline, unknown name, ...: say what was asked for
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(
            f"could not load dataset {name!r} (config {config!r}): {reason}. Without a network "
            "it must be in the local datasets cache; or use data.source='stdlib' / 'files:<glob>'"
        ) from e
    if "text" not in ds.column_names:
        raise DataError(f"dataset {name!r} has no 'text' column (columns: {ds.column_names})")
    # Rows are read one at a time when needed (the Arrow table is memory-mapped).
    return [Entry(f"{i:09d}", functools.partial(_hf_row_bytes, ds, i)) for i in range(len(ds))]


def list_entries(spec: str, *, include_tests: bool = True) -> list[Entry]:
    """Every document of a source, not read yet, sorted by id."""
    src = parse_source(spec)
    if src.kind == "stdlib":
        entries = _stdlib_entries(include_tests)
    elif src.kind == "files":
        entries = _file_entries(src.args)
    else:
        entries = _hf_entries(src.args[0], src.args[1] if len(src.args) > 1 else None)
    return sorted(entries, key=lambda e: e.id)
