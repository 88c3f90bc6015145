"""launch/bench_stage2.py: a CPU dry run of --preset=small (two rows, remat on and off), the
budget, a failing row, and one-line errors for bad flags."""

import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys

import bench_stage2  # launch/
import pytest
import recovery  # launch/
import results_io  # launch/

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_small_sweep_measures_both_rows_and_writes_the_files(tmp_path):
    s = bench_stage2.small_settings()
    result = bench_stage2.run_sweep(s, str(tmp_path), "t", str(tmp_path / "cache"))
    rows = result["rows"]
    assert [(r["remat"], r["status"]) for r in rows] == [(True, "ok"), (False, "ok")]
    assert result["complete"] and result["not_started"] == []
    peak = recovery.PEAK_BF16_FLOPS.get(result["device_kind"])
    for r in rows:
        assert (r["batch_size"], r["seq_len"], r["chunk_size"]) == (2, 32, 16)
        assert r["tokens_per_step"] == 2 * 32
        assert len(r["step_seconds"]) == s.timed_steps
        assert len(r["warmup_step_seconds"]) == s.warmup_steps
        assert len(r["losses"]) == s.warmup_steps + s.timed_steps
        assert all(math.isfinite(x) and x > 0 for x in r["losses"])
        assert r["median_step_s"] == pytest.approx(statistics.median(r["step_seconds"]))
        assert r["tokens_per_s"] == pytest.approx(64 / statistics.median(r["step_seconds"]))
        assert r["compile_s"] > 0 and r["memory"]["compiled_step_bytes"] > 0
        assert r["counted_flops_per_token"] == 6 * r["n_student"]
        assert r["necessary_flops_per_token"] == 6 * r["n_student"] + 2 * r["n_teacher"]
        assert r["executed_over_counted"] == pytest.approx(
            r["executed_flops_per_token"] / r["counted_flops_per_token"]
        )
        # every model FLOP is a matmul XLA counts (the GDN op is its XLA form here), the
        # attention's products too: the student keeps layer 0 of 2, the teacher has both
        student_att = r["student_attention_flops_per_token"]
        teacher_att = r["teacher_attention_flops_per_token"]
        assert 0 < 2 * student_att == pytest.approx(teacher_att)
        attention = 3 * student_att + teacher_att
        assert r["executed_flops_per_token"] >= r["necessary_flops_per_token"] + attention
        if peak is None:  # a CPU: no peak, no utilisation figures
            assert r["mfu"] is None and r["mfu_with_teacher"] is None and r["hfu"] is None
            assert r["mfu_with_attention"] is None
        else:
            assert r["mfu"] == pytest.approx(6 * r["n_student"] * r["tokens_per_s"] / peak)
    remat, no_remat = rows
    # rematerialisation runs the student's forward again: more FLOPs, less than twice as many
    extra = remat["executed_flops_per_token"] - no_remat["executed_flops_per_token"]
    assert 0 < extra <= no_remat["executed_flops_per_token"]
    assert remat["losses"][0] == pytest.approx(no_remat["losses"][0], rel=1e-6)

    saved = json.load(open(tmp_path / "bench_stage2_t.json"))
    assert saved == json.loads(json.dumps(result))
    assert saved["command"] == results_io.command_line() and saved["versions"]["jax"]
    for key in ("device", "date", "git", "source_digest", "jax_version"):
        assert key in saved
    md = open(tmp_path / "bench_stage2_t.md").read()
    assert f"Command: `{saved['command']}`" in md
    assert md.count("| 2 | 32 | True | 16 |") == 1 and md.count("| 2 | 32 | False | 16 |") == 1
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".partial")]


def test_no_row_starts_after_the_budget(tmp_path):
    s = bench_stage2.small_settings(budget_s=1e-9)
    result = bench_stage2.run_sweep(s, str(tmp_path), "b", str(tmp_path / "cache"))
    assert result["rows"] == [] and not result["complete"]
    assert [p["remat"] for p in result["not_started"]] == [True, False]
    md = open(tmp_path / "bench_stage2_b.md").read()
    assert "**Incomplete**" in md and "Not started (--budget_s=1e-09 reached)" in md


