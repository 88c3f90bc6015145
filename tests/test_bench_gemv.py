"""launch/bench_gemv.py: a CPU dry run of --preset=small (interpret mode): every row timed,
the kernel's rows equal to a float32 product, launch options that launch the same programs
timed once, and the Markdown table."""

import json

import bench_gemv  # launch/
import pytest


def test_small_preset_times_xla_and_each_distinct_launch_and_checks_the_kernel(tmp_path):
    p = dict(bench_gemv.PRESETS["small"], preset="small", out=str(tmp_path), tag="t")
    path = bench_gemv.run(p)
    result = json.loads(open(path).read())
    assert result["copy_bandwidth_bytes_per_s"] > 0
    rows = result["rows"]
    one_row = [r for r in rows if r["m"] == 1]
    # the default and programs=4 launch different grids; programs=16 and 32 the same one
    assert [r["impl"] for r in one_row] == ["xla", "kernel", "kernel", "kernel"]
    assert [r["config"]["programs"] for r in one_row[1:]] == [1056, 4, 16]
    assert [(r["m"], r["impl"]) for r in rows if r["m"] == 3] == [(3, "xla"), (3, "kernel")]
    for r in rows:
        assert (r["k"], r["n"]) == (64, 96) and r["seconds"] > 0
        assert r["bytes_per_s"] == pytest.approx(64 * 96 * 2 / r["seconds"])
        if r["impl"] == "kernel":
            assert r["max_rel_error"] < 1e-6
        else:
            assert r["config"] is None and r["max_rel_error"] is None
    md = open(path[: -len(".json")] + ".md").read()
    assert "| small | 64 x 96 | 1 |" in md and "| small | 64 x 96 | 3 |" in md
