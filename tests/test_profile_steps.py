"""launch/profile_steps.py: a CPU run of decode_student and stage2 on the small preset (its trace
summarised by launch/trace_summary.py, tested in tests/test_trace_summary.py), the rows and
budget, and one-line errors for bad flags."""

import dataclasses
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
    assert stage2["mfu_with_attention"] is None
    attention = [stage2[f"{m}_attention_flops_per_token"] for m in ("teacher", "student")]
    assert attention[0] > attention[1] > 0  # the student keeps some softmax layers
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
    row = f"| 2 | 32 | True | 0 | failed: {failed['error']} |" + " |" * 10
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


def test_the_small_preset_refuses_the_stage2_flags_it_would_ignore():
    with pytest.raises(prof.SettingsError, match="sets the stage-2 rows itself; drop --seq_lens, "):
        prof.settings("small", targets="stage2", seq_lens="64", remat="false")
    assert prof.settings("small", targets="stage2", keep_every=2).stage2.small  # decode's too
    assert prof.settings("small", targets="decode_student", seq_lens="64").stage2.small


def test_the_command_line_stops_on_a_bad_flag_before_any_work(tmp_path):
    cmd = [sys.executable, "launch/profile_steps.py", "--targets=decode_student", "--context=0"]
    proc = subprocess.run(
        cmd + [f"--out={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "--context must be distinct positive integers, got '0'" in last
    assert "Traceback" not in proc.stderr and os.listdir(tmp_path) == []
