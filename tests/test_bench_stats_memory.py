"""launch/bench_stats_memory.py: a CPU run of --small at two short contexts, every program
compiled, run and recorded (the script had fallen behind the statistics' jitted function)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_small_run_records_memory_and_time_of_every_program(tmp_path):
    cmd = [sys.executable, "launch/bench_stats_memory.py", "--small", "--lengths=64,256"]
    cmd += ["--block_size=32", "--dense_max_t=256", f"--out={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (name,) = os.listdir(tmp_path)
    result = json.loads((tmp_path / name).read_text())
    for key in ("device", "jax_version", "date", "command", "git", "source_digest"):
        assert result[key]
    assert [r["T"] for r in result["rows"]] == [64, 256]
    for row in result["rows"]:
        for program in ("kernel", "blockwise", "dense"):
            entry = row[program]
            assert "error" not in entry and entry["temp_size_in_bytes"] > 0
            assert entry["seconds"] > 0
    # the dense pass holds [H, T, T] logits: its temporaries grow faster than the blockwise
    grow = {
        p: result["rows"][1][p]["temp_size_in_bytes"] / result["rows"][0][p]["temp_size_in_bytes"]
        for p in ("blockwise", "dense")
    }
    assert grow["dense"] > grow["blockwise"]
