"""launch/profile_steps.py: the trace summary on a hand-built trace (exact figures), the busy
split of nested and overlapping events, a CPU run of decode_student and stage2 on the small
preset, and one-line errors for bad flags."""

import dataclasses
import gzip
import json
import math
import os
import statistics
import subprocess
import sys

import profile_steps as prof  # launch/ (tests/conftest.py)
import pytest
import results_io  # launch/

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A GPU trace by hand: two stream tracks of /device:GPU:0, XProf's derived "XLA Ops" track (it
# repeats the kernels: left out), a host XLA op (left out when there are GPU streams), and the
# two call annotations on the Python thread, listed out of order. Times in microseconds.
GPU, HOST = 1, 2
STREAM_A, STREAM_B, XLA_OPS, PYTHON = 11, 12, 13, 20
FIXTURE = [
    {"ph": "M", "pid": GPU, "name": "process_name", "args": {"name": "/device:GPU:0"}},
    {"ph": "M", "pid": HOST, "name": "process_name", "args": {"name": "/host:CPU"}},
    {"ph": "M", "pid": GPU, "tid": STREAM_A, "name": "thread_name",
     "args": {"name": "Stream #13(Kernel,MemcpyD2H)"}},
    {"ph": "M", "pid": GPU, "tid": STREAM_B, "name": "thread_name",
     "args": {"name": "Stream #14(Kernel)"}},
    {"ph": "M", "pid": GPU, "tid": XLA_OPS, "name": "thread_name", "args": {"name": "XLA Ops"}},
    {"ph": "M", "pid": HOST, "tid": PYTHON, "name": "thread_name", "args": {"name": "python3"}},
    {"ph": "X", "pid": HOST, "tid": PYTHON, "ts": 200.0, "dur": 100.0,
     "name": "profile_steps call 1"},
    {"ph": "X", "pid": HOST, "tid": PYTHON, "ts": 0.0, "dur": 100.0,
     "name": "profile_steps call 0"},
    {"ph": "X", "pid": HOST, "tid": PYTHON, "ts": 5.0, "dur": 90.0, "name": "thunk",
     "args": {"hlo_op": "thunk"}},
    # call 0: A runs gemv then fusion.2, B runs fusion.7 across both; B's copy ends after the
    # call's end (its midpoint is inside: clipped to [95, 100])
    {"ph": "X", "pid": GPU, "tid": STREAM_A, "ts": 10.0, "dur": 20.0, "name": "gemv_kernel"},
    {"ph": "X", "pid": GPU, "tid": STREAM_A, "ts": 40.0, "dur": 20.0, "name": "loop_fusion.2"},
    {"ph": "X", "pid": GPU, "tid": STREAM_B, "ts": 20.0, "dur": 30.0, "name": "loop_fusion.7"},
    {"ph": "X", "pid": GPU, "tid": STREAM_B, "ts": 95.0, "dur": 8.0, "name": "MemcpyD2H"},
    {"ph": "X", "pid": GPU, "tid": XLA_OPS, "ts": 10.0, "dur": 50.0, "name": "fusion"},
    # between the calls (a cache copy): outside every call
    {"ph": "X", "pid": GPU, "tid": STREAM_A, "ts": 150.0, "dur": 10.0, "name": "gemv_kernel"},
    # call 1: two kernels with an idle 10 us between them
    {"ph": "X", "pid": GPU, "tid": STREAM_A, "ts": 210.0, "dur": 30.0, "name": "gemv_kernel"},
    {"ph": "X", "pid": GPU, "tid": STREAM_A, "ts": 250.0, "dur": 10.0, "name": "loop_fusion.2"},
]  # fmt: skip


def _write_trace(directory, events) -> None:
    run = directory / "plugins" / "profile" / "2026_12_05_00_00_00"
    run.mkdir(parents=True)
    with gzip.open(run / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"displayTimeUnit": "ns", "traceEvents": events}, f)


