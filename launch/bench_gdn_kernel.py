"""Benchmark of the Pallas gated delta rule against flash-linear-attention and the XLA chunked op.

Runs on one GPU machine in one call (BENCHMARKS.md section 1). Shapes [B, T, H, D], bf16 q/k/v/beta,
fp32 g. Each JAX measurement row runs in a fresh subprocess (XLA_PYTHON_CLIENT_PREALLOCATE=false)
so that its peak device memory (memory_stats()["peak_bytes_in_use"], read right after our first
forward+backward call, run alone, inputs included) is its own; FLA runs afterwards in a fresh
torch process per row (peak = torch.cuda.max_memory_allocated over one forward+backward after
reset, inputs included).

Timing (the same method for both sides since session 3): after warm-up calls, 10 batches of 10
calls issued back to back with one device synchronisation per batch; the figure is the median
over batches of (batch time / 10), i.e. device time per call with the host's dispatch overlapped,
as in a training step. Also recorded, not used for the ratios: ours with a synchronisation after
every call (`*_sync_ms`, the method of sessions 1-2: it adds ~0.2-0.4 ms of host round trip per
call, seen as the gap between Nsight Compute's kernel sums and these medians) and FLA by
triton.testing.do_bench(..., return_mode="median") (`fla_*_dobench_ms`: CUDA events around each
call, L2 flushed before each). Forward+backward =
the output and the gradients of (q, k, v, g, beta) for a random cotangent. Relative error =
||o - o_ref|| / ||o_ref|| with o_ref from the per-token fp32 recurrence (reference.py, jit on the
GPU, matmul precision "highest") on the same bf16-rounded inputs at the full shape.

Usage (device): python3 launch/bench_gdn_kernel.py --out $OUT/gdn_kernel_h100.json [--profile]
A device call runs at most 10 minutes; all four rows with FLA and the XLA op take about 8-9 (FLA's
autotuning 24-153 s a row), so time them in parts (--rows 0,1, then --rows 2,3) and join the parts
with launch/merge_gdn_kernel_results.py.
Modes used internally: --mode check | jax --row i | fla.
"""

# ruff: noqa: B023  (closures are called inside the loop iteration that defines them)
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import subprocess
import sys
import time

ROWS = [(8, 4096, 16, 128), (4, 8192, 16, 128), (1, 32768, 16, 128), (16, 2048, 12, 128)]
if os.environ.get("BENCH_GDN_TINY") == "1":  # local plumbing smoke test (CPU, interpret mode)
    ROWS = [(1, 128, 2, 32), (2, 64, 2, 32)]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def _config_from_env():
    from taylorcal_jax.ops.gdn.config import GDNPallasConfig

    return GDNPallasConfig(**json.loads(os.environ.get("GDN_BENCH_CONFIG", "{}")))


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


def _jax_timer_sync(fn, args, n=20):
    """Median of n calls with a synchronisation after each (sessions 1-2's method)."""
    import jax
    import numpy as np

    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(ts))


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

    from taylorcal_jax.ops.gdn.pallas_gpu import gated_delta_rule_pallas
    from taylorcal_jax.ops.gdn.reference import gated_delta_rule_reference

    shape = ROWS[i]
    args, do_ = device_inputs(shape)
    res = {"shape": list(shape), "dtype": "bfloat16"}
    dev = jax.devices()[0]
    cfg = _config_from_env()
    res["ours_config"] = dataclasses.asdict(cfg)

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
        stats = dev.memory_stats()
        if stats:  # with the pipelined calls' outputs overlapping (sessions 1-3's figure)
            res["ours_peak_pipelined_mib"] = stats["peak_bytes_in_use"] / 2**20
        res["ours_fwdbwd_sync_ms"] = _jax_timer_sync(fb, args + [do_])
        res["ours_fwd_ms"] = _jax_timer(fwd, args)
        res["ours_fwd_sync_ms"] = _jax_timer_sync(fwd, args)
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


