"""launch/ab_decode.sh: the trees step writes one source tree per git revision, and the run step
times the decoding steps of each tree in turn (here on the CPU, the probe's small preset)."""

import json
import os
import shutil
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "launch", "ab_decode.sh")


def _sh(*args, **env):
    return subprocess.run(
        ["bash", SCRIPT, *args], cwd=REPO, env={**os.environ, **env}, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip


def test_trees_then_an_alternating_run_over_them(tmp_path):
    ab, out = tmp_path / "ab", tmp_path / "out"
    made = _sh("trees", "HEAD", AB_DIR=str(ab))
    assert made.returncode == 0, made.stderr
    sha = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    assert f"run TAG {sha}" in made.stdout
    for part in ("taylorcal_jax/__init__.py", "launch/probe_decode.py", "tests", "setup.cfg"):
        assert (ab / sha / part).exists(), part
    shutil.copytree(ab / sha, ab / "other")  # a second version to alternate with
    env = dict(AB_DIR=str(ab), OUT=str(out), ROUNDS="1", ROWS="64x1", RUN_S="300",
               PROBE_ARGS="--preset=small --repeats=1")  # fmt: skip
    ran = _sh("run", "t", sha, "other", **env)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    for tree in (sha, "other"):
        result = json.loads((out / f"probe_decode_cpu_t_{tree}.json").read_text())
        run = result["runs"]["defaults_joined"]
        assert run["status"] == "ok", run
        assert [r["model"] for r in run["records"]] == ["teacher", "student"]
    # GPU_TESTS: the selected gpu-marked tests of the last tree first (skipped off a GPU), then
    # the runs, which the tests' time counts against
    tested = _sh("run", "t", sha, "other", **{**env, "BUDGET_S": "-1",
                 "GPU_TESTS": "test_compiled_kernel_equals_xla_on_gpu and gemv"})  # fmt: skip
    assert tested.returncode == 0 and "gpu tests of other done" in tested.stdout, tested.stdout
    summary = json.loads((out / "gpu" / "gpu_tests_summary.json").read_text())
    assert summary["counts"]["skipped"] == len(summary["tests"]) >= 1
    assert tested.stdout.count("skipped cpu_t_") == 2
    # past the budget every run is skipped, and said so
    skipped = _sh("run", "t", sha, "other", **{**env, "BUDGET_S": "-1", "ROUNDS": "2"})
    assert skipped.returncode == 0 and skipped.stdout.count("skipped cpu_t_") == 4


def test_bad_arguments_are_one_line_errors(tmp_path):
    for args, message in (
        ((), "usage"),
        (("trees",), "at least one git revision"),
        (("trees", "no-such-revision"), ""),
        (("run", "t", "only-one"), "at least two revisions"),
        (("run", "t", "a", "b"), "no tree"),
    ):
        got = _sh(*args, AB_DIR=str(tmp_path / "ab"))
        assert got.returncode != 0, args
        assert message in got.stderr, (args, got.stderr)