def test_the_summary_of_a_hand_built_trace_is_exact(tmp_path):
    _write_trace(tmp_path, FIXTURE)
    path = prof.find_trace_file(str(tmp_path))
    assert path.endswith("perfetto_trace.json.gz")
    t = prof.summarise_trace(prof.load_trace(path))

    assert t["tracks"] == {
        "kind": "gpu_streams",
        "events": {
            "/device:GPU:0 / Stream #13(Kernel,MemcpyD2H)": 5,
            "/device:GPU:0 / Stream #14(Kernel)": 2,
        },
    }
    # call 0: union [10, 60] + [95, 100] = 55; first event at 10, last ends at the call's end
    # call 1: 30 + 10 busy, first at 210 (lead 10), idle 240-250, last ends at 260 (tail 40)
    want_calls = [
        dict(wall_us=100, busy_us=55, gap_us=45, kernels=4, lead_us=10, between_us=35, tail_us=0),
        dict(wall_us=100, busy_us=40, gap_us=60, kernels=2, lead_us=10, between_us=10, tail_us=40),
    ]
    assert t["calls"] == [pytest.approx(c) for c in want_calls]
    assert t["median"] == pytest.approx(
        dict(wall_us=100, busy_us=47.5, gap_us=52.5, kernels=3, lead_us=10, between_us=22.5,
             tail_us=20)
    )  # fmt: skip
    assert t["busy_us"] == pytest.approx(95)
    assert t["outside_calls"] == pytest.approx({"events": 1, "total_us": 10})
    # busy split, call 0: [10,20] gemv; [20,30] gemv and fusion.7 half each; [30,40] fusion.7;
    # [40,50] fusion.2 and fusion.7 half each; [50,60] fusion.2; [95,100] the copy. Call 1: all
    # to its own kernels.
    want = {  # name: (count, total, busy)
        "gemv_kernel": (2, 20 + 30, 15 + 30),
        "loop_fusion.2": (2, 20 + 10, 15 + 10),
        "loop_fusion.7": (1, 30, 20),
        "MemcpyD2H": (1, 5, 5),
    }
    assert [r["name"] for r in t["by_name"]] == list(want)
    for r in t["by_name"]:
        count, total, busy = want[r["name"]]
        assert r == pytest.approx(
            dict(name=r["name"], count=count, total_us=total, mean_us=total / count,
                 busy_us=busy, share=busy / 95)
        )  # fmt: skip
    # families: the two loop fusions together (tied with gemv at 45 us: by name)
    assert [(r["name"], r["count"], r["busy_us"]) for r in t["by_family"]] == [
        ("gemv_kernel", 2, pytest.approx(45)),
        ("loop_fusion", 3, pytest.approx(45)),
        ("MemcpyD2H", 1, pytest.approx(5)),
    ]
    # launches per call (2 calls): gemv and fusion.2 once each per call, together 70 us;
    # fusion.7 and the copy half a time per call, 25 us
    assert t["by_launches"] == [
        dict(per_call=1.0, kernels=2, busy_us=pytest.approx(70), share=pytest.approx(70 / 95),
             names=["gemv_kernel", "loop_fusion.2"]),
        dict(per_call=0.5, kernels=2, busy_us=pytest.approx(25), share=pytest.approx(25 / 95),
             names=["loop_fusion.7", "MemcpyD2H"]),
    ]  # fmt: skip


def test_without_gpu_streams_the_host_xla_ops_are_read(tmp_path):
    host_only = [
        e
        for e in FIXTURE
        if e.get("pid") == HOST or (e["ph"] == "M" and e["name"] == "process_name")
    ]
    t = prof.summarise_trace(host_only)
    assert t["tracks"] == {"kind": "xla_host_ops", "events": {"/host:CPU / python3": 1}}
    assert t["calls"][0] == pytest.approx(
        dict(wall_us=100, busy_us=90, gap_us=10, kernels=1, lead_us=5, between_us=0, tail_us=5)
    )
    assert t["calls"][1] == {"wall_us": 100, "busy_us": 0, "gap_us": 100, "kernels": 0}
    assert t["median"]["lead_us"] == 5 and t["by_name"][0]["share"] == pytest.approx(1)


