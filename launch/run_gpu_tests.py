"""Run the gpu-marked tests on the device machine, one pytest process per test, in parallel.

Compiling the Pallas kernels is CPU work (Triton, ptxas), and the fp32 cases at "highest"
precision take minutes each; run one after another they do not fit one 10-minute device call.
Each test gets its own process (XLA_PYTHON_CLIENT_PREALLOCATE=false, so that they share the
card) and the processes run --jobs at a time, longest-compiling (fp32) first. Writes to --out-dir
one log (each test's output under its id) and a JSON summary (outcome and seconds per test id,
device, versions, command, git revision and source digest): two files, as the device call
brings back only a few.

Usage (device): python3 launch/run_gpu_tests.py [--select EXPR] [--jobs 12] --out-dir $OUT
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import re
import subprocess
import sys
import time

import results_io  # launch/

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CollectionError(RuntimeError):
    """pytest could not collect the tests (a file that fails to import, a bad path)."""


def collect(paths: list[str], select: str | None) -> list[str]:
    """Node ids of the gpu-marked tests under `paths` (and -k `select`); CollectionError with
    pytest's report where it could not collect them all (a file that fails to import would
    otherwise drop out of the run and of its summary unseen)."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "--collect-only", "-q", *paths]
    cmd += ["-k", select] if select else []
    p = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True)
    if p.returncode not in (0, 5):  # 5: nothing selected, reported by the caller
        # the failing files and their exceptions, as pytest's report gives them
        errors = [ln for ln in p.stdout.splitlines() if re.match(r"ERROR \S|E  |\S.* while ", ln)]
        report = "\n".join(errors) or (p.stdout + p.stderr).strip()[-2000:]
        raise CollectionError(
            f"pytest could not collect the tests (exit {p.returncode}):\n{report}"
        )
    return [ln.strip() for ln in p.stdout.splitlines() if "::" in ln]


def longest_first(ids: list[str]) -> list[str]:
    """fp32 cases first: their compilation is the long pole (a stable sort keeps the order)."""
    return sorted(ids, key=lambda node_id: "float32" not in node_id)


OUTCOMES = ("passed", "failed", "skipped", "timeout")


def outcome(returncode: int, text: str) -> str:
    """One of OUTCOMES for a one-test pytest process (124: killed at the time limit)."""
    if returncode == 124:
        return "timeout"
    if returncode == 0 and re.search(r"\b1 passed\b", text):
        return "passed"
    if returncode == 0 and re.search(r"\b1 skipped\b", text):
        return "skipped"
    return "failed"


def _env() -> dict:
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_one(node_id: str, timeout_s: int) -> dict:
    """Outcome, seconds and output of one test in its own process."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", node_id],
            cwd=REPO,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        code, text = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        code = 124
        text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        text += f"\nkilled after {timeout_s} s"
    seconds = time.perf_counter() - t0
    return {
        "id": node_id,
        "outcome": outcome(code, text),
        "seconds": round(seconds, 1),
        "log": text,
    }


def versions() -> dict:
    """JAX's version and device kind, from a process of its own (this one holds no GPU)."""
    probe = "import jax; print(jax.__version__); print(jax.devices()[0].device_kind)"
    p = subprocess.run([sys.executable, "-c", probe], env=_env(), capture_output=True, text=True)
    lines = p.stdout.split("\n")
    return (
        {"jax": lines[0], "device": lines[1]}
        if p.returncode == 0
        else {"probe_error": p.stderr[-500:]}
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="*", default=["tests"], help="test files or folders")
    ap.add_argument("--select", default=None, help="pytest -k expression")
    ap.add_argument("--jobs", type=int, default=12)
    ap.add_argument("--timeout", type=int, default=540, help="seconds per test")
    ap.add_argument("--out-dir", required=True)
    a = ap.parse_args(argv)
    os.makedirs(a.out_dir, exist_ok=True)
    try:
        ids = longest_first(collect(a.paths, a.select))
    except CollectionError as e:
        print(e, file=sys.stderr)
        return 2
    if not ids:
        where = " ".join(a.paths) + (f" -k {a.select!r}" if a.select else "")
        print(f"no gpu-marked tests selected in {where} (pass the test files)", file=sys.stderr)
        return 2
    print(f"{len(ids)} tests, {a.jobs} at a time", flush=True)
    t0 = time.perf_counter()
    results = []
    with cf.ThreadPoolExecutor(a.jobs) as pool:
        futures = [pool.submit(run_one, i, a.timeout) for i in ids]
        for fut in cf.as_completed(futures):
            results.append(fut.result())
            r = results[-1]
            print(f"{r['outcome']:8} {r['seconds']:6.0f}s {r['id']}", flush=True)
    results.sort(key=lambda r: ids.index(r["id"]))
    with open(os.path.join(a.out_dir, "gpu_tests.log"), "w") as f:
        for r in results:
            f.write(f"===== {r['id']} ({r['outcome']}, {r['seconds']} s)\n{r.pop('log')}\n")
    argv = sys.argv[1:] if argv is None else argv
    summary = {
        **results_io.invocation(),  # date, git, source digest, XLA_FLAGS
        "command": "python3 launch/run_gpu_tests.py " + " ".join(argv),
        **versions(),
        "counts": {o: sum(r["outcome"] == o for r in results) for o in OUTCOMES},
        "wall_seconds": round(time.perf_counter() - t0, 1),  # all tests, `jobs` at a time
        "tests": results,
    }
    with open(os.path.join(a.out_dir, "gpu_tests_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(summary["counts"], flush=True)
    return 0 if summary["counts"].get("passed", 0) == len(ids) else 1


if __name__ == "__main__":
    sys.exit(main())
