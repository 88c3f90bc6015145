"""Sequence segments for the sequential passes of the Pallas gated delta rule (bfloat16 path).

Letters: B batch, T time (Tp padded to a multiple of C), H heads, K key dim, V value dim,
C chunk length, NT = Tp / C chunks, NSEG segments of NSC = NT / NSEG chunks, BV value block,
NV = V / BV.

A sequential pass runs one program per (V-block, b, h) over all NT chunks; where B * H is small
(1 x 32768 x 16: 32 programs on 132 SMs) it is latency-bound. Per chunk of the state pass,

    S' = exp(G_C) S + kd^T (u - w S) = P S + kd^T u,      P = exp(G_C) I - kd^T w   [K, K],

so the state at a segment's end is affine in the state at its start: S_end = M S_start + E, with
M the product of the segment's P and E the end state from S_start = 0. Three steps:

  1. `_ends_kernel` (grid (NV + K / BV) x NSEG x B x H): the recurrence per segment, on V-block
     columns of u from a zero state (-> E) and on K / BV extra column blocks with u = 0 from the
     identity's columns (-> M, since each column of M evolves on its own);
  2. a scan over the segments in XLA (fp32, exact dots): S_start(s + 1) = M_s S_start(s) + E_s;
  3. states.states_kernel per (V-block, segment, b, h) from its segment's start state, writing
     h, v' and the segment end states (the last one is the final state).

The reverse recurrence is segmented the same way, backwards: dS = (exp(G_C) I - w^T kd) dS' +
(qg^T - w^T aqk^T) do is affine in dS' (`_rev_ends_kernel`, a reverse scan, then
reverse.dh_kernel per segment).

Step 1 moves w, kd and u once more and does (1 + K / V) times the pass' dot work, spread over
NSEG times more programs. NSEG: num_state_segments.
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
    chunk_end_decay,
    iota,
    launch,
    seq_launch,
)
from taylorcal_jax.ops.gdn.pallas_gpu.reverse import dh_call, dh_kernel
from taylorcal_jax.ops.gdn.pallas_gpu.states import states_call, states_kernel
from taylorcal_jax.ops.pallas_dot import mm


def num_segments(target_programs: int, programs: int, nt: int) -> int:
    """The largest divisor of nt that is <= target_programs / programs (at least 1): segments
    for a pass of `programs` (V-block, b, h) programs over nt chunks."""
    limit = max(1, target_programs // programs)
    return max(d for d in range(1, min(limit, nt) + 1) if nt % d == 0)


def num_state_segments(st: Static, b, tp, h, kdim, vd) -> int:
    """NSEG of the state pass and the reverse recurrence for these shapes: 1 (unsegmented) on
    the float32 path, and where K is not a multiple of the value block."""
    if st.cfg.path != "bfloat16":
        return 1
    bv = min(st.cfg.block_v, vd)
    nseg = num_segments(st.cfg.segment_programs, (vd // bv) * b * h, tp // st.chunk)
    return 1 if kdim % bv else nseg


def _segment_start(nv, kdim, bv):
    """(is_m, the start) of an ends-kernel program: program column blocks j >= nv compute M, from
    the identity's columns (j - nv) * bv ...; the others E, from zero."""
    j = pl.program_id(0)
    is_m = j >= nv
    r, col = iota((kdim, bv), 0), iota((kdim, bv), 1)
    return is_m, jnp.where(jnp.logical_and(is_m, r == col + (j - nv) * bv), 1.0, 0.0).astype(F32)


def _chain(s, em):
    """One segment of the scan: (the next segment's start M S + E, this segment's start S)."""
    e_s, m_s = em
    return jnp.einsum("bhkj,bhjv->bhkv", m_s, s, precision=lax.Precision.HIGHEST) + e_s, s


def _segment_starts(x, start, vd, reverse=False):
    """Each segment's start [B, H, NSEG, K, V] from the ends kernels' [B, H, NSEG, K, V + K]
    (E, then M) and the first segment's start (None = zeros)."""
    ends_e = jnp.moveaxis(x[..., :vd], 2, 0)
    ends_m = jnp.moveaxis(x[..., vd:], 2, 0)
    if start is None:
        b, h, _, kdim, _ = x.shape
        start = jnp.zeros((b, h, kdim, vd), F32)
    _, starts = lax.scan(_chain, start, (ends_e, ends_m), reverse=reverse)
    return jnp.moveaxis(starts, 0, 2)