HLO = """HloModule jit_decode, entry_computation_layout={(f32[2,8])->f32[2,8]}

%fused_computation.3 (param_0: f32[2,8], param_1: f32[8,8]) -> f32[2,8] {
  %param_0 = f32[2,8]{1,0} parameter(0)
  %param_1 = f32[8,8]{1,0} parameter(1)
  %dot.1 = f32[2,8]{1,0} dot(%param_0, %param_1), metadata={op_name="jit(decode)/while/body/closed_call/Transformer/layers_3/gdn/q_proj/dot_general" stack_frame_id=1}
  %dot.2 = f32[2,8]{1,0} dot(%param_0, %param_1), metadata={op_name="jit(decode)/while/body/closed_call/Transformer/layers_3/gdn/k_proj/dot_general" stack_frame_id=2}
  %add.3 = f32[2,8]{1,0} add(%dot.1, %dot.2), metadata={op_name="jit(decode)/while/body/closed_call/Transformer/layers_3/gdn/add"}
  ROOT %add.4 = f32[2,8]{1,0} add(%add.3, %dot.2), metadata={op_name="jit(decode)/while/body/closed_call/Transformer/layers_3/gdn/add"}
}

ENTRY %main.9 (p: f32[2,8], w: f32[8,8]) -> f32[2,8] {
  %p = f32[2,8]{1,0} parameter(0)
  %w = f32[8,8]{1,0} parameter(1)
  %input_reduce_fusion.142 = f32[2,8]{1,0} fusion(%p, %w), kind=kInput, calls=%fused_computation.3, metadata={op_name="jit(decode)/while/body/closed_call/Transformer/layers_3/gdn/add"}
  ROOT %negate.5 = f32[2,8]{1,0} negate(%input_reduce_fusion.142), metadata={op_name="jit(decode)/neg"}
}
"""  # noqa: E501


def test_kernels_get_the_model_operations_they_compute():
    origins = prof.hlo_origins(HLO, limit=2)
    fused = ["layers_N/gdn/add", "layers_N/gdn/q_proj/dot_general"]  # by count, then order
    assert origins["input_reduce_fusion.142"] == origins["input_reduce_fusion_142"] == fused
    assert origins["negate_5"] == ["neg"]  # no model scope: the program prefix dropped
    assert "p" not in origins  # no op_name
    names = ("input_reduce_fusion_142", "decode_attention", "negate_5")
    ranked = [{"name": n} for n in names]
    prof.add_origins(ranked, HLO, top=2)
    assert ranked[0]["origin"] == prof.hlo_origins(HLO)["input_reduce_fusion_142"]
    assert "origin" not in ranked[1] and "origin" not in ranked[2]  # a Pallas kernel; past top


def test_busy_time_goes_to_the_innermost_event_and_is_split_across_tracks():
    e = prof.DeviceEvent
    events = [
        e("cpu", "while.1", 0, 100),  # holds its body's ops on the same track
        e("cpu", "dot.3", 20, 50),
        e("cpu", "add.4", 50, 60),
        e("other", "copy", 40, 120),  # another track, overlapping the loop's end
        e("other", "instant", 130, 130),
    ]
    busy = prof.busy_by_name(events)
    # [0,20] while; [20,40] dot; [40,50] dot/copy; [50,60] add/copy; [60,100] while/copy;
    # [100,120] copy
    assert busy == pytest.approx(
        {"while.1": 20 + 20, "dot.3": 20 + 5, "add.4": 5, "copy": 5 + 5 + 20 + 20}
    )
    assert sum(busy.values()) == pytest.approx(
        prof.union_us((x.start_us, x.end_us) for x in events)
    )
    assert prof.union_us([]) == 0 and prof.busy_by_name([]) == {}
    assert prof.family("loop_fusion.12") == "loop_fusion"
    assert prof.family("input_reduce_fusion_3.1") == "input_reduce_fusion"
    assert prof.family("MemcpyD2H") == "MemcpyD2H"