# Session 2's bf16 default (config.BF16_DEFAULT from device call 4 until session 3): kernel 1
# "fla", split and segmented reverse at 8 warps, the closed-form chunk-local backward in XLA.
# Spelled out here so that a candidate keeps its meaning when the library default moves on.
_ANALYTIC = dict(
    backward="analytic",
    chunk_kernel="fla",
    reverse="split",
    state_segments=0,  # leaves row 0 (256 programs) unsegmented, splits row 2 (1 x 32768 x 16)
    stages_bwd=1,
    warps_bwd=8,
)
# Session 3's bf16 default (config.BF16_DEFAULT from its call 10).
_STATES_W4_TF32 = {
    **_ANALYTIC,
    "backward": "pallas",
    "residuals": "states",
    "warps_bwd": 4,
    "t_precision": "tf32",
}
_KD = {**_STATES_W4_TF32, "kd_in_states": True}
CANDIDATES = {  # full configurations tried by the check step (GDNPallasConfig fields)
    "base": {},
    "xbwd_s1": dict(stages_bwd=1),
    "fla": dict(chunk_kernel="fla"),
    "fla_tf32": dict(chunk_kernel="fla", t_precision="tf32"),
    # the XLA vjp backward with the other measured-faster pieces
    "fla_rsplit_w8": {k: v for k, v in _ANALYTIC.items() if k != "backward"},
    "analytic": _ANALYTIC,
    "analytic_wo8": {**_ANALYTIC, "warps_out": 8},
    # the two-kernel Pallas closed form (pallas_gpu_bwd.py) in place of the XLA one. Its fields
    # are those of "new_w8" and "rsplit_w8" (kernel 1 "keep") in results/gdn_kernel_h100_call3.json,
    # which measured the removed one-kernel backward="pallas" (it recomputed T and spilled).
    "pallas_bwd": {**_ANALYTIC, "backward": "pallas"},
    # session 3: the forward keeps T (and h, v'), the backward builds w, u, kd, qg, aqk from it
    "pallas_t": {**_ANALYTIC, "backward": "pallas", "residuals": "t"},
    "pallas_states": {**_ANALYTIC, "backward": "pallas", "residuals": "states"},
    "pallas_states_w4": {**_ANALYTIC, "backward": "pallas", "residuals": "states", "warps_bwd": 4},
    "pallas_states_tf32": {
        **_ANALYTIC,
        "backward": "pallas",
        "residuals": "states",
        "t_precision": "tf32",
    },
    "states_w4_tf32": _STATES_W4_TF32,
    # session 4: the state pass forms kd from k where unsegmented (kernel 1 writes no kd)
    "kd": _KD,
    # session 5: norms after the dots, the fused pass for the primal, one-wave prefetch
    "s5": {
        **_KD,
        "norm_after_dot": True,
        "fused_primal": True,
        "fused_programs": 256,
        "prefetch_programs": 128,
    },
}
CHECK_TOL = {"o": 6e-3, "state": 6e-3, "grads": 1e-2}  # bf16 vs the fp32 reference, ||.||_2


