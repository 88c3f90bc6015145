"""launch/run_gpu_tests.py: its rules, and one run here, where a gpu test can only be skipped."""

import json

import run_gpu_tests  # from launch/ (tests/conftest.py)


def test_outcome_reads_pytest_summaries():
    assert run_gpu_tests.outcome(0, "..\n1 passed in 3.2s") == "passed"
    assert run_gpu_tests.outcome(0, "1 skipped in 0.1s") == "skipped"
    assert run_gpu_tests.outcome(1, "1 failed, 0 passed") == "failed"
    assert run_gpu_tests.outcome(0, "11 passed") == "failed"  # not one test per process
    assert run_gpu_tests.outcome(124, "") == "timeout"


def test_fp32_cases_go_first_and_keep_their_order():
    ids = ["t[bf16-a]", "t[float32-a]", "u[x]", "t[float32-b]"]
    assert run_gpu_tests.longest_first(ids) == ["t[float32-a]", "t[float32-b]", "t[bf16-a]", "u[x]"]


def test_a_run_without_a_gpu_reports_the_test_skipped(tmp_path):
    code = run_gpu_tests.main(
        [
            "tests/test_gdn_pallas.py",
            "--select",
            "api_pallas_residuals and inputs",
            "--jobs",
            "1",
            "--out-dir",
            str(tmp_path),
        ]
    )
    with open(tmp_path / "gpu_tests_summary.json") as f:
        summary = json.load(f)
    assert code == 1  # nothing passed
    assert summary["counts"]["skipped"] == 1 and len(summary["tests"]) == 1
    assert summary["wall_seconds"] >= summary["tests"][0]["seconds"]
    assert "inputs" in summary["tests"][0]["id"]
    assert "skipped" in (tmp_path / "gpu_tests.log").read_text()
    assert (
        summary["source_digest"]
        and "git" in summary
        and summary["command"].endswith(f"--out-dir {tmp_path}")
    )


def test_an_empty_selection_names_the_files_and_the_expression(tmp_path, capsys):
    argv = ["tests/test_run_gpu_tests.py", "--select", "gdn", "--out-dir", str(tmp_path)]
    assert run_gpu_tests.main(argv) == 2
    assert capsys.readouterr().err.strip() == (
        "no gpu-marked tests selected in tests/test_run_gpu_tests.py -k 'gdn' (pass the test files)"
    )


def test_a_test_file_that_fails_to_import_fails_the_run(tmp_path, capsys):
    """Collection errors are not dropped: the run stops before any test, naming the file."""
    broken = tmp_path / "test_broken_gpu.py"
    broken.write_text(
        "import pytest\nimport a_module_that_is_not_installed\n\n\n"
        "@pytest.mark.gpu\ndef test_x():\n    pass\n"
    )
    argv = ["tests/test_gdn_pallas.py", str(broken), "--select", "api_pallas_residuals"]
    assert run_gpu_tests.main([*argv, "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "could not collect" in err and "test_broken_gpu.py" in err
    assert not (tmp_path / "out" / "gpu_tests_summary.json").exists()
