"""The backward of the Pallas gated delta rule: the kernels of each path, in order.

Letters: B batch, T time (Tp padded to a multiple of C), H heads, K key dim, V value dim,
C chunk length, NT = Tp / C chunks.

Both paths split the backward at the chunk-local map (q, k, v, g, beta) -> (w, u, qg = s q exp(G),
kd = k exp(G_C - G), aqk = s causal Gamma q k^T, G_C): a reverse pass over chunks (reverse.py)
turns do and the final state's cotangent into the map's cotangents, which then go back to the
inputs.

float32 path: the map recomputed in XLA (`_chunk_local_xla`) and differentiated by jax.vjp; the
state pass again; the fused reverse kernel.
bfloat16 path: the map's outputs from T (chunk_backward.prep_call; T from the forward, or from
kernel 1 run again with residuals "inputs"); the state pass again unless the forward kept h and
v'; the reverse recurrence (segmented where the state pass is) and the gradient kernel; the
closed-form chunk-local backward (chunk_backward.chunk_local_backward_call).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from taylorcal_jax.ops.gdn.call_options import Static
from taylorcal_jax.ops.gdn.chunked import unit_lower_inverse
from taylorcal_jax.ops.gdn.operands import operand_dtype
from taylorcal_jax.ops.gdn.pallas_gpu.chunk import chunk_call
from taylorcal_jax.ops.gdn.pallas_gpu.chunk_backward import (
    PREP_OUTPUTS,
    chunk_local_backward_call,
    prep_call,
)
from taylorcal_jax.ops.gdn.pallas_gpu.common import F32
from taylorcal_jax.ops.gdn.pallas_gpu.reverse import grads_call, reverse_fused_call
from taylorcal_jax.ops.gdn.pallas_gpu.segments import reverse_dh_pass, state_pass
from taylorcal_jax.ops.gdn.pallas_gpu.states import states_call
from taylorcal_jax.ops.gdn.reference import l2_normalize


def chunk_end_g(gcum, chunk):
    """lgc: G_C on each chunk's last row, 0 elsewhere ([B, Tp, H]; the sequential passes read
    G_C from it, and its cotangent is dG_C)."""
    last = (jnp.arange(gcum.shape[1]) % chunk == chunk - 1)[None, :, None]
    return jnp.where(last, gcum, 0.0)


def _chunk_local_xla(q, k, v, g, beta, *, st: Static, dt):
    """The chunk-local map in XLA: (w, u, qg, kd, aqk, lgc), all [B, Tp, H, *]."""
    b, tp, h, kdim = q.shape
    vd = v.shape[-1]
    c = st.chunk
    nt = tp // c
    prec = lax.Precision.HIGHEST if dt == F32 else None

    def ein(spec, x, y):
        return jnp.einsum(
            spec, x.astype(dt), y.astype(dt), precision=prec, preferred_element_type=F32
        )

    q, k, v = (x.astype(F32) for x in (q, k, v))
    if st.use_l2:
        q, k = l2_normalize(q), l2_normalize(k)
    q5, k5 = q.reshape(b, nt, c, h, kdim), k.reshape(b, nt, c, h, kdim)
    v5 = v.reshape(b, nt, c, h, vd)
    gg = jnp.cumsum(g.astype(F32).reshape(b, nt, c, h), axis=2)  # [B,NT,C,H]
    gc = gg[:, :, -1:, :]
    be = beta.astype(F32).reshape(b, nt, c, h)
    ri, ci = jnp.arange(c)[:, None], jnp.arange(c)[None, :]
    diff = jnp.moveaxis(gg, 2, -1)[..., :, None] - jnp.moveaxis(gg, 2, -1)[..., None, :]
    strict, causal = ri > ci, ri >= ci  # diff: [B,NT,H,C,C]
    kk = ein("bnihk,bnjhk->bnhij", k5, k5)
    a = jnp.where(
        strict,
        jnp.moveaxis(be, 2, -1)[..., :, None] * kk * jnp.exp(jnp.where(strict, diff, 0.0)),
        0.0,
    )
    # Exact blocked inversion by matmuls, not LAPACK trsm (which can deadlock on XLA:CPU, where
    # the interpret-mode tests run this backward).
    tinv = unit_lower_inverse(a)
    rk = (be * jnp.exp(gg))[..., None] * k5
    rv = be[..., None] * v5
    w = ein("bnhij,bnjhk->bnihk", tinv, rk)
    u = ein("bnhij,bnjhv->bnihv", tinv, rv)
    qg = st.scale * q5 * jnp.exp(gg)[..., None]
    qk = ein("bnihk,bnjhk->bnhij", q5, k5)
    aqk = jnp.where(causal, st.scale * qk * jnp.exp(jnp.where(causal, diff, 0.0)), 0.0)
    aqk = jnp.moveaxis(aqk, 2, 3)  # [B,NT,C(i),H,C(j)]
    kd = k5 * jnp.exp(gc - gg)[..., None]
    lgc = jnp.where(jnp.arange(c)[None, None, :, None] == c - 1, gc, 0.0)
    outs = (w, u, qg, kd, aqk)
    outs = tuple(x.reshape(b, tp, h, x.shape[-1]).astype(dt) for x in outs)
    return outs + (lgc.reshape(b, tp, h),)


def _cast(x, ref):
    return x.astype(ref.dtype)


def _backward_f32(st: Static, res, cts):
    q, k, v, g, beta, s0 = res
    do, dst = cts
    dt = operand_dtype(q, k, v)
    (w, u, qg, kd, aqk, lgc), vjp = jax.vjp(
        functools.partial(_chunk_local_xla, st=st, dt=dt), q, k, v, g, beta
    )
    do, dst = do.astype(dt), dst.astype(F32)
    hmat, vp, _ = states_call(w, u, kd, lgc, s0, st, dt, bwd=True)
    du, dw, dqg, dkd, daqk, dlgc, ds0 = reverse_fused_call(
        w, qg, kd, aqk, lgc, hmat, vp, do, dst, st, dt
    )
    dq, dk, dv, dg, dbeta = vjp(
        (_cast(dw, w), _cast(du, u), _cast(dqg, qg), _cast(dkd, kd), _cast(daqk, aqk), dlgc)
    )
    return dq, dk, dv, dg, dbeta, None if s0 is None else ds0.astype(s0.dtype)


def _backward_bf16(st: Static, res, cts):
    q, k, v, g, beta, s0, *kept = res
    do, dst = cts
    dt = operand_dtype(q, k, v)
    if kept:  # T and G (and perhaps h, v') from the forward: no second inversion
        gcum, tmat, states = kept
        names = ("w", "kd", "qg", "aqk") if states is not None else PREP_OUTPUTS
        got = prep_call(q, k, v, beta, gcum, tmat, st, dt, names)
        w, u, kd, qg, aqk = (got.get(n) for n in PREP_OUTPUTS)
    else:
        w, u, gcum, kd, tmat = chunk_call(k, v, g, beta, st, dt, with_kd=True, with_t=True)
        got = prep_call(q, k, v, beta, gcum, tmat, st, dt, ("qg", "aqk"))
        qg, aqk, states = got["qg"], got["aqk"], None
    lgc = chunk_end_g(gcum, st.chunk)
    do, dst = do.astype(dt), dst.astype(F32)
    if states is None:
        states = state_pass(w, u, kd, lgc, s0, st, dt, bwd=True)[:2]
    hmat, vp = states
    du, dh, ds0 = reverse_dh_pass(do, aqk, qg, kd, w, lgc, dst, st, dt)
    dw, dqg, dkd, daqk, dlgc = grads_call(do, vp, du, hmat, dh, lgc, st, dt)
    dq, dk, dv, dg, dbeta = chunk_local_backward_call(
        q, k, v, beta, gcum, tmat, dw, du, dqg, dkd, daqk, dlgc, st=st, dt=dt, g_dtype=g.dtype
    )
    return (
        _cast(dq, q), _cast(dk, k), _cast(dv, v), _cast(dg, g), _cast(dbeta, beta),
        None if s0 is None else ds0.astype(s0.dtype),
    )  # fmt: skip


def backward(st: Static, res, cts):
    """Cotangents of (q, k, v, g, beta, s0) from the forward's residuals `res` (the inputs, then
    what forward.forward kept) and those of (o, final state)."""
    if st.cfg.path == "float32":
        return _backward_f32(st, res, cts)
    return _backward_bf16(st, res, cts)
