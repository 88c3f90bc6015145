"""The reverse pass over chunks of the Pallas gated delta rule's backward.

Letters: B batch, T time (Tp padded to a multiple of C), H heads, K key dim, V value dim,
C chunk length, NT = Tp / C chunks, BV value block, NV = V / BV.

From the chunk-local quantities w, qg = s q exp(G), kd = k exp(G_C - G), aqk = s causal Gamma
q k^T, the chunk-start states h (S_i) and v', and do, with dS' the cotangent of the state leaving
chunk i as the loop carry (from the final state's cotangent):

    dv' = aqk^T do + kd dS'                          (= du)
    dS  = exp(G_C) dS' + qg^T do - w^T dv'
    dw = -dv' S^T     dqg = do S^T     daqk = do v'^T     dkd = v' dS'^T
    dG_C = exp(G_C) sum(S * dS')  (on every row of the chunk: lgc holds G_C on the last row only)

float32 path, `reverse_fused_call`: one sequential kernel per (V-block, b, h) does all of it,
writing fp32 partial gradients per V-block that are summed afterwards.
bfloat16 path, as flash-linear-attention does: `dh_call`, a sequential kernel that keeps only
the recurrence (four dots per step; it loads neither h nor v') and writes du and dS' of every
chunk (dh, like the forward's h); then `grads_call`, chunk-parallel (grid NT x B x H, all of V in
one program, so no per-V-block partials), forms dw, dqg, dkd, daqk, dG_C from h and dh. Its
outputs are in the operand dtype (bf16 for bf16 inputs): the closed-form chunk-local backward
uses du and dw only as dot operands, which it rounds to bf16 anyway, and dqg, dkd, daqk once
more each before the bf16 gradients they feed. segments.py runs dh_kernel per sequence segment.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from taylorcal_jax.ops.gdn.call_options import Static
from taylorcal_jax.ops.gdn.pallas_gpu.common import (
    F32,
    chunk_end,
    chunk_loop,
    chunk_rows,
    launch,
    seq_launch,
    seq_specs,
)
from taylorcal_jax.ops.pallas_dot import mm

# ----------------------------------------------------------------------------- float32 path


def _fused_reverse_kernel(
    do_ref,
    aqk_ref,
    qg_ref,
    kd_ref,
    w_ref,
    lgc_ref,
    h_ref,
    vp_ref,
    dst_ref,
    du_ref,
    dw_ref,
    dqg_ref,
    dkd_ref,
    daqk_ref,
    dlgc_ref,
    ds0_ref,
    *,
    st,
    dt,
    nt,
    kdim,
):
    c = st.chunk

    def body(n, dsp):
        i = nt - 1 - n
        rows = pl.ds(pl.multiple_of(i * c, c), c)
        s = h_ref[pl.ds(pl.multiple_of(i * kdim, kdim), kdim), :].astype(F32)
        do = do_ref[rows, :].astype(F32)
        vp = vp_ref[rows, :].astype(F32)
        kd = kd_ref[rows, :]
        w = w_ref[rows, :]
        egc = jnp.exp(jnp.sum(lgc_ref[rows]))
        dvp = mm(aqk_ref[rows, :], do, 0, 0, dt) + mm(kd, dsp, 1, 0, dt)
        du_ref[rows, :] = dvp.astype(du_ref.dtype)
        dw_ref[rows, :] = -mm(dvp, s, 1, 1, dt)
        dqg_ref[rows, :] = mm(do, s, 1, 1, dt)
        daqk_ref[rows, :] = mm(do, vp, 1, 1, dt)
        dkd_ref[rows, :] = mm(vp, dsp, 1, 1, dt)
        dgc = egc * jnp.sum(s * dsp)
        dlgc_ref[rows] = jnp.full((c,), dgc, F32)
        return egc * dsp + mm(qg_ref[rows, :], do, 0, 0, dt) - mm(w, dvp, 0, 0, dt)

    ds0_ref[...] = lax.fori_loop(0, nt, body, dst_ref[...].astype(F32))


def reverse_fused_call(w, qg, kd, aqk, lgc, hmat, vp, do, dst, st: Static, dt):
    """(du, dw, dqg, dkd, daqk, dlgc, ds0), fp32, the per-V-block partials summed."""
    b, tp, h, kdim = w.shape
    vd = do.shape[-1]
    c = st.chunk
    nt = tp // c
    bv = min(st.cfg.block_v, vd)
    nv = vd // bv
    sp = seq_specs(tp, c, kdim, bv)
    pk = pl.BlockSpec((None, None, tp, None, kdim), lambda j, bb, hh: (j, bb, 0, hh, 0))
    pc = pl.BlockSpec((None, None, tp, None, c), lambda j, bb, hh: (j, bb, 0, hh, 0))
    pt = pl.BlockSpec((None, None, tp, None), lambda j, bb, hh: (j, bb, 0, hh))
    du, dw, dqg, dkd, daqk, dlgc, ds0 = pl.pallas_call(
        functools.partial(_fused_reverse_kernel, st=st, dt=dt, nt=nt, kdim=kdim),
        grid=(nv, b, h),
        in_specs=[sp.v, sp.c, sp.k, sp.k, sp.k, sp.t, sp.hs, sp.v, sp.state],
        out_specs=[sp.v, pk, pk, pk, pc, pt, sp.state],
        out_shape=[
            jax.ShapeDtypeStruct((b, tp, h, vd), F32),
            jax.ShapeDtypeStruct((nv, b, tp, h, kdim), F32),
            jax.ShapeDtypeStruct((nv, b, tp, h, kdim), F32),
            jax.ShapeDtypeStruct((nv, b, tp, h, kdim), F32),
            jax.ShapeDtypeStruct((nv, b, tp, h, c), F32),
            jax.ShapeDtypeStruct((nv, b, tp, h), F32),
            jax.ShapeDtypeStruct((b, h, kdim, vd), F32),
        ],
        interpret=st.interpret,
        **launch("gdn_reverse", st, st.cfg.warps, dt, bwd=True),
    )(do, aqk, qg, kd, w, lgc, hmat, vp, dst)
    # partial gradients per V-block, summed here
    return du, dw.sum(0), dqg.sum(0), dkd.sum(0), daqk.sum(0), dlgc.sum(0), ds0


# ----------------------------------------------------------------------------- bfloat16 path


def dh_kernel(
    do_ref,
    aqk_ref,
    qg_ref,
    kd_ref,
    w_ref,
    lgc_ref,
    dst_ref,
    du_ref,
    dh_ref,
    ds0_ref,
    *,
    st,
    dt,
    nt,
    kdim,
    prefetch=False,
):
    """The recurrence alone: du = dv' and dh = dS' of every chunk, from dst = dS' at the end."""
    c = st.chunk

    def load(i):
        rows = chunk_rows(i, c)
        return (
            do_ref[rows, :], aqk_ref[rows, :], qg_ref[rows, :], kd_ref[rows, :], w_ref[rows, :],
            chunk_end(lgc_ref, i, c),
        )  # fmt: skip

    def step(i, tiles, dsp):
        do, aqk, qg, kd, w, gc_last = tiles
        rows = chunk_rows(i, c)
        dh_ref[pl.ds(pl.multiple_of(i * kdim, kdim), kdim), :] = dsp.astype(dh_ref.dtype)
        dvp = mm(aqk, do, 0, 0, dt) + mm(kd, dsp, 1, 0, dt)
        du_ref[rows, :] = dvp.astype(du_ref.dtype)
        return jnp.exp(gc_last)[:, None] * dsp + mm(qg, do, 0, 0, dt) - mm(w, dvp, 0, 0, dt)

    ds0_ref[...] = chunk_loop(nt, load, step, dst_ref[...].astype(F32), prefetch, reverse=True)


