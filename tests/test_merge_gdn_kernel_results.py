"""launch/merge_gdn_kernel_results.py on the committed H100 result file split into parts."""

import copy
import json
import os

import merge_gdn_kernel_results as merge  # from launch/ (tests/conftest.py)
import pytest

RESULT = os.path.join(os.path.dirname(merge.__file__), "results", "gdn_kernel_h100.json")


def _parts():
    with open(RESULT) as f:
        whole = json.load(f)
    a, b = copy.deepcopy(whole), copy.deepcopy(whole)
    # out of order on purpose: the merge orders rows as the bench's ROWS
    a["rows"], b["rows"] = whole["rows"][2:], whole["rows"][:2]
    a["command"], b["command"] = "bench --rows 2,3", "bench --rows 0,1"
    a["date"], b["date"] = "2026-11-27T21:00:00+00:00", "2026-11-27T21:10:00+00:00"
    return whole, [a, b]


def test_merge_keeps_every_row_in_bench_order_and_each_parts_provenance():
    whole, parts = _parts()
    merged = merge.merge_parts(parts, "merge a b")
    assert merged["rows"] == whole["rows"]
    assert merged["command"] == "merge a b" and merged["date"] == "2026-11-27T21:10:00+00:00"
    assert [p["command"] for p in merged["parts"]] == ["bench --rows 2,3", "bench --rows 0,1"]
    assert merged["parts"][1]["shapes"] == [r["shape"] for r in whole["rows"][:2]]
    for key in ("device", "jax", "torch", "fla", "ours_config_fields"):
        assert merged[key] == whole[key]


def test_merge_refuses_parts_from_other_conditions_or_the_same_shape_twice():
    _, parts = _parts()
    parts[1]["device"] = "another card"
    with pytest.raises(ValueError, match="device"):
        merge.merge_parts(parts, "merge")
    _, parts = _parts()
    parts[1]["rows"] = parts[0]["rows"]
    with pytest.raises(ValueError, match="timed in parts 0 and 1"):
        merge.merge_parts(parts, "merge")
    with pytest.raises(ValueError, match="no parts"):
        merge.merge_parts([], "merge")


def test_cli_writes_the_merged_file_and_reports_unreadable_parts(tmp_path, capsys):
    _, parts = _parts()
    paths = []
    for i, part in enumerate(parts):
        paths.append(str(tmp_path / f"part{i}.json"))
        with open(paths[-1], "w") as f:
            json.dump(part, f)
    out = str(tmp_path / "merged.json")
    assert merge.main([*paths, "--out", out]) == 0
    with open(out) as f:
        assert len(json.load(f)["rows"]) == 4
    (tmp_path / "bad.json").write_text("{not json")
    assert merge.main([paths[0], str(tmp_path / "bad.json"), "--out", out]) == 2
    assert "cannot read" in capsys.readouterr().err
