"""Metrics as JSON lines, plus a short Markdown summary, both in the workdir.

`MetricsWriter(workdir)` appends one JSON object per `write(stage, **values)` call to
`metrics.jsonl` ({"stage": ..., "time": unix seconds, ...values}); values that are numpy
or JAX scalars are converted to Python numbers. `write_summary(workdir, title, sections)`
writes `summary.md` from {stage: {key: value}} (through a temporary name, then a rename),
numbers rounded by `format_value`. With several processes (jax.distributed) only process 0
writes either file; the others return what they would have written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping
from typing import Any

from taylorcal_jax.utils import files, hosts

logger = logging.getLogger(__name__)


def plain(value: Any) -> Any:
    """`value` as JSON can hold it: mappings and sequences element by element, numpy and JAX
    scalars and arrays as Python numbers and lists, non-finite floats as strings ("nan")."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "item") and getattr(value, "size", 2) == 1:
        value = value.item()
    elif hasattr(value, "tolist"):  # a numpy or JAX array
        return plain(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsWriter:
    def __init__(self, workdir: str, filename: str = "metrics.jsonl"):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, filename)

    def write(self, stage: str, **values) -> dict:
        record = {"stage": stage, "time": round(time.time(), 3), **plain(values)}
        if not hosts.is_main():
            return record
        # One write(2) of the whole line on an O_APPEND descriptor: a run killed at any
        # point leaves whole lines only. A line cut all the same (a full disk, a crash of
        # the machine) is ended first, so that it spoils no later line.
        data = (json.dumps(record) + "\n").encode()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data
            while data:
                data = data[os.write(fd, data) :]
        finally:
            os.close(fd)
        return record


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics file; a line that is not JSON (cut short) is left out with a
    warning."""
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("%s:%d is not a whole JSON line (cut short?); left out", path, n)
    return records


def format_value(v: Any) -> str:
    """Numbers rounded for reading: 4 significant digits (46.43, 577.1, 0.01235), no exponent
    from 1e-3 to 1e6, integers and strings as they are; lists element by element."""
    v = plain(v)
    if isinstance(v, list):
        return "[" + ", ".join(format_value(x) for x in v) + "]"
    if isinstance(v, float) and math.isfinite(v):
        if v == 0 or 1e-3 <= abs(v) < 1e6:
            text = f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
            return text if "e" not in text else f"{v:.0f}"
        return f"{v:.3e}"
    return str(v)


def write_summary(workdir: str, title: str, sections: Mapping[str, Mapping[str, Any]]) -> str:
    lines = [f"# {title}", ""]
    for name, values in sections.items():
        lines += [f"## {name}", "", "| key | value |", "|---|---|"]
        lines += [f"| {k} | {format_value(v)} |" for k, v in values.items()]
        lines.append("")
    path = os.path.join(workdir, "summary.md")
    if not hosts.is_main():
        return path
    files.write_text(path, "\n".join(lines))
    return path