# ----------------------------------------------------------------------------- state pass


def _ends_kernel(w_ref, u_ref, kd_ref, gc_ref, x_ref, *, st, dt, nsc, nv, bv, kdim):
    c = st.chunk
    is_m, s_init = _segment_start(nv, kdim, bv)

    def body(i, s):
        rows = pl.ds(pl.multiple_of(i * c, c), c)
        u = jnp.where(is_m, 0.0, u_ref[rows, :].astype(F32))
        vp = u - mm(w_ref[rows, :], s, 1, 0, dt)
        return s * chunk_end_decay(gc_ref, i, c) + mm(kd_ref[rows, :], vp, 0, 0, dt)

    x_ref[...] = lax.fori_loop(0, nsc, body, s_init)


def _states_segmented(w, u, kd, gc_src, s0, st: Static, dt, nseg, bwd):
    b, tp, h, kdim = w.shape
    vd = u.shape[-1]
    c = st.chunk
    nt = tp // c
    bv = min(st.cfg.block_v, vd)
    nv = vd // bv
    nsc = nt // nseg
    tseg = nsc * c
    fk = pl.BlockSpec((None, tseg, None, kdim), lambda j, s, bb, hh: (bb, s, hh, 0))
    ft = pl.BlockSpec((None, tseg, None), lambda j, s, bb, hh: (bb, s, hh))
    fu = pl.BlockSpec(
        (None, tseg, None, bv), lambda j, s, bb, hh: (bb, s, hh, jnp.minimum(j, nv - 1))
    )
    seg_state = pl.BlockSpec((None, None, None, kdim, bv), lambda j, s, bb, hh: (bb, hh, s, 0, j))
    x = pl.pallas_call(
        functools.partial(_ends_kernel, st=st, dt=dt, nsc=nsc, nv=nv, bv=bv, kdim=kdim),
        grid=(nv + kdim // bv, nseg, b, h),
        in_specs=[fk, fu, fk, ft],
        out_specs=seg_state,
        out_shape=jax.ShapeDtypeStruct((b, h, nseg, kdim, vd + kdim), F32),
        interpret=st.interpret,
        **launch("gdn_segment_ends", st, st.cfg.warps, dt, bwd),
    )(w, u, kd, gc_src)
    starts = _segment_starts(x, s0, vd)
    fv = pl.BlockSpec((None, tseg, None, bv), lambda j, s, bb, hh: (bb, s, hh, j))
    hs = pl.BlockSpec((None, None, nsc * kdim, bv), lambda j, s, bb, hh: (bb, hh, s, j))
    prefetch, launch_opts = seq_launch("gdn_states_seg", st, nv * nseg * b * h, dt, bwd)
    hmat, vp, ends = pl.pallas_call(
        functools.partial(states_kernel, st=st, dt=dt, nt=nsc, kdim=kdim, prefetch=prefetch),
        grid=(nv, nseg, b, h),
        in_specs=[fk, fv, fk, ft, seg_state],
        out_specs=[hs, fv, seg_state],
        out_shape=[
            jax.ShapeDtypeStruct((b, h, nt * kdim, vd), dt),
            jax.ShapeDtypeStruct((b, tp, h, vd), dt),
            jax.ShapeDtypeStruct((b, h, nseg, kdim, vd), F32),
        ],
        interpret=st.interpret,
        **launch_opts,
    )(w, u, kd, gc_src, starts)
    return hmat, vp, ends[:, :, -1]


def state_pass(w, u, kd, gc_src, s0, st: Static, dt, bwd=False, kd_from_k=False):
    """states.states_call's (h, v', final state), by segments where num_state_segments > 1
    (kd_from_k, the state pass forming kd from k, is given only where it is 1)."""
    b, tp, h, kdim = w.shape
    nseg = num_state_segments(st, b, tp, h, kdim, u.shape[-1])
    if nseg == 1 or kd_from_k:
        return states_call(w, u, kd, gc_src, s0, st, dt, bwd=bwd, kd_from_k=kd_from_k)
    return _states_segmented(w, u, kd, gc_src, s0, st, dt, nseg, bwd)


# ----------------------------------------------------------------------------- reverse pass


def _rev_ends_kernel(
    do_ref, aqk_ref, qg_ref, kd_ref, w_ref, lgc_ref, x_ref, *, st, dt, nsc, nv, bv, kdim
):
    """Per segment, backwards: dS = (exp(G_C) I - w^T kd) dS' + (qg^T - w^T aqk^T) do from
    dS' = 0 (V-blocks of do: E) or from the identity's columns with do = 0 (M)."""
    c = st.chunk
    is_m, s_init = _segment_start(nv, kdim, bv)

    def body(n, dsp):
        i = nsc - 1 - n
        rows = pl.ds(pl.multiple_of(i * c, c), c)
        do = jnp.where(is_m, 0.0, do_ref[rows, :].astype(F32))
        dvp = mm(aqk_ref[rows, :], do, 0, 0, dt) + mm(kd_ref[rows, :], dsp, 1, 0, dt)
        return (
            chunk_end_decay(lgc_ref, i, c) * dsp
            + mm(qg_ref[rows, :], do, 0, 0, dt)
            - mm(w_ref[rows, :], dvp, 0, 0, dt)
        )

    x_ref[...] = lax.fori_loop(0, nsc, body, s_init)


def _reverse_dh_segmented(do, aqk, qg, kd, w, lgc, dst, st: Static, dt, nseg):
    b, tp, h, kdim = w.shape
    vd = do.shape[-1]
    c = st.chunk
    nt = tp // c
    bv = min(st.cfg.block_v, vd)
    nv = vd // bv
    nsc = nt // nseg
    tseg = nsc * c
    fk = pl.BlockSpec((None, tseg, None, kdim), lambda j, s, bb, hh: (bb, s, hh, 0))
    fc = pl.BlockSpec((None, tseg, None, c), lambda j, s, bb, hh: (bb, s, hh, 0))
    ft = pl.BlockSpec((None, tseg, None), lambda j, s, bb, hh: (bb, s, hh))
    fdo = pl.BlockSpec(
        (None, tseg, None, bv), lambda j, s, bb, hh: (bb, s, hh, jnp.minimum(j, nv - 1))
    )
    seg_state = pl.BlockSpec((None, None, None, kdim, bv), lambda j, s, bb, hh: (bb, hh, s, 0, j))
    x = pl.pallas_call(
        functools.partial(_rev_ends_kernel, st=st, dt=dt, nsc=nsc, nv=nv, bv=bv, kdim=kdim),
        grid=(nv + kdim // bv, nseg, b, h),
        in_specs=[fdo, fc, fk, fk, fk, ft],
        out_specs=seg_state,
        out_shape=jax.ShapeDtypeStruct((b, h, nseg, kdim, vd + kdim), F32),
        interpret=st.interpret,
        **launch("gdn_reverse_segment_ends", st, st.cfg.warps, dt, bwd=True),
    )(do, aqk, qg, kd, w, lgc)
    seg_dst = _segment_starts(x, dst, vd, reverse=True)  # dS' at each segment's end
    fv = pl.BlockSpec((None, tseg, None, bv), lambda j, s, bb, hh: (bb, s, hh, j))
    hs = pl.BlockSpec((None, None, nsc * kdim, bv), lambda j, s, bb, hh: (bb, hh, s, j))
    prefetch, launch_opts = seq_launch("gdn_reverse_dh_seg", st, nv * nseg * b * h, dt, bwd=True)
    du, dh, seg_ds0 = pl.pallas_call(
        functools.partial(dh_kernel, st=st, dt=dt, nt=nsc, kdim=kdim, prefetch=prefetch),
        grid=(nv, nseg, b, h),
        in_specs=[fv, fc, fk, fk, fk, ft, seg_state],
        out_specs=[fv, hs, seg_state],
        out_shape=[
            jax.ShapeDtypeStruct((b, tp, h, vd), dt),
            jax.ShapeDtypeStruct((b, h, nt * kdim, vd), dt),
            jax.ShapeDtypeStruct((b, h, nseg, kdim, vd), F32),
        ],
        interpret=st.interpret,
        **launch_opts,
    )(do, aqk, qg, kd, w, lgc, seg_dst)
    return du, dh, seg_ds0[:, :, 0]


def reverse_dh_pass(do, aqk, qg, kd, w, lgc, dst, st: Static, dt):
    """reverse.dh_call's (du, dh, ds0), by segments where num_state_segments > 1."""
    b, tp, h, kdim = w.shape
    nseg = num_state_segments(st, b, tp, h, kdim, do.shape[-1])
    if nseg == 1:
        return dh_call(do, aqk, qg, kd, w, lgc, dst, st, dt)
    return _reverse_dh_segmented(do, aqk, qg, kd, w, lgc, dst, st, dt, nseg)
