"""Per-kernel GPU times of our gated delta rule and of FLA's, under Nsight Compute (ncu).

Each side runs in its own process under `ncu --metrics gpu__time_duration.sum` with profiling off
until the timed region: warm-up calls first (compilation, XLA and Triton autotuning), then
cudaProfilerStart, one forward, a marker kernel (`profile_marker`, a one-thread CuPy kernel whose
only job is to separate the forward's kernels from the forward + backward's in the listing), one
forward + backward, cudaProfilerStop. Clocks and caches are left alone (--clock-control none
--cache-control none), so each kernel's duration is what it takes inside the real sequence, not
with cold caches; launch gaps are not included, so the sums sit a little under the wall-clock
medians of bench_gdn_kernel.py.

Ours is the library's bfloat16 path with BF16Config() or the fields given by --config.

Usage (device, FLA wheels on PYTHONPATH):
  python3 launch/profile_gdn_ncu.py --fla --row 0 --out $OUT/gdn_ncu_row0.json
Writes, per side: every kernel (name, grid, block, microseconds) of the forward and of the forward
+ backward, the same summed by kernel name, and the totals; plus device, versions, date, command.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_gdn_kernel import ROWS, bf16_config, device_inputs, make_inputs  # noqa: E402
from results_io import provenance  # noqa: E402

MARKER = "profile_marker"
_UNIT_US = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}


def _marker():
    """A named one-thread kernel, launched between the forward and the forward + backward."""
    import cupy

    src = r'extern "C" __global__ void profile_marker(int* x) { x[0] += 1; }'
    kern = cupy.RawKernel(src, MARKER)
    buf = cupy.zeros(1, dtype=cupy.int32)
    return lambda: (kern((1,), (1,), (buf,)), cupy.cuda.runtime.deviceSynchronize())


def _profiler(on: bool):
    import cupy

    (cupy.cuda.runtime.profilerStart if on else cupy.cuda.runtime.profilerStop)()


def run_ours(fields, row):
    import jax

    from taylorcal_jax.ops.gdn.pallas_gpu.op import gated_delta_rule_pallas

    cfg = bf16_config(fields)
    args, do_ = device_inputs(ROWS[row])
    op = lambda *a: gated_delta_rule_pallas(*a, config=cfg, interpret=None)[0]  # noqa: E731
    fwd = jax.jit(op)

    @jax.jit
    def fb(*a):
        o, vjp = jax.vjp(op, *a[:5])
        return o, vjp(a[5])

    marker = _marker()
    for _ in range(3):
        jax.block_until_ready(fwd(*args))
        jax.block_until_ready(fb(*args, do_))
    _profiler(True)
    jax.block_until_ready(fwd(*args))
    marker()
    jax.block_until_ready(fb(*args, do_))
    _profiler(False)


def run_fla(row):
    import fla.ops.common.chunk_o as chunk_o
    import torch
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    chunk_o.IS_NVIDIA_HOPPER = False  # timing only, as in bench_gdn_kernel.run_fla

    q, k, v, g, beta, do = make_inputs(ROWS[row])
    t = lambda x, dt=torch.bfloat16: torch.from_numpy(x).cuda().to(dt)  # noqa: E731
    q_, k_, v_, beta_, do_ = t(q), t(k), t(v), t(beta), t(do)
    g_ = t(g, torch.float32)
    leaves = (q_, k_, v_, g_, beta_)
    for x in leaves:
        x.requires_grad_(True)

    def fwd():
        return chunk_gated_delta_rule(q_, k_, v_, g_, beta_, use_qk_l2norm_in_kernel=True)[0]

    def fb():
        for x in leaves:
            x.grad = None
        fwd().backward(do_)

    marker = _marker()
    for _ in range(3):  # autotuning happens here, outside the profiled region
        with torch.no_grad():
            fwd()
        fb()
    torch.cuda.synchronize()
    _profiler(True)
    with torch.no_grad():
        fwd()
    torch.cuda.synchronize()
    marker()
    fb()
    torch.cuda.synchronize()
    _profiler(False)


def parse_ncu_csv(text):
    """Kernel rows of `ncu --csv` (details page, one metric): [(name, grid, block, us)]."""
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith('"ID"'))
    rows = []
    for r in csv.DictReader(io.StringIO("\n".join(lines[start:]))):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        val = float(r["Metric Value"].replace(",", ""))
        rows.append(
            (
                r["Kernel Name"],
                r.get("Grid Size", ""),
                r.get("Block Size", ""),
                val * _UNIT_US[r["Metric Unit"]],
            )
        )
    return rows


def _short(name):
    """Kernel name without template and argument lists, for grouping."""
    return re.sub(r"[<(].*", "", name)[:80]


def summarise(rows):
    """Split at the marker into forward and forward + backward, sum by kernel name."""
    cut = next(i for i, r in enumerate(rows) if r[0].startswith(MARKER))
    out = {}
    for part, ks in (("fwd", rows[:cut]), ("fwdbwd", rows[cut + 1 :])):
        by_name = {}
        for name, _, _, us in ks:
            by_name[_short(name)] = by_name.get(_short(name), 0.0) + us
        out[part] = {
            "total_us": sum(r[3] for r in ks),
            "n_kernels": len(ks),
            "by_name_us": dict(sorted(by_name.items(), key=lambda kv: -kv[1])),
            "kernels": [
                {"name": _short(n), "grid": g, "block": b, "us": round(us, 2)} for n, g, b, us in ks
            ],
        }
    return out


def _run_ncu(ncu_flags, log, side_args, timeout):
    """Runs this script's profiled side (`side_args`) under ncu with profiling off until the side
    starts it (--profile-from-start off), clocks untouched, report to `log`."""
    ncu = shutil.which("ncu") or "/usr/local/cuda/bin/ncu"
    cmd = [
        ncu,
        "--clock-control",
        "none",
        "--profile-from-start",
        "off",
        *ncu_flags,
        "--log-file",
        log,
        sys.executable,
        os.path.abspath(__file__),
        *side_args,
    ]
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def profile_side(side_args, tag, out_dir, timeout):
    log = os.path.join(out_dir, f"ncu_{tag}.csv")
    flags = ["--cache-control", "none", "--metrics", "gpu__time_duration.sum", "--csv"]
    t0 = time.perf_counter()
    p = _run_ncu(flags, log, side_args, timeout)
    res = {"wall_s": round(time.perf_counter() - t0, 1), "rc": p.returncode}
    try:
        res.update(summarise(parse_ncu_csv(open(log).read())))
    except Exception as e:  # noqa: BLE001 - report what ncu said instead
        res["error"] = f"{type(e).__name__}: {e}"
        res["stderr_tail"] = (p.stdout + p.stderr)[-3000:]
    return res


def detail_side(side_args, kernels, count, out_dir, timeout):
    """ncu --set detailed (speed of light, memory workload, scheduler and warp-state statistics,
    occupancy, launch statistics) of the first `count` launches whose names match the regex
    `kernels`; the text report goes to ncu_detail_<side>.txt."""
    path = os.path.join(out_dir, f"ncu_detail_{side_args[1]}.txt")
    flags = ["--set", "detailed", "-k", f"regex:{kernels}", "--launch-count", str(count)]
    p = _run_ncu(flags, path, side_args, timeout)
    tail = (p.stdout + p.stderr)[-800:]
    return {"rc": p.returncode, "report": os.path.basename(path), "tail": tail}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", default=None, help=argparse.SUPPRESS)  # internal: the profiled run
    ap.add_argument("--config", default="{}", help="BF16Config fields as JSON ('{}' = default)")
    ap.add_argument("--fla", action="store_true", help="also profile FLA's chunk_gated_delta_rule")
    ap.add_argument("--row", type=int, default=0)
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--out", default="gdn_ncu.json")
    ap.add_argument(
        "--detail",
        default=None,
        help="regex of kernel names: instead of the timing table, ncu's detailed sections for "
        "the first --detail-count matching launches of each side (text report per side)",
    )
    ap.add_argument("--detail-count", type=int, default=3)
    a = ap.parse_args()
    if a.side == "fla":
        return run_fla(a.row)
    if a.side == "ours":
        return run_ours(json.loads(a.config), a.row)
    out_dir = os.path.dirname(os.path.abspath(a.out))
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # this driver only reads the device name
    result = provenance()
    for pkg in ("torch", "triton", "fla"):
        try:
            result[pkg] = __import__(pkg).__version__
        except ImportError:
            result[pkg] = None
    bf16_config(json.loads(a.config))  # a bad field is a one-line error before any device work
    result.update(shape=list(ROWS[a.row]), dtype="bfloat16", config=json.loads(a.config), sides={})
    sides = [("ours", ["--side", "ours", "--config", a.config, "--row", str(a.row)])]
    if a.fla:
        sides.append(("fla", ["--side", "fla", "--row", str(a.row)]))
    for tag, side_args in sides:
        if a.detail:
            res = detail_side(side_args, a.detail, a.detail_count, out_dir, a.timeout)
            print(tag, res, flush=True)
            result["sides"][tag] = res
            with open(a.out, "w") as f:
                json.dump(result, f, indent=1)
            continue
        res = profile_side(side_args, tag, out_dir, a.timeout)
        result["sides"][tag] = res
        with open(a.out, "w") as f:  # after each side: a timeout later keeps what was measured
            json.dump(result, f, indent=1)
        print(f"--- {tag}: rc {res['rc']}, {res['wall_s']} s", flush=True)
        for part in ("fwd", "fwdbwd"):
            if part in res:
                top = list(res[part]["by_name_us"].items())[:12]
                tot, n = res[part]["total_us"], res[part]["n_kernels"]
                print(f"  {part}: {tot:.0f} us in {n} kernels")
                for n, us in top:
                    print(f"    {us:9.1f}  {n}")
        if "error" in res:
            print(res["error"], res["stderr_tail"][-1500:], flush=True)


if __name__ == "__main__":
    main()
