"""Metrics as JSON lines, plus a short Markdown summary, both in the workdir.

`MetricsWriter(workdir)` appends one JSON object per `write(stage, **values)` call to
`metrics.jsonl` ({"stage": ..., "time": unix seconds, ...values}); values that are numpy
or JAX scalars are converted to Python numbers. `write_summary(workdir, sections)` writes
`summary.md` from {stage: {key: value}}.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import numpy as np


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and getattr(value, "size", 2) == 1:
        value = value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsWriter:
    def __init__(self, workdir: str, filename: str = "metrics.jsonl"):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, filename)

    def write(self, stage: str, **values) -> dict:
        record = {"stage": stage, "time": round(time.time(), 3), **_plain(values)}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        return record


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_summary(workdir: str, title: str, sections: Mapping[str, Mapping[str, Any]]) -> str:
    lines = [f"# {title}", ""]
    for name, values in sections.items():
        lines += [f"## {name}", "", "| key | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(_plain(v))} |" for k, v in values.items()]
        lines.append("")
    path = os.path.join(workdir, "summary.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path
