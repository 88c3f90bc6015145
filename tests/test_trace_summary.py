"""launch/trace_summary.py: the summary of a hand-built trace (exact figures), the busy split of
nested and overlapping events, and the model operations of each kernel from a hand-written HLO
module."""

import gzip
import json

import pytest
import trace_summary as ts  # launch/ (tests/conftest.py)

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
    path = ts.find_trace_file(str(tmp_path))
    assert path.endswith("perfetto_trace.json.gz")
    t = ts.summarise_trace(ts.load_trace(path))

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
    t = ts.summarise_trace(host_only)
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
    origins = ts.hlo_origins(HLO, limit=2)
    fused = ["layers_N/gdn/add", "layers_N/gdn/q_proj/dot_general"]  # by count, then order
    assert origins["input_reduce_fusion.142"] == origins["input_reduce_fusion_142"] == fused
    assert origins["negate_5"] == ["neg"]  # no model scope: the program prefix dropped
    assert "p" not in origins  # no op_name
    names = ("input_reduce_fusion_142", "decode_attention", "negate_5")
    ranked = [{"name": n} for n in names]
    ts.add_origins(ranked, HLO, top=2)
    assert ranked[0]["origin"] == ts.hlo_origins(HLO)["input_reduce_fusion_142"]
    assert "origin" not in ranked[1] and "origin" not in ranked[2]  # a Pallas kernel; past top


def test_busy_time_goes_to_the_innermost_event_and_is_split_across_tracks():
    e = ts.DeviceEvent
    events = [
        e("cpu", "while.1", 0, 100),  # holds its body's ops on the same track
        e("cpu", "dot.3", 20, 50),
        e("cpu", "add.4", 50, 60),
        e("other", "copy", 40, 120),  # another track, overlapping the loop's end
        e("other", "instant", 130, 130),
    ]
    busy = ts.busy_by_name(events)
    # [0,20] while; [20,40] dot; [40,50] dot/copy; [50,60] add/copy; [60,100] while/copy;
    # [100,120] copy
    assert busy == pytest.approx(
        {"while.1": 20 + 20, "dot.3": 20 + 5, "add.4": 5, "copy": 5 + 5 + 20 + 20}
    )
    assert sum(busy.values()) == pytest.approx(ts.union_us((x.start_us, x.end_us) for x in events))
    assert ts.union_us([]) == 0 and ts.busy_by_name([]) == {}
    assert ts.family("loop_fusion.12") == "loop_fusion"
    assert ts.family("input_reduce_fusion_3.1") == "input_reduce_fusion"
    assert ts.family("MemcpyD2H") == "MemcpyD2H"