def _check_config(cfg, dt, tag, out):
    """Forward + gradients at [2, 300, 4, 128] (odd T, initial and final state) vs the fp32
    per-token reference. Records errors under `tag` and returns whether they pass CHECK_TOL."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from taylorcal_jax.ops.gdn.pallas_gpu import gated_delta_rule_pallas
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
    except Exception as e:  # noqa: BLE001 - a variant that does not compile is reported
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
    """GPU correctness of each candidate (bf16) + its row-0 times; fp32 check of the default."""
    import jax
    import jax.numpy as jnp

    from taylorcal_jax.ops.gdn.config import GDNPallasConfig
    from taylorcal_jax.ops.gdn.pallas_gpu import gated_delta_rule_pallas

    out = {}
    names = os.environ.get("GDN_BENCH_CANDIDATES", "base").split(",")
    tiny = os.environ.get("BENCH_GDN_TINY") == "1"
    extra_rows = [int(x) for x in os.environ.get("GDN_BENCH_CHECK_ROWS", "").split(",") if x]
    args, do_ = device_inputs(ROWS[0])
    bf = jnp.bfloat16
    for name in names:
        print("JSONCHECK " + json.dumps(out), flush=True)  # cumulative: survives a timeout
        cfg = GDNPallasConfig(**CANDIDATES[name])
        if not _check_config(cfg, bf, f"bf16_{name}", out):
            continue
        if len(names) == 1 or tiny:
            continue
        fwd, fb = _fwd_fwdbwd(
            lambda *a, cfg=cfg: gated_delta_rule_pallas(*a, config=cfg, interpret=None)
        )
        try:
            out[f"row0_{name}_fwd_ms"] = _jax_timer(fwd, args)
            out[f"row0_{name}_fwdbwd_ms"] = _jax_timer(fb, args + [do_])
            for ri in extra_rows:  # GDN_BENCH_CHECK_ROWS: the same two times at other rows
                a_i, do_i = device_inputs(ROWS[ri])
                out[f"row{ri}_{name}_fwd_ms"] = _jax_timer(fwd, a_i)
                out[f"row{ri}_{name}_fwdbwd_ms"] = _jax_timer(fb, a_i + [do_i])
                times = out[f"row{ri}_{name}_fwd_ms"], out[f"row{ri}_{name}_fwdbwd_ms"]
                print("ROW", ri, name, *times, flush=True)
                del a_i, do_i
        except Exception as e:  # noqa: BLE001
            out[f"row0_{name}_error"] = f"{type(e).__name__}: {str(e)[:600]}"
        try:
            if os.environ.get("GDN_BENCH_SKIP_PIECES") == "1":  # only the candidates' totals
                raise StopIteration
            for key, val in _kernel_pieces(cfg, args, do_).items():
                out[f"row0_{name}_{key}"] = val
            if cfg.state_segments != 1:  # row 2 forward with and without segments
                out.update(_segment_effect(cfg, name))
        except StopIteration:
            pass
        except Exception as e:  # noqa: BLE001
            out[f"row0_{name}_pieces_error"] = f"{type(e).__name__}: {str(e)[:600]}"
        print(
            "ROW0",
            name,
            out.get(f"row0_{name}_fwd_ms"),
            out.get(f"row0_{name}_fwdbwd_ms"),
            "kernel 1",
            out.get(f"row0_{name}_kernel1_ms"),
            "bwd seq",
            out.get(f"row0_{name}_bwd_seq_ms"),
            "row 2 fwd seg / noseg",
            out.get(f"row2_{name}_seg_fwd_ms"),
            out.get(f"row2_{name}_noseg_fwd_ms"),
            flush=True,
        )
        jax.clear_caches()
    if os.environ.get("GDN_BENCH_CHECK_F32") == "1":
        _check_config(GDNPallasConfig(), jnp.float32, "f32_base", out)
    if os.environ.get("GDN_BENCH_PROFILE") == "1":
        out.update(profile())
    print("JSONCHECK " + json.dumps(out), flush=True)


def _kernel_pieces(cfg, args, do_):
    """Times of kernel 1 alone (w, u, G, kd) and of the backward's sequential part alone (states
    recompute + reverse pass, zero aqk) for one configuration, bf16, chunk 64."""
    import jax
    import jax.numpy as jnp

    from taylorcal_jax.ops.gdn import pallas_gpu as pg

    q, k, v, g, beta = args
    b, t, h, d = q.shape
    st = pg._Static(
        chunk=64,
        scale=d**-0.5,
        use_l2=True,
        interpret=os.environ.get("BENCH_GDN_TINY") == "1",
        cfg=cfg,
    )
    dt = jnp.bfloat16
    k1 = jax.jit(lambda *a: pg._chunk_call(*a, st, dt, with_kd=True))
    out = {"kernel1_ms": _jax_timer(k1, (k, v, g, beta))}
    w, u, gcum, kd = k1(k, v, g, beta)
    lgc = pg._chunk_end_g(gcum, 64)
    s0 = jnp.zeros((b, h, d, v.shape[-1]), jnp.float32)
    aqk = jnp.zeros((b, t, h, 64), dt)
    seq = jax.jit(lambda *a: pg._backward_seq(*a, st, dt))
    out["bwd_seq_ms"] = _jax_timer(seq, (w, u, w, kd, aqk, lgc, s0, do_, s0))
    return out


def _segment_effect(cfg, name):
    """Forward time at row 2 (small B * H) with cfg and with state_segments=1."""
    import jax

    from taylorcal_jax.ops.gdn.pallas_gpu import gated_delta_rule_pallas

    args, _ = device_inputs(ROWS[min(2, len(ROWS) - 1)])
    out = {}
    for tag, c in (("seg", cfg), ("noseg", dataclasses.replace(cfg, state_segments=1))):
        f = jax.jit(lambda *a, c=c: gated_delta_rule_pallas(*a, config=c, interpret=None)[0])
        out[f"row2_{name}_{tag}_fwd_ms"] = _jax_timer(f, args)
    return out


def best_candidate(check, names):
    """The passing candidate with the smallest row-0 forward + forward-backward time."""
    score = {
        n: check[f"row0_{n}_fwd_ms"] + check[f"row0_{n}_fwdbwd_ms"]
        for n in names
        if check.get(f"bf16_{n}_pass") and f"row0_{n}_fwdbwd_ms" in check
    }
    return min(score, key=score.get) if score else None


VARIANTS = {
    "fused_bv32": dict(forward="fused", block_v=32),
    "split_bv64": dict(forward="split", block_v=64),
    "split_bv32": dict(forward="split", block_v=32),
    "split_bv16": dict(forward="split", block_v=16),
    "split_bv32_w8": dict(forward="split", block_v=32, warps_chunk=8, warps_out=8),
    "split_bv32_wc2": dict(forward="split", block_v=32, warps_chunk=2),
}


def profile():
    """Forward variants at rows 0 and 2, and each kernel / backward stage alone at row 0."""
    import jax
    import jax.numpy as jnp

    from taylorcal_jax.ops.gdn import pallas_gpu as pg
    from taylorcal_jax.ops.gdn.config import GDNPallasConfig
    from taylorcal_jax.ops.gdn.pallas_gpu import gated_delta_rule_pallas

    out = {}
    tiny = os.environ.get("BENCH_GDN_TINY") == "1"
    bf = jnp.bfloat16
    for ri in (0,) if tiny else (0, 2):
        args, do_ = device_inputs(ROWS[ri])
        for name, kw in VARIANTS.items():
            cfg = GDNPallasConfig(**kw)
            f = jax.jit(
                lambda *a, cfg=cfg: gated_delta_rule_pallas(*a, config=cfg, interpret=None)[0]
            )
            key = f"fwd_row{ri}_{name}_ms"
            try:
                out[key] = _jax_timer(f, args)
            except Exception as e:  # noqa: BLE001
                out[key.replace("_ms", "_error")] = f"{type(e).__name__}: {str(e)[:400]}"
            print("PROFILE", key, out.get(key), flush=True)
        if ri != 0:
            continue
        # pieces at row 0, default block sizes of each structure
        st = pg._Static(
            chunk=64,
            scale=128**-0.5,
            use_l2=True,
            interpret=tiny,
            cfg=GDNPallasConfig(forward="split", block_v=32),
        )
        s0 = jnp.zeros((ROWS[0][0], ROWS[0][2], 128, 128), jnp.float32)
        qq, kk, vv, gg, bb = args
        dt = bf
        pieces = {}
        pieces["chunk_kernel"] = (
            jax.jit(lambda k_, v_, g_, b_: pg._chunk_call(k_, v_, g_, b_, st, dt, with_kd=True)),
            (kk, vv, gg, bb),
        )
        w, u, gcum, kd = pieces["chunk_kernel"][0](kk, vv, gg, bb)
        pieces["states_kernel_bv32"] = (
            jax.jit(lambda *a: pg._states_call(*a, st, dt)),
            (w, u, kd, gcum, s0),
        )
        hmat, vp, _ = pieces["states_kernel_bv32"][0](w, u, kd, gcum, s0)
        pieces["out_kernel"] = (
            jax.jit(lambda *a: pg._out_call(*a, st, dt, bf)),
            (qq, kk, gcum, hmat, vp),
        )
        st64 = dataclasses.replace(st, cfg=GDNPallasConfig(forward="fused", block_v=64))
        pieces["fused_seq_kernel_bv64"] = (
            jax.jit(lambda *a: pg._seq_call(*a, st64, dt, bf)),
            (qq, kk, w, u, gcum, s0),
        )
        pieces["bwd_stage1_xla_vjp"] = (
            jax.jit(
                lambda *a: jax.vjp(functools.partial(pg._stage1, st=st, dt=dt), *a)[1](
                    (w, u, w, kd, jnp.zeros((*w.shape[:3], 64), bf), gcum)
                )
            ),
            tuple(args),
        )
        dst = jnp.zeros_like(s0)
        aqk = jnp.zeros((*w.shape[:3], 64), bf)
        pieces["bwd_sequential_pallas"] = (
            jax.jit(lambda *a: pg._backward_seq(*a, st, dt)),
            (w, u, w, kd, aqk, gcum, s0, do_, dst),
        )
        for name, (f, a_) in pieces.items():
            try:
                out[f"piece_{name}_ms"] = _jax_timer(f, a_)
            except Exception as e:  # noqa: BLE001
                out[f"piece_{name}_error"] = f"{type(e).__name__}: {str(e)[:400]}"
            print("PROFILE", name, out.get(f"piece_{name}_ms"), flush=True)
    return out


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", default="all", choices=["all", "check", "jax", "fla"])
    ap.add_argument("--row", type=int, default=0)
    ap.add_argument("--rows", default=",".join(str(i) for i in range(len(ROWS))))
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--skip-chunked", action="store_true")
    ap.add_argument(
        "--chunked-rows",
        default=None,
        help="rows on which the XLA chunked op is timed (default: all of --rows; none with "
        "--skip-chunked)",
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help="time forward variants (rows 0, 2) and each kernel alone (row 0)",
    )
    ap.add_argument("--fla-rows", default=None, help="default: the same rows as --rows")
    ap.add_argument("--fla-fwd-only", action="store_true")
    ap.add_argument(
        "--config",
        default=None,
        help="GDNPallasConfig fields as JSON ('{}' = library default); default: the "
        "fastest passing --candidates entry (the library default if none)",
    )
    ap.add_argument(
        "--candidates",
        default="base",
        help=f"comma-separated names from {sorted(CANDIDATES)}: each is checked on "
        "the GPU and timed at row 0; the rows then use the best passing one",
    )
    ap.add_argument("--check-f32", action="store_true", help="also check fp32 inputs (~45 s)")
    ap.add_argument(
        "--chunked-from",
        default=None,
        help="with --skip-chunked: copy chunked_* fields per shape from this earlier "
        "result file (the XLA chunked op is not ours; its provenance is recorded)",
    )
    ap.add_argument("--out", default="gdn_kernel.json")
    a = ap.parse_args()
    if a.mode == "check":
        return run_check()
    if a.mode == "jax":
        return run_jax_row(a.row)
    if a.mode == "fla":
        return run_fla([int(x) for x in a.fla_rows.split(",")], a.fla_fwd_only)
    log_dir = os.path.dirname(os.path.abspath(a.out))
    from results_io import source_digest  # launch/ is on sys.path when this script runs

    result = {
        "command": "python3 " + " ".join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source_digest": source_digest(),  # `python launch/results_io.py DIGEST` finds its commit
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
    if a.profile:
        os.environ["GDN_BENCH_PROFILE"] = "1"
    if a.check_f32:
        os.environ["GDN_BENCH_CHECK_F32"] = "1"
    names = a.candidates.split(",")
    os.environ["GDN_BENCH_CANDIDATES"] = a.candidates
    if not a.skip_check:
        text = _sub("check", timeout=420)
        open(os.path.join(log_dir, "check.log"), "w").write(text)
        checks = _parse(text, "JSONCHECK")
        result["check"] = checks[-1] if checks else {"error": text[-3000:]}  # the last, fullest
    if a.config is None:
        name = best_candidate(result.get("check", {}), names) if len(names) > 1 else names[0]
        if name is None or not result.get("check", {}).get(f"bf16_{name}_pass", a.skip_check):
            name = "base"  # the H100-checked default
        cfg = CANDIDATES[name]
        result["chosen_candidate"] = name
    else:
        cfg = json.loads(a.config)
    result["ours_config_fields"] = cfg
    os.environ["GDN_BENCH_CONFIG"] = json.dumps(cfg)
    chunked_rows = (
        set() if a.skip_chunked else {int(x) for x in (a.chunked_rows or a.rows).split(",")}
    )
    print("ours config:", cfg, flush=True)
    rows = {}
    for i in (int(x) for x in a.rows.split(",")):
        os.environ["GDN_BENCH_SKIP_CHUNKED"] = "0" if i in chunked_rows else "1"
        text = _sub("jax", ["--row", str(i)], timeout=240)
        open(os.path.join(log_dir, f"row{i}.log"), "w").write(text)
        got = _parse(text, "JSONROW")
        rows[i] = got[0] if got else {"shape": list(ROWS[i]), "error": text[-2000:]}
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
    # One process per row: in one process FLA's times depend on the rows before (session 3: row 0
    # forward 1.25 ms as the first row, 1.57 ms after row 3; row 3 0.95 ms first, 1.46 after
    # rows 0-2), most likely autotuned configurations reused across shapes.
    text = ""
    for fi in fla_rows.split(","):
        fla_args = ["--fla-rows", fi] + (["--fla-fwd-only"] if a.fla_fwd_only else [])
        text += _sub("fla", fla_args, timeout=200)  # autotuning ~35-100 s per process
    open(os.path.join(log_dir, "fla.log"), "w").write(text)
    for fr in _parse(text, "JSONFLA"):
        i = fr.pop("row")
        result["fla"] = fr.pop("fla")
        if i in rows:
            rows[i].update(fr)
    for r in rows.values():
        for key in ("fwd", "fwdbwd"):
            if f"ours_{key}_ms" in r and f"fla_{key}_ms" in r:
                r[f"ratio_{key}"] = r[f"ours_{key}_ms"] / r[f"fla_{key}_ms"]
    result["rows"] = list(rows.values())
    result["peak_memory_method"] = (
        "ours: jax memory_stats()['peak_bytes_in_use'] in a fresh process after its first "
        "forward+backward call, run alone (inputs and cotangent included; ours_peak_pipelined_mib: "
        "after the pipelined timing too, where one call's outputs overlap the next call, the "
        "figure of sessions 1-3); fla: torch.cuda.max_memory_allocated over one forward+backward "
        "after reset_peak_memory_stats (inputs included)"
    )
    result["rel_err_method"] = (
        "||o - o_ref|| / ||o_ref||, o_ref = per-token fp32 recurrence (reference.py, jit on the "
        "GPU, matmul precision highest) on the same bf16 inputs, full shape"
    )
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


if __name__ == "__main__":
    main()