def test_small_run_profiles_decode_and_stage2_and_writes_the_files(tmp_path):
    s = prof.settings("small", targets="decode_student,stage2", calls=2, gdn_decode="pallas")
    out, traces = tmp_path / "out", tmp_path / "traces"
    result = prof.run(s, str(out), "t", str(traces), str(tmp_path / "cache"))
    assert result["complete"] and result["not_started"] == []
    assert [(r["label"], r["status"]) for r in result["rows"]] == [
        ("decode_student L=64 B=2", "ok"),
        ("stage2 batch 2 x 32, remat=True, KL chunk 16, attention blocked", "ok"),
    ]
    for r in result["rows"]:
        t = r["trace"]
        assert t["tracks"]["kind"] == "xla_host_ops" and t["tracks"]["events"]  # a CPU
        assert len(t["calls"]) == len(r["untraced_call_s"]) == 2
        for call in t["calls"]:
            assert 0 < call["busy_us"] <= call["wall_us"] and call["kernels"] > 0
            parts = call["busy_us"] + call["lead_us"] + call["between_us"] + call["tail_us"]
            assert parts == pytest.approx(call["wall_us"])
        assert all(x["count"] > 0 and x["total_us"] >= 0 for x in t["by_name"])
        assert sum(x["count"] for x in t["by_name"]) == sum(c["kernels"] for c in t["calls"])
        for ranked in (t["by_name"], t["by_family"]):
            assert sum(x["share"] for x in ranked) == pytest.approx(1, abs=1e-9)
        assert r["call_s"] == statistics.median(r["untraced_call_s"])
        assert os.path.isfile(r["trace_file"]) and r["trace_file"].startswith(str(traces))

    decode, stage2 = result["rows"]
    steps, m = s.decode_steps, decode["trace"]["median"]
    bandwidth = result["decode"]["copy_bandwidth_bytes_per_s"]
    roofline = decode["roofline"]["bytes_per_step"]["total"] / bandwidth
    assert decode["roofline_s_per_step"] == pytest.approx(roofline)
    assert decode["busy_s_per_step"] == pytest.approx(m["busy_us"] * 1e-6 / steps)
    assert decode["wall_s_per_step"] == pytest.approx(decode["call_s"] / steps)
    assert decode["roofline_fraction"] == pytest.approx(roofline / decode["wall_s_per_step"])
    assert decode["decode_attention"] == "xla" and decode["compile_s"] > 0
    assert result["decode"]["gdn_decode"] == "pallas"  # the Pallas step, in interpret mode

    assert stage2["tokens_per_step"] == 2 * 32 and stage2["step_s"] == stage2["call_s"]
    assert stage2["busy_s"] == pytest.approx(stage2["trace"]["median"]["busy_us"] * 1e-6)
    assert stage2["tokens_per_s"] == pytest.approx(64 / stage2["call_s"])
    assert stage2["mfu"] is None and stage2["mfu_at_busy"] is None  # a CPU has no peak
    assert stage2["loop_step_s"] > 0 and math.isfinite(stage2["executed_flops_per_token"])

    saved = json.load(open(out / "profile_steps_t.json"))
    assert saved == json.loads(json.dumps(result))
    assert saved["command"] == results_io.command_line()
    for key in ("device", "date", "git", "source_digest", "jax_version", "versions", "xla_flags"):
        assert key in saved
    md = open(out / "profile_steps_t.md").read()
    assert f"Command: `{saved['command']}`" in md
    assert "| decode_student | 64 | 2 |" in md and "| 2 | 32 | True | 16 |" in md
    assert md.count("| name | count | total us | mean us | busy share |") == 2
    for r in (decode, stage2):  # the top kernels' model operations, from the program's HLO
        named = [x for x in r["trace"]["by_name"][: s.top] if "origin" in x]
        assert named and all(x["origin"] and all(x["origin"]) for x in named)
    decode_ops = {op for x in decode["trace"]["by_name"] for op in x.get("origin", [])}
    assert any(op.startswith("layers_N/gdn/") for op in decode_ops)
    assert md.count(" model ops |") == 2
    assert md.count("| launches per call | kernels | busy ms per call |") == 2
    for table in ("| target | L | B |", "| batch | seq | remat |"):  # rows as wide as the head
        lines = md.splitlines()
        at = next(i for i, line in enumerate(lines) if line.startswith(table))
        assert lines[at].count("|") == lines[at + 1].count("|") == lines[at + 2].count("|")
    assert sorted(os.listdir(out)) == ["profile_steps_t.json", "profile_steps_t.md"]