def dh_call(do, aqk, qg, kd, w, lgc, dst, st: Static, dt):
    """(du [B,Tp,H,V], dh = dS' per chunk [B,H,NT*K,V], both in dt; ds0 fp32) by one sequential
    pass per (V-block, b, h)."""
    b, tp, h, kdim = w.shape
    vd = do.shape[-1]
    c = st.chunk
    nt = tp // c
    bv = min(st.cfg.block_v, vd)
    sp = seq_specs(tp, c, kdim, bv)
    prefetch, launch_opts = seq_launch("gdn_reverse_dh", st, (vd // bv) * b * h, dt, bwd=True)
    return pl.pallas_call(
        functools.partial(dh_kernel, st=st, dt=dt, nt=nt, kdim=kdim, prefetch=prefetch),
        grid=(vd // bv, b, h),
        in_specs=[sp.v, sp.c, sp.k, sp.k, sp.k, sp.t, sp.state],
        out_specs=[sp.v, sp.hs, sp.state],
        out_shape=[
            jax.ShapeDtypeStruct((b, tp, h, vd), dt),
            jax.ShapeDtypeStruct((b, h, nt * kdim, vd), dt),
            jax.ShapeDtypeStruct((b, h, kdim, vd), F32),
        ],
        interpret=st.interpret,
        **launch_opts,
    )(do, aqk, qg, kd, w, lgc, dst)


def _grads_kernel(
    do_ref,
    vp_ref,
    du_ref,
    h_ref,
    dh_ref,
    lgc_ref,
    dw_ref,
    dqg_ref,
    dkd_ref,
    daqk_ref,
    dlgc_ref,
    *,
    st,
    dt,
):
    c = st.chunk
    s = h_ref[...]
    do = do_ref[...]
    dw_ref[...] = (-mm(du_ref[...], s, 1, 1, dt)).astype(dw_ref.dtype)
    dqg_ref[...] = mm(do, s, 1, 1, dt).astype(dqg_ref.dtype)
    vp = vp_ref[...]
    daqk_ref[...] = mm(do, vp, 1, 1, dt).astype(daqk_ref.dtype)
    dsp = dh_ref[...]
    dkd_ref[...] = mm(vp, dsp, 1, 1, dt).astype(dkd_ref.dtype)
    egc = jnp.exp(jnp.sum(lgc_ref[...]))
    dgc = egc * jnp.sum(s.astype(F32) * dsp.astype(F32))
    dlgc_ref[...] = jnp.full((c,), dgc, F32)


def grads_call(do, vp, du, hmat, dh, lgc, st: Static, dt):
    """(dw, dqg, dkd, daqk in dt; dlgc fp32), [B, Tp, H, *], one program per (chunk, b, h)."""
    b, tp, h, vd = do.shape
    c = st.chunk
    nt = tp // c
    kdim = hmat.shape[2] // nt
    i4 = lambda i, bb, hh: (bb, i, hh, 0)  # noqa: E731
    ck, cv = pl.BlockSpec((None, c, None, kdim), i4), pl.BlockSpec((None, c, None, vd), i4)
    cc = pl.BlockSpec((None, c, None, c), i4)
    ct = pl.BlockSpec((None, c, None), lambda i, bb, hh: (bb, i, hh))
    kv = pl.BlockSpec((None, None, kdim, vd), lambda i, bb, hh: (bb, hh, i, 0))
    return pl.pallas_call(
        functools.partial(_grads_kernel, st=st, dt=dt),
        grid=(nt, b, h),
        in_specs=[cv, cv, cv, kv, kv, ct],
        out_specs=[ck, ck, ck, cc, ct],
        out_shape=[jax.ShapeDtypeStruct((b, tp, h, kdim), dt)] * 3
        + [jax.ShapeDtypeStruct((b, tp, h, c), dt), jax.ShapeDtypeStruct((b, tp, h), F32)],
        interpret=st.interpret,
        **launch("gdn_reverse_grads", st, st.cfg.warps_bwd_chunk, dt, bwd=True),
    )(do, vp, du, hmat, dh, lgc)
