"""launch/plot_gdn_kernel.py on the committed H100 result file (reads it; measures nothing)."""

import json
import os

import plot_gdn_kernel  # from launch/ (tests/conftest.py)
import pytest

RESULT = os.path.join(os.path.dirname(plot_gdn_kernel.__file__), "results", "gdn_kernel_h100.json")


def test_panel_values_read_ours_and_fla_per_row():
    with open(RESULT) as f:
        result = json.load(f)
    ours, fla = plot_gdn_kernel.panel_values(result, "fwd_ms")
    assert len(ours) == len(fla) == len(result["rows"])
    for row, a, b in zip(result["rows"], ours, fla, strict=True):
        assert a == row["ours_fwd_ms"] and b == row["fla_fwd_ms"]
    ours, fla = plot_gdn_kernel.panel_values({"rows": [{"ours_fwd_ms": 1.0}]}, "fwd_ms")
    assert ours == [1.0] and fla[0] != fla[0]  # a missing figure is NaN


def test_plot_writes_a_png(tmp_path):
    out = tmp_path / "kernel.png"
    with open(RESULT) as f:
        plot_gdn_kernel.plot(json.load(f), str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    with pytest.raises(ValueError, match="no rows"):
        plot_gdn_kernel.plot({"rows": []}, str(tmp_path / "empty.png"))
