"""launch/bench_scaling.py: efficiency, targets, equality measures, settings checks and the
report; one small run end to end on 4 of the simulated CPU devices."""

import json
import os
import subprocess
import sys

import bench_scaling  # launch/
import numpy as np
import pytest
import results_io  # launch/

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_median_and_efficiency():
    assert bench_scaling.median([3.0, 1.0, 2.0]) == 2.0
    assert bench_scaling.median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert bench_scaling.efficiency(1.7, 2) == pytest.approx(0.85)
    assert bench_scaling.efficiency(3.2, 4) == pytest.approx(0.8)


def test_targets_are_met_at_and_above_the_threshold_only():
    assert bench_scaling.target_of(2) == 0.85 and bench_scaling.target_of(4) == 0.75
    assert bench_scaling.target_status(0.85, 2) == "met"
    assert bench_scaling.target_status(0.849, 2) == "missed"
    assert bench_scaling.target_status(0.80, 4) == "met"
    assert bench_scaling.target_status(0.74, 4) == "missed"
    assert bench_scaling.target_status(0.99, 8) == "no target"
    assert bench_scaling.target_status(None, 2) == "no target"


def test_stage2_row_speedup_is_against_the_one_device_row():
    one = bench_scaling.stage2_row("p", "one device", {"data": 1}, 1, [2.0, 1.0, 3.0], 1000,
                                   None, None, {})  # fmt: skip
    assert one["tokens_per_s"] == pytest.approx(500.0)  # median step 2 s
    assert "efficiency" not in one
    two = bench_scaling.stage2_row("p", "data parallel", {"data": 2}, 2, [1.25], 1000, one,
                                   None, {})  # fmt: skip
    assert two["speedup"] == pytest.approx(1.6)
    assert two["efficiency"] == pytest.approx(0.8)
    assert two["target_status"] == "missed" and two["target"] == 0.85


def test_relative_errors_of_trees_and_losses():
    ref = {"a": np.array([1.0, -4.0]), "b": np.zeros(3)}
    got = {"a": np.array([1.0, -3.9]), "b": np.array([0.0, 1e-7, 0.0])}
    # a: 0.1 / 4; b (all zero in the reference): the absolute 1e-7
    assert bench_scaling.max_rel_err(got, ref) == pytest.approx(0.025)
    got["b"] = np.array([0.0, 0.5, 0.0])
    assert bench_scaling.max_rel_err(got, ref) == pytest.approx(0.5)
    assert bench_scaling.loss_rel_err([2.0, 1.1], [2.0, 1.0]) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="2 losses against 1"):
        bench_scaling.loss_rel_err([1.0, 2.0], [1.0])
    eq = bench_scaling.equality(1e-6, 2e-5, 1e-5, "x")
    assert not eq["passed"] and bench_scaling.equality(1e-6, None, 1e-5, "x")["passed"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"parts": ("stage3",)}, "unknown parts"),
        ({"num_devices": 1}, "needs 2 to 8"),
        ({"num_devices": 16}, "needs 2 to 8"),
        ({"fsdp": 3}, "must be at least 2 and divide"),
        ({"batch_size": 6}, "multiple of 4 devices"),
        ({"calib_sequences": 2}, "calib_sequences=2"),
        ({"timed_steps": 0}, "at least 1"),
        ({"dtype": "float16"}, "choose from"),
        ({"small": False, "random_smollm2": False}, "--smollm2_gguf"),
    ],
)
def test_settings_are_checked_with_one_line_errors(change, message):
    with pytest.raises(ValueError, match=message) as e:
        bench_scaling.check_settings(bench_scaling.small_settings(**change), 8)
    assert "\n" not in str(e.value)


def test_small_run_on_four_devices_equals_one_device_and_writes_the_files(tmp_path):
    s = bench_scaling.small_settings(parts=("stage2_qwen", "init"), num_devices=4, fsdp=2)
    result = bench_scaling.run_benchmark(s, str(tmp_path), "t", str(tmp_path / "c"))
    rows = result["rows"]
    assert [(r["part"], r["layout"], r["devices"]) for r in rows] == [
        ("stage2_qwen", "one device", 1),
        ("stage2_qwen", "data parallel", 4),
        ("stage2_qwen", "fsdp", 4),
        ("init", "layers", 1),
        ("init", "layers", 4),
    ]
    for r in rows[1:3] + rows[4:]:
        assert r["equality"]["passed"], r["equality"]
        assert r["efficiency"] == pytest.approx(r["speedup"] / 4)
    assert rows[2]["mesh"] == {"layers": 1, "data": 2, "fsdp": 2}
    assert len(rows[0]["step_seconds"]) == s.timed_steps
    assert len(rows[0]["losses"]) == s.warmup_steps + s.timed_steps
    assert rows[1]["memory"]["per_device_bytes"][0] > 0
    assert result["complete"] and result["all_equal"] and result["nccl_nvls_enable"] == "0"
    saved = json.load(open(tmp_path / "scaling_t.json"))
    command = results_io.command_line()
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["command"] == command
    md = open(tmp_path / "scaling_t.md").read()
    assert f"Command: `{command}`" in md and md.count("| stage2_qwen |") == 3
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".partial")]


def test_the_small_preset_refuses_the_flags_it_sets(tmp_path):
    cmd = [sys.executable, "launch/bench_scaling.py", "--preset=small", "--seq_len=64"]
    cmd += [f"--out={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "--preset=small sets these itself; drop --seq_len" in last
    assert os.listdir(tmp_path) == []
