"""Benchmark of the Pallas gated delta rule against flash-linear-attention and the XLA chunked op.

The shape rows (B, T, H, D): the four of docs/benchmarks.md at head dim 128, and row 4 at
SmolLM2-135M's stage-2 shape (batch 24 x 2048, 9 heads of dim 64); bf16 q/k/v/beta and fp32 g,
in one call on one GPU (docs/kernel.md, "Benchmarking"). Each JAX row runs in a fresh subprocess
(XLA_PYTHON_CLIENT_PREALLOCATE=false) so that its peak device memory
(memory_stats()["peak_bytes_in_use"], read right after our first forward+backward call, run
alone, inputs included) is its own; FLA then runs in a fresh torch process per row (in one
process its times depend on the rows before it; peak = torch.cuda.max_memory_allocated over one
forward+backward after reset, inputs included).

Timing, the same for both sides: after warm-up calls, 10 batches of 10 calls issued back to back
with one device synchronisation per batch; the figure is the median over batches of
(batch time / 10), i.e. device time per call with the host's dispatch overlapped, as in a training
step. FLA is also timed by triton.testing.do_bench (`fla_*_dobench_ms`, CUDA events around each
call), as a check of the method. Forward+backward = the output and the gradients of (q, k, v, g,
beta) for a random cotangent. Relative error = ||o - o_ref|| / ||o_ref|| with o_ref from the
per-token fp32 recurrence (reference.py, jit on the GPU, matmul precision "highest") on the same
bf16-rounded inputs at the full shape.

Ours is the library's bfloat16 kernel path with BF16Config() or the fields given by --config. A
check step first runs forward + gradients at [2, 300, 4, 128] against the fp32 reference
(--skip-check skips it; --check-f32 adds the float32 path). Progress is printed per row.

Usage (device): python3 launch/bench_gdn_kernel.py --skip-check --skip-chunked --out $OUT/t.json
  (ours and FLA on rows 0-3, `--rows 4` for the head-dim-64 one; --skip-chunked leaves out
  the XLA chunked op, ~15 s a row; `--fla-rows ""` times ours alone, e.g. under --config)
Modes used internally: --mode check | jax --row i | fla.
"""

# ruff: noqa: B023  (closures are called inside the loop iteration that defines them)
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time

ROWS = [
    (8, 4096, 16, 128),
    (4, 8192, 16, 128),
    (1, 32768, 16, 128),
    (16, 2048, 12, 128),
    (24, 2048, 9, 64),
]
if os.environ.get("BENCH_GDN_TINY") == "1":  # local plumbing smoke test (CPU, interpret mode)
    ROWS = [(1, 128, 2, 32), (2, 64, 2, 32)]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK_TOL = {"o": 6e-3, "state": 6e-3, "grads": 1e-2}  # bf16 vs the fp32 reference, ||.||_2


def make_inputs(shape, seed=0):
    """float32 numpy inputs (q, k, v, g, beta, do); q/k/v/beta/do are rounded to bf16 by callers."""
    import numpy as np

    b, t, h, d = shape
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, h, d), dtype=np.float32)
    k = rng.standard_normal((b, t, h, d), dtype=np.float32)
    v = rng.standard_normal((b, t, h, d), dtype=np.float32)
    g = -rng.uniform(0.005, 0.3, size=(b, t, h)).astype(np.float32)
    beta = (1.0 / (1.0 + np.exp(-rng.standard_normal((b, t, h))))).astype(np.float32)
    do = rng.standard_normal((b, t, h, d), dtype=np.float32)
    return q, k, v, g, beta, do


def device_inputs(shape, seed=0):
    """make_inputs on the device as the op takes them: ([q, k, v, g, beta], do); bf16 except g."""
    import jax.numpy as jnp

    q, k, v, g, beta, do = make_inputs(shape, seed)
    bf = jnp.bfloat16
    args = [jnp.asarray(q, bf), jnp.asarray(k, bf), jnp.asarray(v, bf), jnp.asarray(g)]
    return args + [jnp.asarray(beta, bf)], jnp.asarray(do, bf)


def bf16_config(fields: dict):
    """The library's bfloat16-path configuration with `fields` replaced ({} = its defaults)."""
    from taylorcal_jax.ops.gdn.pallas_gpu.config import BF16Config

    return BF16Config(**fields)


