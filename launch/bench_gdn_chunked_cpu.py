"""Old vs new XLA chunked gated delta rule on the local CPU: forward and forward+backward.

"old" is the previous `gated_delta_rule_chunked` (every per-chunk step, norms to output, inside
a `jax.checkpoint`-ed `lax.scan` body, all dots at Precision.HIGHEST), kept here only for this
comparison; "new" is `taylorcal_jax.ops.gdn.chunked.gated_delta_rule_chunked` (chunk-parallel
phase + a lean scan carrying the state). Both jitted, same inputs (random, g in [-0.3, -0.005],
beta in (0, 1)), chunk 64, output and final state; forward+backward = jax.vjp of (o, final
state) with random cotangents, all six gradients. Timing: median of `--reps` calls after
`--warm` warm-up calls (block_until_ready), with the old and new calls interleaved so that
both see the same machine load. Also records max-abs relative differences of old vs new.
OPENBLAS_NUM_THREADS defaults to 1 (the old version's LAPACK solve; the new one uses none).

    python launch/bench_gdn_chunked_cpu.py                         # 1 x 1024 x 4 x 64, fp32
    python launch/bench_gdn_chunked_cpu.py --dtype bfloat16 --tag bf16

Writes launch/results/gdn_chunked_cpu[_TAG].json (device, versions, load, date, command).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# The old implementation calls LAPACK trsm (scipy's OpenBLAS); with its default thread count on a
# loaded 2-core machine every call waits out a scheduler slice (~10 ms). One thread is fair to it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import results_io  # noqa: E402  (launch/ is on sys.path when this script runs)

from taylorcal_jax.ops.gdn.chunked import gated_delta_rule_chunked  # noqa: E402
from taylorcal_jax.ops.gdn.reference import compute_dtype, l2_normalize  # noqa: E402

_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------- the previous implementation


def _old_chunk_step(state_bhkv, chunk, *, scale, use_qk_l2norm, cdt):
    def dot(spec, a, b):
        return jnp.einsum(spec, a, b, precision=_HIGHEST)

    q, k, v, g, beta = (x.astype(cdt) for x in chunk)
    if use_qk_l2norm:
        q, k = l2_normalize(q), l2_normalize(k)
    c = g.shape[-1]
    big_g = jnp.cumsum(g, axis=-1)
    big_g_last = big_g[..., -1:]
    row = jnp.arange(c)[:, None]
    col = jnp.arange(c)[None, :]
    causal = row >= col
    strict = row > col
    diff = big_g[..., :, None] - big_g[..., None, :]
    gamma = jnp.where(causal, jnp.exp(jnp.where(causal, diff, 0.0)), 0.0)
    kk = dot("bhik,bhjk->bhij", k, k)
    a = jnp.where(strict, beta[..., :, None] * kk * gamma, 0.0)
    eye = jnp.eye(c, dtype=cdt)
    rhs = jnp.concatenate([(beta * jnp.exp(big_g))[..., None] * k, beta[..., None] * v], axis=-1)
    wu = jax.lax.linalg.triangular_solve(
        eye + a, rhs, left_side=True, lower=True, unit_diagonal=True
    )
    w, u = wu[..., : k.shape[-1]], wu[..., k.shape[-1] :]
    v_new = u - dot("bhck,bhkv->bhcv", w, state_bhkv)
    qk = jnp.where(causal, dot("bhik,bhjk->bhij", q, k) * gamma, 0.0)
    o = dot("bhck,bhkv->bhcv", q * jnp.exp(big_g)[..., None], state_bhkv)
    o = scale * (o + dot("bhij,bhjv->bhiv", qk, v_new))
    k_to_end = k * jnp.exp(big_g_last - big_g)[..., None]
    new_state = jnp.exp(big_g_last)[..., None] * state_bhkv + dot(
        "bhck,bhcv->bhkv", k_to_end, v_new
    )
    return new_state, o


def old_gated_delta_rule_chunked(
    q_bthk, k_bthk, v_bthv, g_bth, beta_bth, *, initial_state_bhkv=None,
    output_final_state=False, chunk_size=64, scale=None, use_qk_l2norm=True,
):  # fmt: skip
    inputs = (q_bthk, k_bthk, v_bthv, g_bth, beta_bth)
    cdt = compute_dtype(*inputs, *(() if initial_state_bhkv is None else (initial_state_bhkv,)))
    b, t, h, kdim = q_bthk.shape
    vdim = v_bthv.shape[-1]
    scale = kdim**-0.5 if scale is None else scale
    c = chunk_size
    n = -(-t // c)
    pad = n * c - t

    def to_chunks(x):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape((b, n, c) + x.shape[2:])
        return jnp.moveaxis(x, (1, 2), (0, 3))

    xs = tuple(to_chunks(x) for x in inputs)
    if initial_state_bhkv is None:
        state = jnp.zeros((b, h, kdim, vdim), cdt)
    else:
        state = initial_state_bhkv.astype(cdt)

    def body(state_bhkv, chunk):
        return _old_chunk_step(state_bhkv, chunk, scale=scale, use_qk_l2norm=use_qk_l2norm, cdt=cdt)

    state, o_nbhcv = jax.lax.scan(jax.checkpoint(body, prevent_cse=False), state, xs)
    o = jnp.moveaxis(o_nbhcv, (0, 3), (1, 2)).reshape(b, n * c, h, vdim)[:, :t]
    return o.astype(v_bthv.dtype), (state if output_final_state else None)


# ----------------------------------------------------------------- timing


def _median_ms(fn, args, reps):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append((time.perf_counter() - t0) * 1e3)
    return ts


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1,1024,4,64", help="B,T,H,D (K = V = D)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--warm", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=os.path.join(REPO, "launch", "results"))
    a = ap.parse_args()
    b, t, h, d = (int(x) for x in a.shape.split(","))
    dt = jnp.dtype(a.dtype)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, d)), dt) for _ in range(3))
    g = jnp.asarray(-rng.uniform(0.005, 0.3, (b, t, h)), jnp.float32)
    beta = jnp.asarray(1 / (1 + np.exp(-rng.standard_normal((b, t, h)))), dt)
    s0 = jnp.asarray(rng.standard_normal((b, h, d, d)), jnp.float32)
    do = jnp.asarray(rng.standard_normal((b, t, h, d)), dt)
    ds = jnp.asarray(rng.standard_normal((b, h, d, d)), jnp.float32)
    args = (q, k, v, g, beta, s0)

    def make(op):
        def f(q, k, v, g, beta, s0):
            return op(q, k, v, g, beta, initial_state_bhkv=s0, output_final_state=True,
                      chunk_size=a.chunk)  # fmt: skip

        def fb(*xs):
            out, vjp = jax.vjp(f, *xs)
            return out, vjp((do, ds))

        return jax.jit(f), jax.jit(fb)

    fns = {"old": make(old_gated_delta_rule_chunked), "new": make(gated_delta_rule_chunked)}
    res = {"shape_bthd": [b, t, h, d], "dtype": a.dtype, "chunk": a.chunk}
    outs = {}
    for name, (f, fb) in fns.items():
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        res[f"{name}_fwd_first_call_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        outs[name] = jax.block_until_ready(fb(*args))
        res[f"{name}_fwdbwd_first_call_s"] = time.perf_counter() - t0
        for _ in range(a.warm):
            jax.block_until_ready(f(*args))
            jax.block_until_ready(fb(*args))
    load_before = os.getloadavg()
    times = {f"{n}_{m}": [] for n in fns for m in ("fwd", "fwdbwd")}
    for _ in range(a.reps):  # interleaved: old and new see the same load
        for name, (f, fb) in fns.items():
            times[f"{name}_fwd"] += _median_ms(f, args, 1)
            times[f"{name}_fwdbwd"] += _median_ms(fb, args, 1)
    for key, ts in times.items():
        res[f"{key}_ms"] = float(np.median(ts))
        res[f"{key}_min_ms"] = float(np.min(ts))
    res["speedup_fwd"] = res["old_fwd_ms"] / res["new_fwd_ms"]
    res["speedup_fwdbwd"] = res["old_fwdbwd_ms"] / res["new_fwdbwd_ms"]
    (o_old, s_old), g_old = outs["old"]
    (o_new, s_new), g_new = outs["new"]
    res["rel_diff_new_vs_old"] = {
        "o": _rel(o_new, o_old), "state": _rel(s_new, s_old),
        **{f"d{n}": _rel(x, y) for n, x, y in
           zip(("q", "k", "v", "g", "beta", "s0"), g_new, g_old, strict=True)},
    }  # fmt: skip
    res.update(
        device=f"{jax.devices()[0].device_kind} ({os.cpu_count()} logical cores, shared)",
        cpu=platform.processor() or platform.machine(),
        load_average_1_5_15=[round(x, 2) for x in load_before],
        load_average_after=[round(x, 2) for x in os.getloadavg()],
        jax=jax.__version__,
        python=platform.python_version(),
        git_commit=results_io.git_revision(),
        source_digest=results_io.source_digest(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        command="python " + " ".join(["launch/bench_gdn_chunked_cpu.py", *sys.argv[1:]]),
        openblas_num_threads=os.environ["OPENBLAS_NUM_THREADS"],
        warm=a.warm,
        reps=a.reps,
    )
    print(json.dumps(res, indent=1))
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, "gdn_chunked_cpu" + (f"_{a.tag}" if a.tag else "") + ".json")
    with open(path, "w") as fh:
        json.dump(res, fh, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
