"""Reverse (backward) pass of the Pallas gated delta rule in two kernels (config.reverse="split").

Letters: B batch, T time (Tp padded), H heads, K key dim, V value dim, C chunk length,
NT = Tp / C chunks, BV value block, NV = V / BV.

The default reverse kernel (pallas_gpu._reverse_kernel, grid NV x B x H) does nine dots per
chunk inside its sequential loop and writes fp32 partial gradients per V-block. Here, as
flash-linear-attention does, the sequential kernel keeps only the recurrence, with dS' (the
cotangent of the state leaving chunk i) as the loop carry:

    dv' = aqk^T do + kd dS'                    (written: du = dv', in the operand dtype)
    dS  = exp(G_C) dS' + qg^T do - w^T dv'     (dS' of every chunk written: dh, input dtype)

(four dots per step, and it loads neither the states h nor v'); a chunk-parallel kernel (grid
NT x B x H, all of V in one program, so no per-V-block partials) then forms the rest from the
chunk-start state S = h_i and dS' = dh_i:

    dw = -dv' S^T     dqg = do S^T     daqk = do v'^T     dkd = v' dS'^T
    dlgc = exp(G_C) sum(S * dS') on every row of the chunk (lgc holds G_C on the last row only).

du, dw, dqg, dkd and daqk are written in the operand dtype dt (bf16 for bf16 inputs, half the
bytes of fp32): the closed-form backward uses du and dw only as dot operands, which it rounds to
dt anyway, and dqg, dkd, daqk once more each before the bf16 gradients they feed.

Status: part of config.BF16_DEFAULT since session 2; checked in interpret mode
(tests/test_gdn_pallas.py) and on an H100 (gpu-marked tests, launch/bench_gdn_kernel.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from taylorcal_jax.ops.gdn import pallas_gpu as pg

F32 = jnp.float32


def _dh_kernel(
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
    prec,
    nt,
    kdim,
    prefetch=False,
):
    c = st.chunk

    def load(i):
        rows = pg.chunk_rows(i, c)
        return (
            do_ref[rows, :], aqk_ref[rows, :], qg_ref[rows, :], kd_ref[rows, :], w_ref[rows, :],
            pg._chunk_end(lgc_ref, i, c),
        )  # fmt: skip

    def step(i, tiles, dsp):
        do, aqk, qg, kd, w, gc_last = tiles
        rows = pg.chunk_rows(i, c)
        dh_ref[pl.ds(pl.multiple_of(i * kdim, kdim), kdim), :] = dsp.astype(dh_ref.dtype)
        dvp = pg._mm(aqk, do, 0, 0, dt, prec) + pg._mm(kd, dsp, 1, 0, dt, prec)
        du_ref[rows, :] = dvp.astype(du_ref.dtype)
        return (
            jnp.exp(gc_last)[:, None] * dsp
            + pg._mm(qg, do, 0, 0, dt, prec)
            - pg._mm(w, dvp, 0, 0, dt, prec)
        )

    ds0_ref[...] = pg.chunk_loop(nt, load, step, dst_ref[...].astype(F32), prefetch, reverse=True)


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
    prec,
):
    c = st.chunk
    s = h_ref[...]
    do = do_ref[...]
    dw_ref[...] = (-pg._mm(du_ref[...], s, 1, 1, dt, prec)).astype(dw_ref.dtype)
    dqg_ref[...] = pg._mm(do, s, 1, 1, dt, prec).astype(dqg_ref.dtype)
    vp = vp_ref[...]
    daqk_ref[...] = pg._mm(do, vp, 1, 1, dt, prec).astype(daqk_ref.dtype)
    dsp = dh_ref[...]
    dkd_ref[...] = pg._mm(vp, dsp, 1, 1, dt, prec).astype(dkd_ref.dtype)
    egc = jnp.exp(jnp.sum(lgc_ref[...]))
    dgc = egc * jnp.sum(s.astype(F32) * dsp.astype(F32))
    dlgc_ref[...] = jnp.full((c,), dgc, F32)


def _dh_call(do, aqk, qg, kd, w, lgc, dst, st, dt):
    """(du [B,Tp,H,V], dh = dS' per chunk [B,H,NT*K,V], both in dt; ds0 fp32) by one sequential
    pass."""
    b, tp, h, kdim = w.shape
    vd = do.shape[-1]
    c = st.chunk
    nt = tp // c
    bv = min(st.cfg.block_v, vd)
    fk = pl.BlockSpec((None, tp, None, kdim), lambda j, bb, hh: (bb, 0, hh, 0))
    fc = pl.BlockSpec((None, tp, None, c), lambda j, bb, hh: (bb, 0, hh, 0))
    fv = pl.BlockSpec((None, tp, None, bv), lambda j, bb, hh: (bb, 0, hh, j))
    ft = pl.BlockSpec((None, tp, None), lambda j, bb, hh: (bb, 0, hh))
    state = pl.BlockSpec((None, None, kdim, bv), lambda j, bb, hh: (bb, hh, 0, j))
    hs = pl.BlockSpec((None, None, nt * kdim, bv), lambda j, bb, hh: (bb, hh, 0, j))
    prefetch, launch = pg.seq_launch(
        "gdn_reverse_dh", st, (vd // bv) * b * h, st.cfg.warps_bwd, dt, bwd=True
    )
    return pl.pallas_call(
        functools.partial(
            _dh_kernel,
            st=st,
            dt=dt,
            prec=pg._f32_precision(st),
            nt=nt,
            kdim=kdim,
            prefetch=prefetch,
        ),
        grid=(vd // bv, b, h),
        in_specs=[fv, fc, fk, fk, fk, ft, state],
        out_specs=[fv, hs, state],
        out_shape=[
            jax.ShapeDtypeStruct((b, tp, h, vd), dt),
            jax.ShapeDtypeStruct((b, h, nt * kdim, vd), dt),
            jax.ShapeDtypeStruct((b, h, kdim, vd), F32),
        ],
        interpret=st.interpret,
        **launch,
    )(do, aqk, qg, kd, w, lgc, dst)


def backward_seq_split(w, u, qg, kd, aqk, lgc, s0, do, dst, st, dt, states=None):
    """Same contract as pallas_gpu._backward_seq."""
    b, tp, h, kdim = w.shape
    vd = do.shape[-1]
    c = st.chunk
    nt = tp // c
    prec = pg._f32_precision(st)
    if states is None:
        states = pg._states_call(w, u, kd, lgc, s0, st, dt, bwd=True)[:2]
    hmat, vp = states
    seg = None
    if st.cfg.state_segments != 1:
        from taylorcal_jax.ops.gdn.pallas_gpu_segments import reverse_dh_segmented

        seg = reverse_dh_segmented(do, aqk, qg, kd, w, lgc, dst, st, dt)
    du, dh, ds0 = seg if seg is not None else _dh_call(do, aqk, qg, kd, w, lgc, dst, st, dt)
    i4 = lambda i, bb, hh: (bb, i, hh, 0)  # noqa: E731
    ck, cv = pl.BlockSpec((None, c, None, kdim), i4), pl.BlockSpec((None, c, None, vd), i4)
    cc = pl.BlockSpec((None, c, None, c), i4)
    ct = pl.BlockSpec((None, c, None), lambda i, bb, hh: (bb, i, hh))
    kv = pl.BlockSpec((None, None, kdim, vd), lambda i, bb, hh: (bb, hh, i, 0))
    dw, dqg, dkd, daqk, dlgc = pl.pallas_call(
        functools.partial(_grads_kernel, st=st, dt=dt, prec=prec),
        grid=(nt, b, h),
        in_specs=[cv, cv, cv, kv, kv, ct],
        out_specs=[ck, ck, ck, cc, ct],
        out_shape=[jax.ShapeDtypeStruct((b, tp, h, kdim), dt)] * 3
        + [jax.ShapeDtypeStruct((b, tp, h, c), dt), jax.ShapeDtypeStruct((b, tp, h), F32)],
        interpret=st.interpret,
        **pg._launch("gdn_reverse_grads", st, st.cfg.warps_bwd_grads, dt, bwd=True),
    )(do, vp, du, hmat, dh, lgc)
    return du, dw, dqg, dkd, daqk, dlgc, ds0