def test_no_row_starts_after_the_budget(tmp_path):
    s = prof.settings("small", targets="decode_teacher", budget_s=1e-9)
    result = prof.run(s, str(tmp_path), "b", str(tmp_path / "traces"), "")
    assert result["rows"] == [] and not result["complete"]
    assert result["not_started"] == ["decode_teacher L=64 B=2"]
    md = open(tmp_path / "profile_steps_b.md").read()
    assert "**Incomplete**" in md and "Not started (--budget_s=1e-09 reached)" in md


def test_a_failing_row_is_recorded_with_its_one_line_error_and_the_run_goes_on(tmp_path):
    s = prof.settings("small", targets="stage2")
    # a KL chunk of 0 (rejected by the settings' checks) fails inside the step's tracing
    s = dataclasses.replace(s, stage2=dataclasses.replace(s.stage2, chunk_sizes=(0, 16)))
    result = prof.run(s, str(tmp_path), "f", str(tmp_path / "traces"), "")
    assert result["complete"]
    failed, ok = result["rows"]
    assert failed["status"] == "failed" and ok["status"] == "ok"
    assert failed["error"] == "ValueError: KL chunk length must be positive, got 0"
    md = open(tmp_path / "profile_steps_f.md").read()
    row = f"| 2 | 32 | True | 0 | failed: {failed['error']} |" + " |" * 9
    assert row in md.splitlines() and md.count("| name | count |") == 1


def test_rows_pair_the_decode_targets_in_the_order_given():
    s = prof.settings(
        "full",
        targets="stage2,decode_teacher,decode_student",
        context="65536,16384",
        batch="16,1",
        random_smollm2=True,
        remat="true,false",
    )
    labels = [r.label() for r in prof.rows(s)]
    assert labels[:2] == [
        "stage2 batch 8 x 2048, remat=True, KL chunk 512, attention blocked",
        "stage2 batch 8 x 2048, remat=False, KL chunk 512, attention blocked",
    ]
    assert labels[2:6] == [
        "decode_teacher L=65536 B=16",
        "decode_student L=65536 B=16",
        "decode_teacher L=65536 B=1",
        "decode_student L=65536 B=1",
    ]
    assert len(labels) == 10 and s.decode_steps == 64
    assert prof.rows(s)[0].key() == "stage2_b8_t2048_remat1_kl512_blocked"


@pytest.mark.parametrize(
    "flags_, message",
    [
        (dict(targets="decode,stage2"), "--targets must list distinct names of"),
        (dict(targets="stage2,stage2"), "--targets must list distinct names of"),
        (dict(context="16384,0"), "--context must be distinct positive integers"),
        (dict(batch="16,x"), "--batch must be comma-separated integers"),
        (dict(calls=0), "--calls must be >= 1"),
        (dict(decode_steps=0), "--decode_steps must be >= 1"),
        (dict(decode_attention="flash"), "--decode_attention must be one of"),
        (dict(gdn_decode="triton"), "--gdn_decode must be one of"),
        (dict(keep_every=1), r"--keep_every must be in \[2, 28\]"),
        (dict(budget_s=-1.0), "--budget_s must be >= 0"),
        (dict(batch_sizes="8,0"), "--batch_sizes=0: each must be at least 1"),
        (dict(remat="maybe"), "--remat: 'maybe' is neither true nor false"),
        (dict(random_smollm2=False), "give one of --smollm2_gguf"),
    ],
)
def test_bad_settings_are_one_line_errors(flags_, message):
    with pytest.raises(prof.SettingsError, match=message) as e:
        prof.settings("full", **{"random_smollm2": True, **flags_})
    assert "\n" not in str(e.value)


def test_the_command_line_stops_on_a_bad_flag_before_any_work(tmp_path):
    cmd = [sys.executable, "launch/profile_steps.py", "--targets=decode_student", "--context=0"]
    proc = subprocess.run(
        cmd + [f"--out={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "--context must be distinct positive integers, got '0'" in last
    assert "Traceback" not in proc.stderr and os.listdir(tmp_path) == []
