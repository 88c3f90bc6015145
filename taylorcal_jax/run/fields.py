"""The config schema: every field of configs/common.py, its default and its description.

`configs/common.py` holds every default; the comment on an assignment in its `get_config`
(and the comment lines directly above it) is that field's description. `defaults()` loads
the defaults, `descriptions()` reads the comments with `tokenize`, `flatten(config)` lists a
config as {"section.field": value}, `unknown_fields(config)` names the fields a config
has that the schema lacks, each with the closest known field ("did you mean"), and
`split_comma_items(config)` reads a command line's comma lists into tuple-of-str fields.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
import io
import os
import tokenize
from typing import Any

import ml_collections

COMMON_PATH = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "configs",
    "common.py",
)


@functools.lru_cache(maxsize=1)
def _common_module():
    spec = importlib.util.spec_from_file_location("taylorcal_configs_common", COMMON_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def defaults() -> ml_collections.ConfigDict:
    """A fresh copy of every default (configs/common.py `get_config()`)."""
    return _common_module().get_config()


def flatten(config) -> dict[str, Any]:
    """{"a.b.c": leaf value} of a ConfigDict (or mapping), sections in insertion order."""
    out = {}
    for key, value in config.items():
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            out.update({f"{key}.{k}": v for k, v in flatten(value).items()})
        else:
            out[str(key)] = value
    return out


def sections(config) -> dict[str, Any]:
    """{"a.b": ConfigDict} of every section (nested ones included)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            out[str(key)] = value
            out.update({f"{key}.{k}": v for k, v in sections(value).items()})
    return out


def _dotted(node) -> str | None:
    """The dotted path "a.b" of an assignment target `c.a.b`, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or not parts:
        return None
    return ".".join(reversed(parts))


@functools.lru_cache(maxsize=1)
def descriptions() -> dict[str, str]:
    """{"section.field" or "section": description} from the comments of common.get_config."""
    with open(COMMON_PATH) as f:
        source = f.read()
    lines = source.splitlines()
    comments = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    fn = next(
        n
        for n in ast.parse(source).body
        if isinstance(n, ast.FunctionDef) and n.name == "get_config"
    )
    out = {}
    for stmt in fn.body:
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1):
            continue
        path = _dotted(stmt.targets[0])
        if path is None:
            continue
        above = []
        row = stmt.lineno - 1  # 1-based line number of the line above
        while row >= 1 and lines[row - 1].strip().startswith("#"):
            above.insert(0, comments[row])
            row -= 1
        inline = [comments[r] for r in range(stmt.lineno, stmt.end_lineno + 1) if r in comments]
        text = " ".join(above + inline).strip()
        if text:
            out[path] = text
    return out


def closest(name: str, known) -> str | None:
    matches = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return matches[0] if matches else None


def unknown_fields(config) -> list[tuple[str, str | None]]:
    """[(field, closest known field or None)] for fields of `config` not in the defaults."""
    known = set(flatten(defaults())) | set(sections(defaults()))
    out = []
    for path in list(sections(config)) + list(flatten(config)):
        if path in known:
            continue
        parent = path.rpartition(".")[0]
        if parent and parent not in known:
            continue  # reported once, at its unknown section
        out.append((path, closest(path, known)))
    return out


def split_comma_items(config) -> None:
    """Splits, in place, the items of every tuple-of-str field (by its default) at commas.

    ml_collections reads `--config.stages=a,b` as the one-item tuple ("a,b",): a tuple flag
    takes one item per repetition (`--config.stages=a --config.stages=b`) or a Python tuple
    literal. A comma list is what people type, and no item of these fields holds a comma, so
    ("a,b",) -> ("a", "b"); blanks around items and empty items are dropped.
    """
    want = flatten(defaults())
    nodes = {"": config, **sections(config)}
    for path, value in flatten(config).items():
        default = want.get(path)
        if not (isinstance(default, tuple) and default and isinstance(default[0], str)):
            continue
        if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
            continue  # a wrong type is check_types' to report
        if any("," in v or not v.strip() for v in value):
            parent, _, leaf = path.rpartition(".")
            nodes[parent][leaf] = tuple(p.strip() for v in value for p in v.split(",") if p.strip())
