"""Sequence-segmented state pass of the Pallas gated delta rule (config.state_segments != 1).

Letters: B batch, T time (Tp padded), H heads, K key dim, V value dim, C chunk length,
NT = Tp / C chunks, NSEG segments of NSC = NT / NSEG chunks, BV value block, NV = V / BV.

The state pass (pallas_gpu._states_kernel) runs one program per (V-block, b, h) over all NT
chunks; for small B * H (1 x 32768 x 16: 32 programs on 132 SMs) it is latency-bound. Per chunk,

    S' = exp(G_C) S + kd^T (u - w S) = P S + kd^T u,      P = exp(G_C) I - kd^T w   [K, K],

so the state at a segment's end is affine in the state at its start: S_end = M S_start + E, with
M the product of the segment's P and E the end state from S_start = 0. Three steps:

  1. `_ends_kernel` (grid (NV + K / BV) x NSEG x B x H): the same recurrence per segment, on V-block
     columns of u from a zero state (-> E) and on K / BV extra column blocks with u = 0 from the
     identity's columns (-> M, since each column of M evolves on its own);
  2. a scan over the NSEG segments in XLA (fp32, exact dots): S_start(s + 1) = M_s S_start(s) + E_s;
  3. pallas_gpu._states_kernel per (V-block, segment, b, h) from its segment's start state, writing
     the chunk-start states h, v' and the segment end states (the last one is the final state).

The reverse pass of reverse="split" (pallas_gpu_reverse) is segmented the same way, backwards:
dS = (exp(G_C) I - w^T kd) dS' + (qg^T - w^T aqk^T) do is affine in dS' (`_rev_ends_kernel`, a
reverse scan, then pallas_gpu_reverse._dh_kernel per segment).

Step 1 moves w, kd and u once more and does (1 + K / V) times the state pass' dot work, spread
over NSEG times more programs. NSEG: the largest divisor of NT that is <= config.state_segments,
or, when that is 0, <= 128 / (NV * B * H) (about one program per SM), so large B * H is unchanged.
Status: part of config.BF16_DEFAULT (state_segments=0) since session 2; checked in interpret mode
and on an H100; at 1 x 32768 x 16 x 128 the forward takes 1.70 ms with segments, 2.21 without
(launch/results/gdn_kernel_h100_s3_check4.json).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from taylorcal_jax.ops.gdn import pallas_gpu as pg

F32 = jnp.float32
_TARGET_PROGRAMS = 128


def num_segments(max_segments: int, programs: int, nt: int) -> int:
    """Segments for a state pass of `programs` (V-block, b, h) programs over nt chunks."""
    limit = max_segments if max_segments > 0 else max(1, _TARGET_PROGRAMS // programs)
    return max(d for d in range(1, min(limit, nt) + 1) if nt % d == 0)


def num_state_segments(st, b, tp, h, kdim, vd) -> int:
    """NSEG of the state and reverse passes for these shapes; 1 = unsegmented (also when K is
    not a multiple of the value block)."""
    bv = min(st.cfg.block_v, vd)
    nseg = num_segments(st.cfg.state_segments, (vd // bv) * b * h, tp // st.chunk)
    return 1 if kdim % bv else nseg


def _ends_kernel(w_ref, u_ref, kd_ref, gc_ref, x_ref, *, st, dt, prec, nsc, nv, bv, kdim):
    c = st.chunk
    j = pl.program_id(0)
    is_m = j >= nv  # a column block of M (u = 0, identity start) rather than of E
    r, col = pg._iota((kdim, bv), 0), pg._iota((kdim, bv), 1)
    s_init = jnp.where(jnp.logical_and(is_m, r == col + (j - nv) * bv), 1.0, 0.0).astype(F32)

    def body(i, s):
        rows = pl.ds(pl.multiple_of(i * c, c), c)
        u = jnp.where(is_m, 0.0, u_ref[rows, :].astype(F32))
        vp = u - pg._mm(w_ref[rows, :], s, 1, 0, dt, prec)
        return s * pg._chunk_end_decay(gc_ref, i, c) + pg._mm(kd_ref[rows, :], vp, 0, 0, dt, prec)

    x_ref[...] = lax.fori_loop(0, nsc, body, s_init)


def states_call_segmented(w, u, kd, gc_src, s0, st, dt, bwd=False):
    """pallas_gpu._states_call's (h, v', final state) by segments; None when NSEG would be 1 or K
    is not a multiple of the value block."""
    b, tp, h, kdim = w.shape
    vd = u.shape[-1]
    c = st.chunk
    nt = tp // c
    bv = min(st.cfg.block_v, vd)
    nv = vd // bv
    nseg = num_state_segments(st, b, tp, h, kdim, vd)
    if nseg == 1:
        return None
    nsc = nt // nseg
    tseg = nsc * c
    prec = pg._f32_precision(st)
    launch = functools.partial(pg._launch, st=st, warps=st.cfg.warps_seq, dt=dt, bwd=bwd)
    fk = pl.BlockSpec((None, tseg, None, kdim), lambda j, s, bb, hh: (bb, s, hh, 0))
    ft = pl.BlockSpec((None, tseg, None), lambda j, s, bb, hh: (bb, s, hh))
    fu = pl.BlockSpec(
        (None, tseg, None, bv), lambda j, s, bb, hh: (bb, s, hh, jnp.minimum(j, nv - 1))
    )
    seg_state = pl.BlockSpec((None, None, None, kdim, bv), lambda j, s, bb, hh: (bb, hh, s, 0, j))
    x = pl.pallas_call(
        functools.partial(_ends_kernel, st=st, dt=dt, prec=prec, nsc=nsc, nv=nv, bv=bv, kdim=kdim),
        grid=(nv + kdim // bv, nseg, b, h),
        in_specs=[fk, fu, fk, ft],
        out_specs=seg_state,
        out_shape=jax.ShapeDtypeStruct((b, h, nseg, kdim, vd + kdim), F32),
        interpret=st.interpret,
        **launch("gdn_segment_ends"),
    )(w, u, kd, gc_src)

    def step(s, em):
        e_s, m_s = em
        return jnp.einsum("bhkj,bhjv->bhkv", m_s, s, precision=lax.Precision.HIGHEST) + e_s, s

    ends_e = jnp.moveaxis(x[..., :vd], 2, 0)
    ends_m = jnp.moveaxis(x[..., vd:], 2, 0)
    s0 = jnp.zeros((b, h, kdim, vd), F32) if s0 is None else s0  # the scan's first start
    _, starts = lax.scan(step, s0, (ends_e, ends_m))  # [NSEG, B, H, K, V]
    starts = jnp.moveaxis(starts, 0, 2)
    fv = pl.BlockSpec((None, tseg, None, bv), lambda j, s, bb, hh: (bb, s, hh, j))
    hs = pl.BlockSpec((None, None, nsc * kdim, bv), lambda j, s, bb, hh: (bb, hh, s, j))
    prefetch, seq_opts = pg.seq_launch(
        "gdn_states_seg", st, nv * nseg * b * h, st.cfg.warps_seq, dt, bwd
    )
    hmat, vp, ends = pl.pallas_call(
        functools.partial(
            pg._states_kernel, st=st, dt=dt, prec=prec, nt=nsc, kdim=kdim, prefetch=prefetch
        ),
        grid=(nv, nseg, b, h),
        in_specs=[fk, fv, fk, ft, seg_state],
        out_specs=[hs, fv, seg_state],
        out_shape=[
            jax.ShapeDtypeStruct((b, h, nt * kdim, vd), dt),
            jax.ShapeDtypeStruct((b, tp, h, vd), dt),
            jax.ShapeDtypeStruct((b, h, nseg, kdim, vd), F32),
        ],
        interpret=st.interpret,
        **seq_opts,
    )(w, u, kd, gc_src, starts)
    return hmat, vp, ends[:, :, -1]


# ----------------------------------------------------------------------------- reverse pass


def _rev_ends_kernel(
    do_ref, aqk_ref, qg_ref, kd_ref, w_ref, lgc_ref, x_ref, *, st, dt, prec, nsc, nv, bv, kdim
):
    """Per segment, backwards: dS = (exp(G_C) I - w^T kd) dS' + (qg^T - w^T aqk^T) do from
    dS' = 0 (V-blocks of do: E) or from the identity's columns with do = 0 (M)."""
    c = st.chunk
    j = pl.program_id(0)
    is_m = j >= nv
    r, col = pg._iota((kdim, bv), 0), pg._iota((kdim, bv), 1)
    s_init = jnp.where(jnp.logical_and(is_m, r == col + (j - nv) * bv), 1.0, 0.0).astype(F32)

    def body(n, dsp):
        i = nsc - 1 - n
        rows = pl.ds(pl.multiple_of(i * c, c), c)
        do = jnp.where(is_m, 0.0, do_ref[rows, :].astype(F32))
        dvp = pg._mm(aqk_ref[rows, :], do, 0, 0, dt, prec) + pg._mm(
            kd_ref[rows, :], dsp, 1, 0, dt, prec
        )
        return (
            pg._chunk_end_decay(lgc_ref, i, c) * dsp
            + pg._mm(qg_ref[rows, :], do, 0, 0, dt, prec)
            - pg._mm(w_ref[rows, :], dvp, 0, 0, dt, prec)
        )

    x_ref[...] = lax.fori_loop(0, nsc, body, s_init)


def reverse_dh_segmented(do, aqk, qg, kd, w, lgc, dst, st, dt):
    """pallas_gpu_reverse._dh_call's (du, dh, ds0) by segments; None when NSEG would be 1 or K is
    not a multiple of the value block."""
    from taylorcal_jax.ops.gdn.pallas_gpu_reverse import _dh_kernel

    b, tp, h, kdim = w.shape
    vd = do.shape[-1]
    c = st.chunk
    nt = tp // c
    bv = min(st.cfg.block_v, vd)
    nv = vd // bv
    nseg = num_state_segments(st, b, tp, h, kdim, vd)
    if nseg == 1:
        return None
    nsc = nt // nseg
    tseg = nsc * c
    prec = pg._f32_precision(st)
    launch = functools.partial(pg._launch, st=st, warps=st.cfg.warps_bwd, dt=dt, bwd=True)
    fk = pl.BlockSpec((None, tseg, None, kdim), lambda j, s, bb, hh: (bb, s, hh, 0))
    fc = pl.BlockSpec((None, tseg, None, c), lambda j, s, bb, hh: (bb, s, hh, 0))
    ft = pl.BlockSpec((None, tseg, None), lambda j, s, bb, hh: (bb, s, hh))
    fdo = pl.BlockSpec(
        (None, tseg, None, bv), lambda j, s, bb, hh: (bb, s, hh, jnp.minimum(j, nv - 1))
    )
    seg_state = pl.BlockSpec((None, None, None, kdim, bv), lambda j, s, bb, hh: (bb, hh, s, 0, j))
    x = pl.pallas_call(
        functools.partial(
            _rev_ends_kernel, st=st, dt=dt, prec=prec, nsc=nsc, nv=nv, bv=bv, kdim=kdim
        ),
        grid=(nv + kdim // bv, nseg, b, h),
        in_specs=[fdo, fc, fk, fk, fk, ft],
        out_specs=seg_state,
        out_shape=jax.ShapeDtypeStruct((b, h, nseg, kdim, vd + kdim), F32),
        interpret=st.interpret,
        **launch("gdn_reverse_segment_ends"),
    )(do, aqk, qg, kd, w, lgc)

    def step(dsp, em):
        e_s, m_s = em
        return jnp.einsum("bhkj,bhjv->bhkv", m_s, dsp, precision=lax.Precision.HIGHEST) + e_s, dsp

    _, seg_dst = lax.scan(
        step, dst, (jnp.moveaxis(x[..., :vd], 2, 0), jnp.moveaxis(x[..., vd:], 2, 0)), reverse=True
    )
    seg_dst = jnp.moveaxis(seg_dst, 0, 2)  # dS' at each segment's end [B, H, NSEG, K, V]
    fv = pl.BlockSpec((None, tseg, None, bv), lambda j, s, bb, hh: (bb, s, hh, j))
    hs = pl.BlockSpec((None, None, nsc * kdim, bv), lambda j, s, bb, hh: (bb, hh, s, j))
    prefetch, seq_opts = pg.seq_launch(
        "gdn_reverse_dh_seg", st, nv * nseg * b * h, st.cfg.warps_bwd, dt, bwd=True
    )
    du, dh, seg_ds0 = pl.pallas_call(
        functools.partial(
            _dh_kernel, st=st, dt=dt, prec=prec, nt=nsc, kdim=kdim, prefetch=prefetch
        ),
        grid=(nv, nseg, b, h),
        in_specs=[fv, fc, fk, fk, fk, ft, seg_state],
        out_specs=[fv, hs, seg_state],
        out_shape=[
            jax.ShapeDtypeStruct((b, tp, h, vd), dt),
            jax.ShapeDtypeStruct((b, h, nt * kdim, vd), dt),
            jax.ShapeDtypeStruct((b, h, nseg, kdim, vd), F32),
        ],
        interpret=st.interpret,
        **seq_opts,
    )(do, aqk, qg, kd, w, lgc, seg_dst)
    return du, dh, seg_ds0[:, :, 0]
