"""Text sources: where documents come from.

A corpus is a sorted list of `Document(id, text)`. The id is stable across machines
(a path relative to the source root, or a dataset row key), so the split, which hashes
ids, is the same everywhere.

Source specs (a string, validated by `parse_source`):

    stdlib                 the running interpreter's standard library `.py` files
                           (`sysconfig.get_paths()["stdlib"]`, without site-packages)
    files:<glob>[,<glob>]  local text files (recursive `**` allowed); a bare path or
                           glob without the prefix is accepted too
    hf:<name>[:<config>]   a Hugging Face `datasets` dataset (needs `datasets` and either
                           a local cache or a network); its `text` column, split "train"
"""

from __future__ import annotations

import dataclasses
import glob
import os
import sysconfig

_SKIP_DIRS = ("site-packages", "dist-packages", "__pycache__")
_TEST_DIRS = ("test", "tests", "idle_test")


@dataclasses.dataclass(frozen=True)
class Document:
    id: str
    text: str


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    kind: str  # "stdlib" | "files" | "hf"
    args: tuple[str, ...] = ()


def parse_source(spec: str) -> SourceSpec:
    """Parses a source string (see module docstring); raises ValueError for unknown kinds."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("data.source must be a non-empty string, e.g. 'stdlib'")
    spec = spec.strip()
    if spec == "stdlib":
        return SourceSpec("stdlib")
    if spec.startswith("hf:"):
        parts = spec[3:].split(":")
        if not parts[0] or len(parts) > 2:
            raise ValueError(f"bad HF source {spec!r}; use 'hf:<name>' or 'hf:<name>:<config>'")
        return SourceSpec("hf", tuple(parts))
    if spec.startswith("files:"):
        spec = spec[len("files:") :]
    elif ":" in spec.split(os.sep)[0] and not os.path.exists(spec):
        raise ValueError(
            f"unknown data source {spec!r}; use 'stdlib', 'files:<glob>' or 'hf:<name>[:<config>]'"
        )
    globs = tuple(g for g in spec.split(",") if g)
    if not globs:
        raise ValueError("files: source needs at least one path or glob")
    return SourceSpec("files", globs)


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


def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        # A few stdlib test files are deliberately not UTF-8; keep them, replacing bad bytes.
        return f.read().decode("utf-8", errors="replace")


def _stdlib_documents(include_tests: bool) -> list[Document]:
    root = stdlib_root()
    return [Document(p, _read_text(os.path.join(root, p))) for p in stdlib_paths(include_tests)]


def _file_documents(globs: tuple[str, ...]) -> list[Document]:
    paths: set[str] = set()
    for pattern in globs:
        pattern = os.path.expanduser(pattern)
        if os.path.isdir(pattern):
            pattern = os.path.join(pattern, "**", "*")
        matched = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
        if not matched:
            raise FileNotFoundError(f"no files match {pattern!r}")
        paths.update(os.path.abspath(p) for p in matched)
    common = os.path.commonpath(sorted(paths)) if len(paths) > 1 else os.path.dirname(min(paths))
    return [Document(os.path.relpath(p, common), _read_text(p)) for p in sorted(paths)]


def _hf_documents(name: str, config: str | None) -> list[Document]:
    try:
        import datasets  # noqa: PLC0415
    except ImportError as e:
        raise ImportError(
            "source 'hf:...' needs the `datasets` package: pip install 'taylorcal_jax[datasets]'"
        ) from e
    try:
        ds = datasets.load_dataset(name, config, split="train")
    except Exception as e:  # offline, unknown name, ...: say what was asked for
        raise RuntimeError(
            f"could not load dataset {name!r} (config {config!r}): {e}. Without a network it "
            "must be in the local datasets cache; or use data.source='stdlib' / 'files:<glob>'."
        ) from e
    if "text" not in ds.column_names:
        raise ValueError(f"dataset {name!r} has no 'text' column (columns: {ds.column_names})")
    return [Document(f"{i:09d}", t) for i, t in enumerate(ds["text"]) if t]


def load_documents(spec: str, *, include_tests: bool = True) -> list[Document]:
    """All non-empty documents of a source, sorted by id. Raises ValueError if there are none."""
    src = parse_source(spec)
    if src.kind == "stdlib":
        docs = _stdlib_documents(include_tests)
    elif src.kind == "files":
        docs = _file_documents(src.args)
    else:
        docs = _hf_documents(src.args[0], src.args[1] if len(src.args) > 1 else None)
    docs = sorted((d for d in docs if d.text.strip()), key=lambda d: d.id)
    if not docs:
        raise ValueError(f"source {spec!r} has no non-empty documents")
    return docs