def _config_from_env():
    return bf16_config(json.loads(os.environ.get("GDN_BENCH_CONFIG", "{}")))


def ref_path(i):
    return f"/tmp/gdn_ref_row{i}.npy"


def chunked_path(i):
    """The XLA chunked op's bf16 output at row i, for the direct chunked-vs-FLA comparison."""
    return f"/tmp/gdn_chunked_row{i}.npy"


# ----------------------------------------------------------------------------- JAX side


def _pipelined_ms(call, sync, batches=10, per_batch=10):
    """Median over batches of the per-call time (ms) of `per_batch` calls issued back to back,
    one sync() per batch: the device time per call once the host's dispatch overlaps it."""
    import numpy as np

    ts = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(per_batch):
            out = call()
        sync(out)
        ts.append((time.perf_counter() - t0) * 1e3 / per_batch)
    return float(np.median(ts))


def _jax_timer(fn, args, warm=3):
    """Pipelined median (_pipelined_ms) of a jitted call, after `warm` calls."""
    import jax

    for _ in range(warm):
        jax.block_until_ready(fn(*args))
    return _pipelined_ms(lambda: fn(*args), jax.block_until_ready)


def _rel(a, b):
    import numpy as np

    a = np.asarray(a, np.float32).astype(np.float64)
    b = np.asarray(b, np.float32).astype(np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _xla_memory(fn, args):
    """XLA's own accounting of one compiled call (MiB): arguments, outputs, and the temporaries
    its buffer assignment needs at once."""
    try:
        m = fn.lower(*args).compile().memory_analysis()
    except Exception as e:  # noqa: BLE001 - not every backend reports it
        return {"ours_xla_memory_error": f"{type(e).__name__}: {str(e)[:200]}"}
    mib = lambda x: float(x) / 2**20  # noqa: E731
    return {
        "ours_xla_argument_mib": mib(m.argument_size_in_bytes),
        "ours_xla_output_mib": mib(m.output_size_in_bytes),
        "ours_xla_temp_mib": mib(m.temp_size_in_bytes),
    }


def _fwd_fwdbwd(fn):
    import jax

    fwd = jax.jit(lambda q, k, v, g, beta: fn(q, k, v, g, beta)[0])

    def fb(q, k, v, g, beta, do):
        o, vjp = jax.vjp(lambda *a: fn(*a)[0], q, k, v, g, beta)
        return o, vjp(do)

    return fwd, jax.jit(fb)


def run_jax_row(i):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from taylorcal_jax.ops.gdn.pallas_gpu.op import gated_delta_rule_pallas
    from taylorcal_jax.ops.gdn.reference import gated_delta_rule_reference

    shape = ROWS[i]
    args, do_ = device_inputs(shape)
    res = {"shape": list(shape), "dtype": "bfloat16"}
    dev = jax.devices()[0]
    cfg = _config_from_env()
    res["ours_config"] = {"path": cfg.path, **dataclasses.asdict(cfg)}

    def ours(*a):
        return gated_delta_rule_pallas(*a, interpret=None, config=cfg)

    fwd, fb = _fwd_fwdbwd(ours)
    try:
        res.update(_xla_memory(fb, args + [do_]))
        jax.block_until_ready(fb(*args, do_))  # one call alone, as FLA's peak is taken
        stats = dev.memory_stats()
        if stats:
            res["ours_peak_mib"] = stats["peak_bytes_in_use"] / 2**20
        res["ours_fwdbwd_ms"] = _jax_timer(fb, args + [do_])
        res["ours_fwd_ms"] = _jax_timer(fwd, args)
        o_ours = np.asarray(fwd(*args).astype(jnp.float32))
    except Exception as e:  # noqa: BLE001 - report and go on with the other measurements
        res["ours_error"] = f"{type(e).__name__}: {str(e)[:2000]}"
        o_ours = None
    with jax.default_matmul_precision("highest"):
        ref = jax.jit(lambda *a: gated_delta_rule_reference(*(x.astype(jnp.float32) for x in a))[0])
        o_ref = np.asarray(ref(*args))
    np.save(ref_path(i), o_ref)
    if o_ours is not None:
        res["ours_rel_err"] = _rel(o_ours, o_ref)
    if os.environ.get("GDN_BENCH_SKIP_CHUNKED") == "1":
        print("JSONROW " + json.dumps(res), flush=True)
        return
    try:
        from taylorcal_jax.ops.gdn.chunked import gated_delta_rule_chunked

        cfwd, cfb = _fwd_fwdbwd(lambda *a: gated_delta_rule_chunked(*a))
        res["chunked_fwd_ms"] = _jax_timer(cfwd, args)
        o_chunked = np.asarray(cfwd(*args).astype(jnp.float32))
        res["chunked_rel_err"] = _rel(o_chunked, o_ref)
        np.save(chunked_path(i), o_chunked)
        del o_chunked
        res["chunked_fwdbwd_ms"] = _jax_timer(cfb, args + [do_])
    except Exception as e:  # noqa: BLE001
        res["chunked_error"] = f"{type(e).__name__}: {str(e)[:1000]}"
    print("JSONROW " + json.dumps(res), flush=True)


def _check_config(cfg, dt, tag, out):
    """Forward + gradients at [2, 300, 4, 128] (odd T, initial and final state) vs the fp32
    per-token reference. Records errors under `tag` and returns whether they pass CHECK_TOL."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from taylorcal_jax.ops.gdn.pallas_gpu.op import gated_delta_rule_pallas
    from taylorcal_jax.ops.gdn.reference import gated_delta_rule_reference

    tiny = os.environ.get("BENCH_GDN_TINY") == "1"
    b, t, h, d = (1, 40, 2, 32) if tiny else (2, 300, 4, 128)
    q, k, v, g, beta, do = make_inputs((b, t, h, d), seed=1)
    s0 = np.random.default_rng(2).standard_normal((b, h, d, d)).astype(np.float32)
    args = [
        jnp.asarray(q, dt),
        jnp.asarray(k, dt),
        jnp.asarray(v, dt),
        jnp.asarray(g),
        jnp.asarray(beta, dt),
        jnp.asarray(s0),
    ]
    do_ = jnp.asarray(do, dt)
    dst = jnp.asarray(np.random.default_rng(3).standard_normal((b, h, d, d)), jnp.float32)

    def loss(fn, *a, **kw):
        o, s = fn(*a[:5], initial_state_bhkv=a[5], output_final_state=True, **kw)
        return jnp.sum(o.astype(jnp.float32) * do_) + jnp.sum(s * dst), (o, s)

    t0 = time.perf_counter()
    try:
        (_, (o, s)), grads = jax.jit(
            jax.value_and_grad(
                lambda *a: loss(gated_delta_rule_pallas, *a, interpret=None, config=cfg),
                argnums=range(6),
                has_aux=True,
            )
        )(*args)
        jax.block_until_ready(grads)
    except Exception as e:  # noqa: BLE001 - a configuration that does not compile is reported
        out[f"{tag}_error"] = f"{type(e).__name__}: {str(e)[:600]}"
        print("CHECK", tag, "FAILED", out[f"{tag}_error"], flush=True)
        return False
    out[f"{tag}_compile_run_s"] = time.perf_counter() - t0
    with jax.default_matmul_precision("highest"):
        args32 = [x.astype(jnp.float32) for x in args]
        (_, (ro, rs)), rgrads = jax.jit(
            jax.value_and_grad(
                lambda *a: loss(gated_delta_rule_reference, *a), argnums=range(6), has_aux=True
            )
        )(*args32)
    errs = {"o": _rel(o.astype(jnp.float32), ro), "state": _rel(s, rs)}
    for name, a, r in zip(["dq", "dk", "dv", "dg", "dbeta", "ds0"], grads, rgrads, strict=True):
        a = np.asarray(a, np.float32)
        errs[name] = _rel(a, r) if np.isfinite(a).all() else float("inf")
    scale = 1.0 if dt == jnp.bfloat16 else 1e-2
    ok = all(errs[n] < CHECK_TOL[n] * scale for n in ("o", "state")) and all(
        errs[n] < CHECK_TOL["grads"] * scale for n in errs if n not in ("o", "state")
    )
    out.update({f"{tag}_{n}": e for n, e in errs.items()})
    out[f"{tag}_pass"] = ok
    print("CHECK", tag, "pass" if ok else "FAIL", errs, flush=True)
    return ok


def run_check():
    """GPU correctness of our configuration (bf16) and, with GDN_BENCH_CHECK_F32, of the float32
    path (fp32 inputs)."""
    import jax.numpy as jnp

    from taylorcal_jax.ops.gdn.pallas_gpu.config import F32Config

    out = {}
    _check_config(_config_from_env(), jnp.bfloat16, "bf16", out)
    print("JSONCHECK " + json.dumps(out), flush=True)  # cumulative: survives a timeout
    if os.environ.get("GDN_BENCH_CHECK_F32") == "1":
        _check_config(F32Config(), jnp.float32, "f32", out)
    print("JSONCHECK " + json.dumps(out), flush=True)


# ----------------------------------------------------------------------------- FLA side


def run_fla(fla_rows, fwd_only):
    import fla
    import fla.ops.common.chunk_o as chunk_o
    import numpy as np
    import torch
    import triton
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    chunk_o.IS_NVIDIA_HOPPER = False  # timing only: FLA's Hopper guard (triton < 3.7.1)
    dev = "cuda"
    for i in fla_rows:
        shape = ROWS[i]
        res = {"fla": fla.__version__, "row": i}
        q, k, v, g, beta, do = make_inputs(shape)
        bf = torch.bfloat16
        t = lambda x, dt=bf: torch.from_numpy(x).to(dev).to(dt)  # noqa: E731
        q_, k_, v_, beta_, do_ = t(q), t(k), t(v), t(beta), t(do)
        g_ = t(g, torch.float32)
        del q, k, v, g, beta, do
        for x in (q_, k_, v_, g_, beta_):
            x.requires_grad_(True)

        def fwd():
            return chunk_gated_delta_rule(q_, k_, v_, g_, beta_, use_qk_l2norm_in_kernel=True)[0]

        def fb():
            o = fwd()
            o.backward(do_)

        def fb_fresh():  # as do_bench's grad_to_none: no accumulation into earlier gradients
            for x in (q_, k_, v_, g_, beta_):
                x.grad = None
            fb()

        def sync(_):
            torch.cuda.synchronize()

        try:
            with torch.no_grad():
                for _ in range(3):  # warm-up outside the timing: autotuning and first launches
                    fwd()
                torch.cuda.synchronize()
                res["fla_fwd_ms"] = _pipelined_ms(fwd, sync)
                res["fla_fwd_dobench_ms"] = float(
                    triton.testing.do_bench(fwd, return_mode="median")
                )
                o = fwd().float().cpu().numpy()
            if os.path.exists(ref_path(i)):
                o_ref = np.load(ref_path(i))
                res["fla_rel_err"] = float(np.linalg.norm(o - o_ref) / np.linalg.norm(o_ref))
                del o_ref
            if os.path.exists(chunked_path(i)):  # direct: FLA's Triton forward vs our XLA op
                o_c = np.load(chunked_path(i))
                res["chunked_vs_fla_rel_err"] = float(np.linalg.norm(o_c - o) / np.linalg.norm(o))
                del o_c
            if fwd_only:
                raise StopIteration
            for _ in range(3):  # warm-up (autotuning of the backward kernels)
                fb()
            for x in (q_, k_, v_, g_, beta_):
                x.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            fb()
            torch.cuda.synchronize()
            res["fla_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
            res["fla_fwdbwd_ms"] = _pipelined_ms(fb_fresh, sync)
            res["fla_fwdbwd_dobench_ms"] = float(
                triton.testing.do_bench(
                    fb, grad_to_none=[q_, k_, v_, g_, beta_], return_mode="median"
                )
            )
        except StopIteration:
            pass
        except Exception as e:  # noqa: BLE001
            res["fla_error"] = f"{type(e).__name__}: {str(e)[:1000]}"
        print("JSONFLA " + json.dumps(res), flush=True)
        fwd = fb = None
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- driver


def _sub(mode, extra=(), timeout=300):
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.abspath(__file__), "--mode", mode, *extra]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        text = p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        text += f"\nTIMEOUT after {timeout}s"
    print(f"--- {mode} {' '.join(extra)} ({time.perf_counter() - t0:.0f}s)", flush=True)
    tail = [ln for ln in text.splitlines() if not ln.startswith("JSON")]
    print("\n".join(tail[-15:]), flush=True)
    return text


def _parse(text, tag):
    return [json.loads(ln[len(tag) + 1 :]) for ln in text.splitlines() if ln.startswith(tag + " ")]


def _progress(log, what, r, keys):
    """One line per finished row: elapsed seconds (log's), the row, and its figures so far."""
    nan = float("nan")
    figures = " ".join(f"{k} {r.get(k, nan):.4g}" for k in keys)
    errors = [k for k in r if k.endswith("_error")]
    log(f"{what} {r.get('shape')}: {figures}" + (f" ERRORS {errors}" if errors else ""))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="all", choices=["all", "check", "jax", "fla"])
    ap.add_argument("--row", type=int, default=0)
    default_rows = ",".join(str(i) for i in range(min(4, len(ROWS))))
    ap.add_argument("--rows", default=default_rows, help="row indices (row 4 on request)")
    ap.add_argument("--skip-check", action="store_true", help="no correctness check first")
    ap.add_argument("--check-f32", action="store_true", help="also check the float32 path")
    ap.add_argument("--skip-chunked", action="store_true", help="do not time the XLA chunked op")
    ap.add_argument(
        "--chunked-rows",
        default=None,
        help="rows on which the XLA chunked op is timed (default: all of --rows; none with "
        "--skip-chunked)",
    )
    ap.add_argument(
        "--chunked-from",
        default=None,
        help="with --skip-chunked: copy chunked_* fields per shape from this earlier "
        "result file (the XLA chunked op is not ours; its provenance is recorded)",
    )
    ap.add_argument(
        "--fla-rows", default=None, help='default: the same rows as --rows; "" for none'
    )
    ap.add_argument("--fla-fwd-only", action="store_true")
    ap.add_argument("--fla-timeout", type=int, default=200, help="seconds per FLA row process")
    ap.add_argument(
        "--config", default="{}", help="BF16Config fields as JSON ('{}' = the library default)"
    )
    ap.add_argument("--out", default="gdn_kernel.json")
    a = ap.parse_args()
    if a.mode == "check":
        return run_check()
    if a.mode == "jax":
        return run_jax_row(a.row)
    if a.mode == "fla":
        return run_fla([int(x) for x in a.fla_rows.split(",")], a.fla_fwd_only)
    fields = json.loads(a.config)
    bf16_config(fields)  # a bad field is a one-line error here, before any device work
    os.environ["GDN_BENCH_CONFIG"] = json.dumps(fields)
    log_dir = os.path.dirname(os.path.abspath(a.out))
    from results_io import progress_log, source_digest  # launch/ is on sys.path here

    t_start = time.perf_counter()
    log = progress_log(t_start)
    result = {
        "command": "python3 " + " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source_digest": source_digest(),  # `python launch/results_io.py DIGEST` finds its commit
        "ours_config_fields": fields,
    }
    probe = (
        "import jax, torch\ntry:\n import triton; tv = triton.__version__\n"
        "except ImportError:\n tv = None\nprint(repr((jax.__version__, torch.__version__, tv, "
        "torch.cuda.get_device_name(0) if torch.cuda.is_available() else str(jax.devices()[0])"
        ")))"
    )
    ver = eval(
        subprocess.run(
            [sys.executable, "-c", probe],
            capture_output=True,  # noqa: S307
            text=True,
        ).stdout.strip()
        or "(None,) * 4"
    )
    result.update(jax=ver[0], torch=ver[1], triton=ver[2], device=ver[3])
    if a.check_f32:
        os.environ["GDN_BENCH_CHECK_F32"] = "1"
    if not a.skip_check:
        text = _sub("check", timeout=420)
        open(os.path.join(log_dir, "check.log"), "w").write(text)
        checks = _parse(text, "JSONCHECK")
        result["check"] = checks[-1] if checks else {"error": text[-3000:]}  # the last, fullest
    print("ours config:", fields or "library default", flush=True)
    chunked_rows = (
        set() if a.skip_chunked else {int(x) for x in (a.chunked_rows or a.rows).split(",")}
    )
    rows = {}
    for i in (int(x) for x in a.rows.split(",")):
        os.environ["GDN_BENCH_SKIP_CHUNKED"] = "0" if i in chunked_rows else "1"
        text = _sub("jax", ["--row", str(i)], timeout=240)
        open(os.path.join(log_dir, f"row{i}.log"), "w").write(text)
        got = _parse(text, "JSONROW")
        rows[i] = got[0] if got else {"shape": list(ROWS[i]), "error": text[-2000:]}
        keys = ("ours_fwd_ms", "ours_fwdbwd_ms", "ours_peak_mib", "ours_rel_err")
        _progress(log, f"ours row {i}", rows[i], keys)
    if a.chunked_from:
        old = json.load(open(a.chunked_from))
        by_shape = {str(r["shape"]): r for r in old["rows"]}
        for i, r in rows.items():
            if i in chunked_rows:
                continue
            for key, val in by_shape.get(str(r["shape"]), {}).items():
                if key.startswith("chunked_"):
                    r[key] = val
        result["chunked_source"] = (
            f"chunked_* of rows other than {sorted(chunked_rows)} copied from {a.chunked_from} "
            f"(measured {old.get('date')} on {old.get('device')})"
        )
    result["rows"] = list(rows.values())
    with open(a.out, "w") as f:  # partial result, in case the FLA step runs out of time
        json.dump(result, f, indent=1)
    fla_rows = a.fla_rows if a.fla_rows is not None else a.rows
    text = ""
    for fi in filter(None, fla_rows.split(",")):  # --fla-rows "" times no FLA row
        fla_args = ["--fla-rows", fi] + (["--fla-fwd-only"] if a.fla_fwd_only else [])
        part = _sub("fla", fla_args, timeout=a.fla_timeout)  # its autotuning dominates
        text += part
        for fr in _parse(part, "JSONFLA"):
            i = fr.pop("row")
            result["fla"] = fr.pop("fla")
            if i in rows:
                rows[i].update(fr)
                keys = ("fla_fwd_ms", "fla_fwdbwd_ms", "fla_peak_mib", "fla_rel_err")
                _progress(log, f"FLA row {i}", rows[i], keys)
    open(os.path.join(log_dir, "fla.log"), "w").write(text)
    for r in rows.values():
        for key in ("fwd", "fwdbwd"):
            if f"ours_{key}_ms" in r and f"fla_{key}_ms" in r:
                r[f"ratio_{key}"] = r[f"ours_{key}_ms"] / r[f"fla_{key}_ms"]
    result["rows"] = list(rows.values())
    result["peak_memory_method"] = (
        "ours: jax memory_stats()['peak_bytes_in_use'] in a fresh process after its first "
        "forward+backward call, run alone (inputs and cotangent included); fla: "
        "torch.cuda.max_memory_allocated over one forward+backward after reset_peak_memory_stats "
        "(inputs included)"
    )
    result["rel_err_method"] = (
        "||o - o_ref|| / ||o_ref||, o_ref = per-token fp32 recurrence (reference.py, jit on the "
        "GPU, matmul precision highest) on the same bf16 inputs, full shape"
    )
    result["seconds"] = round(time.perf_counter() - t_start)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(
        f"{'shape':>22} {'ours f':>8} {'fla f':>8} {'r':>5} {'ours fb':>8} {'fla fb':>8} "
        f"{'r':>5} {'xla f':>7} {'xla fb':>7} {'pk ours':>8} {'pk fla':>8} {'err':>8} "
        f"{'fla e':>8}"
    )
    for r in result["rows"]:
        g = lambda k_: r.get(k_, float("nan"))  # noqa: E731
        print(
            f"{str(r['shape']):>22} {g('ours_fwd_ms'):8.3f} {g('fla_fwd_ms'):8.3f} "
            f"{g('ratio_fwd'):5.2f} {g('ours_fwdbwd_ms'):8.3f} {g('fla_fwdbwd_ms'):8.3f} "
            f"{g('ratio_fwdbwd'):5.2f} {g('chunked_fwd_ms'):7.2f} {g('chunked_fwdbwd_ms'):7.2f} "
            f"{g('ours_peak_mib'):8.0f} {g('fla_peak_mib'):8.0f} {g('ours_rel_err'):8.1e} "
            f"{g('fla_rel_err'):8.1e}"
        )
    print(f"{a.out} written after {result['seconds']} s", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, REPO)  # this checkout's package, also in the subprocesses (_sub)
    main()
