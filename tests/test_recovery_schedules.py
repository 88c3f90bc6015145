"""launch/recovery_schedules.py: recovery results of one experiment under two schedules (with
and without stage 1) set side by side; the tokens, ratios and projections it reports."""

import json

import pytest
import recovery  # launch/
import recovery_schedules  # launch/

WITH_S1 = {"layers": {"train_tokens": 100}, "kl": {"train_tokens": 200}}
ALONE = {"kl": {"train_tokens": 300}}


def _result(budgets, runs, **changes):
    base = {
        "teacher": "t",
        "teacher_name": "run",
        "teacher_ppl": 10.0,
        "device": "cpu",
        "date": "2026-12-06",
        "command": "python launch/recovery.py",
        "kept_fraction": 0.25,
        "eval": {"split": "test"},
        "text": {"corpus_digest": "c", "eval_digest": "e"},
        "budgets": budgets,
        "runs": [{"init": i, "curve": c, "complete": True} for i, c in runs],
        "complete": True,
    }
    return {**base, **changes}


COPY_S1 = [[0, 1000.0], [100, 30.0], [200, 18.0], [300, 14.0]]
TC_S1 = [[0, 50.0], [100, 19.0], [200, 14.0]]
COPY_ALONE = [[0, 1000.0], [100, 200.0], [200, 40.0], [300, 25.0]]  # never reaches 20 or 15
TC_ALONE = [[0, 50.0], [100, 22.0], [200, 17.0], [300, 14.5]]


def _pair():
    with_s1 = _result(WITH_S1, [("copy", COPY_S1), ("taylor_calibrate", TC_S1)])
    alone = _result(
        ALONE, [("copy", COPY_ALONE), ("taylor_calibrate", TC_ALONE)], date="2026-12-07"
    )
    return with_s1, alone


def test_tokens_savings_and_leads_per_schedule(tmp_path):
    with_s1, alone = _pair()
    code = {"command": "python cmp", "git": "abc", "source_digest": "d1", "date": "now"}
    out = recovery_schedules.compare([with_s1, {**alone, "source_digest": "d0"}], code, "t1")
    # the comparison's own code at the top, each run's with its source
    assert out["command"] == "python cmp" and out["git"] == "abc" and out["source_digest"] == "d1"
    assert [s.get("source_digest") for s in out["sources"]] == [None, "d0"]
    s1, s2 = recovery_schedules.WITH_STAGE1, recovery_schedules.STAGE2_ALONE
    assert [s["schedule"] for s in out["sources"]] == [s1, s2]
    assert out["targets"] == {"2x_teacher": 20.0, "1.5x_teacher": 15.0}
    assert out["date"] == "2026-12-07"
    table = out["tokens_to_target"]
    # measured where the curve gets there, projected (and marked) where it stops short
    assert table[s1]["copy"]["2x_teacher"] == [recovery.tokens_to_target(COPY_S1, 20.0), False]
    proj = recovery.project_tokens(COPY_ALONE, 20.0)
    assert proj > 300 and table[s2]["copy"]["2x_teacher"] == [proj, True]
    tc_alone = recovery.tokens_to_target(TC_ALONE, 15.0)
    tc_s1 = recovery.tokens_to_target(TC_S1, 15.0)
    saving = out["stage1_saving"]["taylor_calibrate"]["1.5x_teacher"]
    assert saving == pytest.approx(tc_alone / tc_s1) and saving > 1
    lead = out["copy_ratio"][s2]["taylor_calibrate"]["2x_teacher"]
    assert lead == pytest.approx(proj / recovery.tokens_to_target(TC_ALONE, 20.0))
    assert out["copy_ratio"][s1]["copy"]["2x_teacher"] == 1.0
    naive = out["full_vs_naive"]["taylor_calibrate"]["2x_teacher"]
    assert naive == pytest.approx(proj / recovery.tokens_to_target(TC_S1, 20.0))
    paths = recovery_schedules.write_outputs(out, str(tmp_path))
    assert json.load(open(paths["json"]))["stage1_saving"] == out["stage1_saving"]
    md = open(paths["md"]).read()
    assert f"{proj / 1e6:.2f}M*" in md and "What stage 1 saves" in md
    # ratios on a projected count are starred too (copy's stage-2-alone 2x figure), the others not
    assert f"| taylor_calibrate | {lead:.2f}x* |" in md and f"| {naive:.2f}x* |" in md
    assert (
        f"| taylor_calibrate | {out['copy_ratio'][s1]['taylor_calibrate']['2x_teacher']:.2f}x |"
        in md
    )
    assert open(paths["png"], "rb").read(4) == b"\x89PNG"


def test_refuses_results_that_differ_in_more_than_the_schedule():
    with_s1, alone = _pair()
    other_text = {**alone, "text": {"corpus_digest": "c", "eval_digest": "x"}}
    with pytest.raises(ValueError, match="text eval_digest differs"):
        recovery_schedules.compare([with_s1, other_text], {"command": ""}, "")
    with pytest.raises(ValueError, match="device differs"):
        recovery_schedules.compare([with_s1, {**alone, "device": "gpu"}], {"command": ""}, "")
    with pytest.raises(ValueError, match="a schedule appears twice"):
        recovery_schedules.compare([with_s1, with_s1], {"command": ""}, "")
    with pytest.raises(ValueError, match="cannot read the result file .*missing.json"):
        recovery.read_results(["/nonexistent/missing.json"])
