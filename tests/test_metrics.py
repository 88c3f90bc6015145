"""metrics.jsonl: values made plain for JSON; a line cut short spoils no other line."""

import json
import logging

import jax.numpy as jnp
import numpy as np

from taylorcal_jax.utils.metrics import MetricsWriter, plain, read_metrics


def test_arrays_and_non_finite_values_become_json():
    values = plain(
        {"a": jnp.arange(3.0), "b": np.array([1.0, np.nan, np.inf]), "c": jnp.float32(2)}
    )
    assert values == {"a": [0.0, 1.0, 2.0], "b": [1.0, "nan", "inf"], "c": 2.0}
    json.loads(json.dumps(values, allow_nan=False))


def test_a_cut_line_is_ended_before_the_next_record_and_left_out_when_read(tmp_path, caplog):
    writer = MetricsWriter(str(tmp_path))
    writer.write("distill", step=1, loss=2.0)
    with open(writer.path, "a") as f:
        f.write('{"stage": "distill", "step": 2, "lo')  # a write cut short
    writer.write("distill", step=3, loss=1.0)
    with caplog.at_level(logging.WARNING):
        rows = read_metrics(writer.path)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 2.0), (3, 1.0)]
    assert "metrics.jsonl:2 is not a whole JSON line" in caplog.text