def test_a_failing_row_is_recorded_with_its_one_line_error():
    import bench_scaling  # launch/
    import jax

    from taylorcal_jax.utils import sharding

    s = bench_stage2.small_settings()
    cfg, teacher, _ = bench_scaling.stage2_teacher(s.shape(), "llama", "", "")
    mesh = sharding.make_mesh({"layers": 1, "data": 1, "fsdp": 1}, jax.devices()[:1])
    # a KL chunk of 0 (rejected by check_settings) fails inside the step's tracing
    row = bench_stage2.measure(bench_stage2.Point(2, 32, True, 0), s, cfg, teacher, mesh, "cpu")
    assert row["status"] == "failed" and "compile_s" not in row and "tokens_per_s" not in row
    assert row["error"] == "ValueError: KL chunk length must be positive, got 0"
    result = {
        "device": "cpu",
        "date": "d",
        "jax_version": "v",
        "teacher": "t",
        "command": "c",
        "gdn_impl_resolved": "chunked",
        "peak_bf16_flops": None,
        "settings": dataclasses.asdict(s),
        "rows": [row],
        "not_started": [],
        "complete": True,
    }
    assert f"| failed: {row['error']} |" in bench_stage2.markdown(result)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"batch_sizes": (0,)}, "--batch_sizes=0: each must be at least 1"),
        ({"batch_sizes": (8, 8)}, "repeats a value"),
        ({"seq_lens": (1,)}, "at least 2"),
        ({"chunk_sizes": (64,)}, "--chunk_sizes=64: each must be 1 to the shortest"),
        ({"chunk_sizes": (0,)}, "--chunk_sizes=0"),
        ({"remat": ()}, "--remat is empty"),
        ({"timed_steps": 0}, "at least 1"),
        ({"dtype": "float16"}, "choose from"),
        ({"gdn_impl": "fast"}, "--gdn_impl=fast: choose from"),
        ({"gdn_impl": "pallas"}, "--gdn_impl=pallas: impl='pallas' cannot run"),
        ({"budget_s": -1.0}, "must be >= 0"),
        ({"attention_impls": ("flash",)}, "--attention_impls=flash: choose from"),
        ({"gdn_fused_projections": (True, True)}, "--gdn_fused_projections=True,True repeats"),
        ({"attention_impls": ("blocked", "cudnn")}, "cudnn needs --dtype=bfloat16 and a GPU"),
        ({"small": False, "random_smollm2": False}, "give one of --smollm2_gguf"),
        ({"small": False, "smollm2_gguf": "x.gguf"}, "give one of --smollm2_gguf"),
    ],
)
def test_settings_are_checked_with_one_line_errors(change, message):
    with pytest.raises(ValueError, match=message) as e:
        bench_stage2.check_settings(bench_stage2.small_settings(**change))
    assert "\n" not in str(e.value)


def test_list_flags_are_parsed_with_one_line_errors():
    assert bench_stage2.parse_ints("seq_lens", ["2048", "4096"]) == (2048, 4096)
    assert bench_stage2.parse_bools("remat", ["true", "False"]) == (True, False)
    with pytest.raises(ValueError, match="--chunk_sizes: 'big' is not an integer"):
        bench_stage2.parse_ints("chunk_sizes", ["512", "big"])
    with pytest.raises(ValueError, match="--remat: 'maybe' is neither true nor false"):
        bench_stage2.parse_bools("remat", ["maybe"])


