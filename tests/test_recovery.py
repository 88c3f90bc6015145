"""launch/recovery.py: curves from metrics rows, tokens to a target, ratios, throughput and
MFU, the report; and one smoke run end to end on the tiny smoke teacher."""

import json
import math
import os
import subprocess
import sys

import pytest
import recovery  # launch/
from suite_env import suite_xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _eval(stage, tokens, ppl):
    return {"stage": stage, "step": tokens // 10, "tokens": tokens, "eval_ppl": ppl}


def test_curve_joins_the_stages_and_keeps_the_last_row_of_a_repeated_point():
    rows = [
        _eval("distill_layers", 0, 100.0),
        {"stage": "distill_layers", "step": 1, "tokens": 10, "loss": 1.0},
        _eval("distill_layers", 20, 50.0),
        _eval("distill_layers", 20, 40.0),  # logged again by a resumed run
        {"stage": "distill_layers", "steps": 2, "tokens": 20, "eval_ppl": 40.0},  # summary
        _eval("distill", 0, 40.0),  # stage 2's start: stage 1's last student
        _eval("distill", 30, 20.0),
    ]
    assert recovery.curve_from_metrics(rows) == [[0, 100.0], [20, 40.0], [50, 20.0]]
    assert recovery.curve_from_metrics([_eval("distill", 0, 9.0)]) == [[0, 9.0]]


def test_curve_keeps_only_the_latest_run_of_this_schedules_stages():
    # one workdir, two schedules: stage 1 + stage 2, then stage 2 alone (metrics.jsonl keeps
    # both); the second curve has neither stage 1's points nor its token offset
    def start(stage):  # the runner's row where a stage's run from scratch begins
        return {"stage": stage, "start": "run"}

    done = [{"stage": "distill_layers", "done": True}, {"stage": "distill", "done": True}]
    first = [start("distill_layers"), _eval("distill_layers", 0, 100.0),
             _eval("distill_layers", 20, 40.0), done[0], start("distill"),
             _eval("distill", 0, 40.0), _eval("distill", 30, 20.0), done[1]]  # fmt: skip
    second = [start("distill"), _eval("distill", 0, 100.0), _eval("distill", 40, 60.0)]
    assert recovery.curve_from_metrics(first) == [[0, 100.0], [20, 40.0], [50, 20.0]]
    alone = recovery.curve_from_metrics(first + second, stages=("distill",))
    assert alone == [[0, 100.0], [40, 60.0]]


def test_tokens_to_target_interpolates_in_log_ppl():
    curve = [[0, 100.0], [100, 10.0], [200, 5.0]]
    # log-linear between (0, 100) and (100, 10): sqrt(1000) = 31.6 is halfway
    assert recovery.tokens_to_target(curve, math.sqrt(1000)) == pytest.approx(50.0)
    assert recovery.tokens_to_target(curve, 10.0) == pytest.approx(100.0)
    assert recovery.tokens_to_target(curve, 7.0) == pytest.approx(
        100 + 100 * (math.log(10) - math.log(7)) / (math.log(10) - math.log(5))
    )
    assert recovery.tokens_to_target(curve, 200.0) == 0.0  # there from the start
    assert recovery.tokens_to_target(curve, 4.0) is None  # never reached
    assert recovery.tokens_to_target([], 4.0) is None
    # the first crossing counts, even if the curve goes back up
    assert recovery.tokens_to_target([[0, 9.0], [10, 3.0], [20, 9.0], [30, 1.0]], 5.0) < 10
    # a diverged evaluation (inf or NaN) reaches nothing; interpolating through it gave NaN
    for bad in (math.inf, math.nan):
        assert recovery.tokens_to_target([[0, 100.0], [10, bad], [20, 5.0]], 10.0) == (
            pytest.approx(20 * (math.log(100) - math.log(10)) / (math.log(100) - math.log(5)))
        )
        assert recovery.tokens_to_target([[0, bad]], 10.0) is None


def test_targets_ratios_and_throughput():
    runs = {"copy": {"done": False, "curve": [[0, 50.0], [10, 20.0]]}}
    assert recovery.targets_of(10.0, runs) == {"2x_teacher": 20.0, "1.5x_teacher": 15.0}
    runs["copy"]["done"] = True
    assert recovery.targets_of(10.0, runs)["copy_final"] == 20.0
    out = [
        {"init": "copy", "tokens_to_target": {"a": 1000.0, "b": None}},
        {"init": "taylor_calibrate", "tokens_to_target": {"a": 100.0, "b": 50.0}},
    ]
    assert recovery.ratios(out, "copy") == {
        "copy": {"a": 1.0, "b": None},
        "taylor_calibrate": {"a": 10.0, "b": None},
    }
    assert recovery.ratios(out, "zero_gate") == {}
    rows = [
        {"stage": "distill", "start": "run"},  # the runner's row where a run from scratch begins
        {"stage": "distill", "step": 1, "tokens": 100, "loss": 1, "train_seconds": 50.0},
        {"stage": "distill", "step": 2, "tokens": 200, "loss": 1, "train_seconds": 51.0},
        {"stage": "distill", "step": 2, "tokens": 200, "eval_ppl": 3.0},
        {"stage": "distill", "step": 3, "tokens": 300, "loss": 1, "train_seconds": 60.0},
        {"stage": "distill", "step": 4, "tokens": 400, "loss": 1, "train_seconds": 62.0},
        {"stage": "distill", "step": 5, "tokens": 500, "loss": 1, "train_seconds": 63.0},
    ]
    # intervals 100/1, (eval), 100/2, 100/1: the one across the evaluation is left out
    assert recovery.step_throughput(rows) == 100.0
    rows.append({"stage": "distill", "step": 6, "tokens": 600, "loss": 1, "train_seconds": 67.0})
    assert recovery.step_throughput(rows) == 75.0  # 25, 50, 100, 100: the middle two's mean
    # a second run of the stage in the same workdir: only its own intervals count
    rows += [
        {"stage": "distill", "step": 6, "tokens": 600, "done": True},
        {"stage": "distill", "start": "run"},
        {"stage": "distill", "step": 1, "tokens": 100, "loss": 1, "train_seconds": 10.0},
        {"stage": "distill", "step": 2, "tokens": 200, "loss": 1, "train_seconds": 10.5},
    ]
    assert recovery.step_throughput(rows) == 200.0
    th = recovery.throughput(1000.0, 10**8, 2 * 10**8, "NVIDIA H200")
    assert th["mfu"] == pytest.approx(6e8 * 1000 / 989e12)
    assert th["mfu_with_teacher"] == pytest.approx((6e8 + 4e8) * 1000 / 989e12)
    assert recovery.throughput(1000.0, 10, 10, "cpu")["mfu"] is None
    assert th["mfu_with_attention"] is None  # no attention FLOPs given
    th = recovery.throughput(1000.0, 10**8, 2 * 10**8, "NVIDIA H200", 1e7, 3e7)
    assert th["attention_flops_per_token"] == 3 * 1e7 + 3e7  # the student's backward: 2x
    assert th["mfu_with_attention"] == pytest.approx((6e8 + 4e8 + 6e7) * 1000 / 989e12)


def test_attention_flops_count_the_keys_each_query_attends():
    from tiny_models import windowed_qwen2_config

    cfg = windowed_qwen2_config()  # 4 heads of 16; layer 1 has a window of 6
    per_key = 4 * 4 * 16  # q k^T and p v: 2 FLOPs per multiply-add, H Dh each
    # 8 positions: layer 0 attends 1..8 keys (mean 4.5), layer 1 min(t + 1, 6): 1..6, 6, 6
    both = per_key * (4.5 + 33 / 8)
    assert recovery.attention_flops_per_token(cfg, None, 8) == pytest.approx(both)
    mixers = ("attention", "gdn")  # a student keeping layer 0 only
    assert recovery.attention_flops_per_token(cfg, mixers, 8) == pytest.approx(per_key * 4.5)
    assert recovery.attention_flops_per_token(cfg, ("gdn", "gdn"), 8) == 0.0


def _result(complete=True):
    return {
        "teacher": "t",
        "teacher_ppl": 10.0,
        "device": "cpu",
        "date": "2026-12-04",
        "command": "python launch/recovery.py",
        "budgets": {"layers": {"train_tokens": 10}},
        "targets": {"2x_teacher": 20.0, "1.5x_teacher": 15.0},
        "runs": [
            {
                "init": "copy",
                "curve": [[0, 80.0], [100, 18.0]],
                "tokens_to_target": {"2x_teacher": 90.0, "1.5x_teacher": None},
            },
        ],
        "ratios": {"copy": {"copy": {"2x_teacher": 1.0, "1.5x_teacher": None}}},
        "throughput": None,
        "complete": complete,
    }


def test_matched_ratios_follow_the_init_along_its_curve(tmp_path):
    # copy: ppl 100 -> 10 over 0 .. 1000 tokens; the init reaches 20 at 100 tokens and 8 at 500
    copy = {"init": "copy", "curve": [[0, 1000.0], [500, 20.0], [1000, 10.0]]}
    init = {"init": "x", "curve": [[0, 50.0], [100, 20.0], [300, 10.0], [500, 8.0]]}
    got = recovery.matched_ratios([copy, init], "copy")
    assert list(got) == ["x"]  # the baseline itself is left out
    assert got["x"][0] == [100, 20.0, 5.0]  # copy needs 500 tokens for 20
    assert got["x"][1][2] == pytest.approx(1000 / 300)
    assert got["x"][2] == [500, 8.0, None]  # copy never reaches 8
    assert recovery.matched_ratios([init], "copy") == {}
    # copy already at the init's perplexity when it starts: a ratio of 0, not "never"
    early = {"init": "y", "curve": [[0, 50.0], [100, 2000.0]]}
    assert recovery.matched_ratios([copy, early], "copy")["y"] == [[100, 2000.0, 0.0]]
    result = {**_result(), "runs": [{**copy, "tokens_to_target": {}}], "matched": {"copy": got}}
    md = recovery.markdown(result)
    assert "| 100 | 20.00: 5.00x |" in md and "| 500 | 8.00 |" in md
    paths = recovery.write_outputs(result, str(tmp_path), "m")  # the plot's second panel
    assert os.path.getsize(paths["png"]) > 0


def test_markdown_and_files(tmp_path):
    md = recovery.markdown(_result())
    assert "| copy | 80.000 | 18.000 (100) | 90 | not reached |" in md
    assert "Incomplete" not in md and "Incomplete" in recovery.markdown(_result(False))
    paths = recovery.write_outputs(_result(), str(tmp_path), "x")
    assert sorted(os.listdir(tmp_path)) == ["recovery_x.json", "recovery_x.md", "recovery_x.png"]
    assert json.load(open(paths["json"]))["runs"][0]["curve"] == [[0, 80.0], [100, 18.0]]


def test_projection_extends_the_power_law_of_the_tail():
    # ppl = 1000 t^-1/2 on the last three points: 12.5 at t = 6400 exactly; the first point
    # (tokens 0) and an older steeper one are not fitted
    curve = [[0, 900.0], [10, 500.0], [100, 100.0], [400, 50.0], [1600, 25.0]]
    assert recovery.project_tokens(curve, 12.5) == pytest.approx(6400.0)
    assert recovery.project_tokens([[0, 9.0], [10, 5.0]], 1.0) is None  # one point of t > 0
    assert recovery.project_tokens([[10, 5.0], [20, 5.0]], 1.0) is None  # no descent
    # a flattening tail whose fit reaches the target before its last point, where the curve
    # was still above it: no earlier than that point
    flat = [[0, 300.0], [1e6, 10.0], [2e6, 8.0], [3e6, 7.99]]
    assert recovery.tokens_to_target(flat, 7.985) is None
    assert recovery.project_tokens(flat, 7.985) == 3e6
    runs = [
        {"init": "copy", "curve": curve, "tokens_to_target": {"a": 100.0, "b": None}},
        {"init": "x", "curve": curve, "tokens_to_target": {"a": 50.0, "b": 1600.0}},
    ]
    proj = recovery.projection(runs, {"a": 100.0, "b": 12.5})
    assert proj["tokens_to_target"] == {
        "copy": {"a": 100.0, "b": pytest.approx(6400.0)},
        "x": {"a": 50.0, "b": 1600.0},
    }
    assert proj["projected"] == {"copy": ["b"], "x": []}
    assert proj["ratios"]["copy"]["x"] == {"a": 2.0, "b": pytest.approx(4.0)}


def test_rerender_adds_the_projection_and_keeps_the_measurements(tmp_path):
    result = _result()
    result["runs"][0]["curve"] = [[0, 80.0], [100, 40.0], [400, 20.0]]
    path = tmp_path / "recovery_y.json"
    path.write_text(json.dumps(result))
    out = tmp_path / "out"
    recovery.rerender(str(path), str(out))
    saved = json.load(open(out / "recovery_y.json"))
    assert {k: v for k, v in saved.items() if k not in ("projection", "matched")} == result
    assert saved["projection"]["tokens_to_target"]["copy"]["1.5x_teacher"] == pytest.approx(
        400 * (20 / 15) ** 2
    )
    assert saved["projection"]["command"].startswith("python")
    assert "Projected" in open(out / "recovery_y.md").read()


def _part(runs, **changes):
    text = {"corpus_digest": "c", "eval_digest": "e"}
    base = {**_result(), "kept_fraction": 0.25, "eval": {"split": "test"}, "text": text}
    base["runs"] = [{"init": i, "curve": c, "complete": True} for i, c in runs]
    return {**base, **changes}


def test_rerender_refuses_a_file_that_is_not_a_recovery_result(tmp_path):
    path = tmp_path / "recovery_schedules_x.json"
    path.write_text(json.dumps({"runs": [{"init": "copy", "curve": [[0, 9.0]]}]}))
    with pytest.raises(ValueError, match="is not a recovery result"):
        recovery.rerender(str(path), str(tmp_path))


def test_merge_joins_inits_run_apart_and_recomputes_targets_and_ratios(tmp_path):
    # copy in one file, taylor_calibrate in another: copy's final ppl becomes a target of both
    a = _part([("copy", [[0, 80.0], [100, 30.0], [200, 16.0]])], date="2026-12-05T10")
    b = _part([("taylor_calibrate", [[0, 40.0], [50, 19.0], [100, 14.0]])], date="2026-12-05T11")
    merged = recovery.merge([a, b], "python merge", "joined")
    assert [r["init"] for r in merged["runs"]] == ["copy", "taylor_calibrate"]
    assert merged["targets"]["copy_final"] == 16.0
    tc = merged["runs"][1]["tokens_to_target"]
    assert tc["copy_final"] == pytest.approx(recovery.tokens_to_target(b["runs"][0]["curve"], 16))
    want = merged["runs"][0]["tokens_to_target"]["2x_teacher"] / tc["2x_teacher"]
    assert merged["ratios"]["copy"]["taylor_calibrate"]["2x_teacher"] == pytest.approx(want)
    assert [p["inits"] for p in merged["parts"]] == [["copy"], ["taylor_calibrate"]]
    # each part's code is kept; the throughput is the latest part's, whatever the order
    a, b = {**a, "source_digest": "aaa", "throughput": 1}, {**b, "git": "bbb", "throughput": 2}
    for order in ([a, b], [b, a]):
        m = recovery.merge(order, "python merge", "joined")
        assert m["throughput"] == 2
        assert {p.get("source_digest") or p.get("git") for p in m["parts"]} == {"aaa", "bbb"}
    assert merged["date"] == "2026-12-05T11" and merged["command"] == "python merge"
    assert "Runs joined from:" in recovery.markdown(merged)
    # other text, other budgets, or the same init twice: refused
    with pytest.raises(ValueError, match="text corpus_digest differs"):
        recovery.merge([a, {**b, "text": {"corpus_digest": "x", "eval_digest": "e"}}], "", "")
    with pytest.raises(ValueError, match="teacher_ppl differs"):
        recovery.merge([a, {**b, "teacher_ppl": 9.0}], "", "")
    with pytest.raises(ValueError, match="appears twice"):
        recovery.merge([a, a], "", "")


def test_a_bad_setting_stops_before_the_teacher_is_pretrained(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
    import tiny

    from taylorcal_jax.errors import ConfigError

    config = tiny.get_config("smoke")
    config.distill.split = config.eval.split  # distillation would train on the eval text
    with pytest.raises(ConfigError, match="distill.split='valid' is eval.split"):
        recovery.run_experiment(config, str(tmp_path / "wd"), ["copy"], 0.5, str(tmp_path), "x")
    assert not (tmp_path / "wd").exists()  # nothing pretrained, nothing written


def test_the_command_ends_a_bad_setting_in_error_and_hint_lines(tmp_path):
    cmd = [
        sys.executable, "launch/recovery.py", "--config=configs/tiny.py:smoke",
        f"--workdir={tmp_path / 'wd'}", "--tag=x", f"--out={tmp_path}",
        "--config.distill.split=valid",
    ]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=suite_xla_flags())
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("error: distill.split='valid' is eval.split"), proc.stderr
    assert lines[1].startswith("hint: ") and len(lines) == 2, proc.stderr
    assert not (tmp_path / "wd").exists()


@pytest.mark.slow
def test_smoke_run_end_to_end(tmp_path):
    """Two inits on the tiny smoke teacher; then a rerun skips every finished stage."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "configs"))
    import tiny

    config = tiny.get_config("smoke")
    config.distill.kl.batch_size = 8  # split over the 8 simulated devices
    config.distill.kl.train_tokens = 4 * 8 * 32
    config.distill.kl.eval_every_tokens = 2 * 8 * 32
    config.calibration.gdn.impl = "chunked"
    out = str(tmp_path / "out")
    result = recovery.run_experiment(
        config, str(tmp_path / "wd"), ["copy", "zero_gate"], 0.5, out, "smoke"
    )
    saved = json.load(open(os.path.join(out, "recovery_smoke.json")))
    assert saved["complete"] and saved == json.loads(json.dumps(result))
    for key in ("teacher", "teacher_ppl", "device", "date", "command", "targets", "runs"):
        assert key in saved
    assert set(saved["targets"]) == {"2x_teacher", "1.5x_teacher", "copy_final"}
    for run in saved["runs"]:
        tokens = [t for t, _ in run["curve"]]
        # stage 1: 0, 256, 512 tokens; stage 2 (8 x 32 per step): 512 + 512, + 1024
        assert tokens == [0, 256, 512, 1024, 1536]
        assert set(run["tokens_to_target"]) == set(saved["targets"])
    copy = saved["runs"][0]
    assert copy["tokens_to_target"]["copy_final"] <= 1536
    assert saved["throughput"]["tokens_per_second"] > 0
    assert saved["throughput"]["mfu"] is None  # no peak for a CPU
    assert saved["throughput"]["init"] == "zero_gate"  # the last init to finish

    # stage 2 alone, from the same teacher: its curve starts at the init's own perplexity
    config.teacher.path = saved["teacher"]
    alone = recovery.run_experiment(
        config, str(tmp_path / "wd_kl"), ["copy"], 0.5, out, "smoke_kl", stage1=False
    )
    assert list(alone["budgets"]) == ["kl"]
    (run,) = alone["runs"]
    assert [t for t, _ in run["curve"]] == [0, 512, 1024]
    assert run["curve"][0][1] == copy["curve"][0][1]  # the same calibrated student
    stages = [json.loads(x)["stage"] for x in open(tmp_path / "wd_kl" / "copy" / "metrics.jsonl")]
    assert "distill_layers" not in stages and "distill" in stages