def test_points_run_batch_outermost():
    s = bench_stage2.small_settings(batch_sizes=(8, 16), chunk_sizes=(4, 8))
    got = [(p.batch_size, p.remat, p.chunk_size) for p in bench_stage2.points(s)]
    assert got[:4] == [(8, True, 4), (8, True, 8), (8, False, 4), (8, False, 8)]
    assert len(got) == 8 and got[4] == (16, True, 4)
    s = bench_stage2.small_settings(remat=(True,), attention_impls=("blocked", "xla"))
    assert [p.attention_impl for p in bench_stage2.points(s)] == ["blocked", "xla"]
    s = bench_stage2.small_settings(remat=(True,), gdn_fused_projections=(True, False))
    assert [p.gdn_fused_projections for p in bench_stage2.points(s)] == [True, False]
    flags = ["8"], ["2048"], ["true"], ["512"], ["cudnn"], ["false", "true"]
    assert bench_stage2.parse_axes(*flags)["gdn_fused_projections"] == (False, True)
    with pytest.raises(ValueError, match="--gdn_fused_projections: 'yes' is neither"):
        bench_stage2.parse_axes(*flags[:5], ["yes"])


def test_gdn_projections_joined_or_separate_reach_the_student():
    # the row's choice is the student's GDN runtime; the two compute the same sums
    import bench_scaling  # launch/
    import jax
    import numpy as np

    s = bench_stage2.small_settings()
    cfg, teacher, _ = bench_scaling.stage2_teacher(s.shape(), "llama", "", "")
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16))
    logits = {}
    for fused in (True, False):
        problem = bench_scaling.stage2_problem(
            cfg, teacher, keep_every=4, gdn_impl="chunked", dtype="float32", chunk_size=16,
            fused_projections=fused,
        )  # fmt: skip
        assert problem.student_model.student_mixer.runtime.fused_projections is fused
        logits[fused] = problem.student_model.apply({"params": problem.student}, tokens)
    a, b = (np.asarray(jax.tree.leaves(logits[f])[0]) for f in (True, False))
    assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b))


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--batch_sizes=8,0", "--batch_sizes=0: each must be at least 1"),
        ("--chunk_sizes=512,4096", "--chunk_sizes=4096: each must be 1 to the shortest"),
    ],
)
def test_the_command_line_stops_on_a_bad_flag_before_any_work(tmp_path, flag, message):
    cmd = [sys.executable, "launch/bench_stage2.py", "--random_smollm2", flag, f"--out={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert message in last and "Traceback" not in proc.stderr
    assert os.listdir(tmp_path) == []


def test_an_executed_count_below_6n_gives_no_utilisation():
    row = {
        "step_seconds": [0.5, 0.5, 0.5],
        "tokens_per_step": 1000,
        "n_student": 10**6,
        "n_teacher": 10**6,
        "executed_flops_per_token": 3 * 10**6,  # half of 6 N: XLA saw only part of the step
        "executed_over_counted": 0.5,
        "student_attention_flops_per_token": 3 * 10**5,
        "teacher_attention_flops_per_token": 10**5,
    }
    got = bench_stage2.throughput_fields(row, "NVIDIA H200")
    # (6 N + 2 N_teacher + 3 x student attention + teacher attention) tokens/s / peak
    assert got["mfu_with_attention"] == pytest.approx((8e6 + 1e6) * 2000 / 989e12)
    assert got["tokens_per_s"] == 2000.0 and got["mfu"] == pytest.approx(6e6 * 2000 / 989e12)
    assert got["hfu"] is None
    full = bench_stage2.throughput_fields({**row, "executed_over_counted": 1.5}, "NVIDIA H200")
    assert full["hfu"] == pytest.approx(3e6 * 2000 / 989e12)


def test_the_small_preset_refuses_the_flags_it_sets(tmp_path):
    cmd = [sys.executable, "launch/bench_stage2.py", "--preset=small", "--batch_sizes=8"]
    cmd += ["--dtype=float32", "--budget_s=5", f"--out={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "--preset=small sets these itself; drop --batch_sizes, --dtype" in last
    assert os.listdir(tmp_path) == []
