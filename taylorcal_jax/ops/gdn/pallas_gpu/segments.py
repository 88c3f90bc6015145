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
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from taylorcal_jax.ops.gdn.call_options import Static
from taylorcal_jax.ops.gdn.pallas_gpu.common import (
    F32,
    SeqSpecs,
    chunk_end_decay,
    iota,
    launch,
    seq_launch,
    seq_specs,
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


class _Segmentation(NamedTuple):
    """Shapes and BlockSpecs of a segmented pass (state pass or reverse recurrence)."""

    b: int
    h: int
    kdim: int
    vd: int
    nseg: int
    nsc: int  # chunks per segment
    bv: int
    nv: int
    specs: SeqSpecs  # per (V-block j, segment s, b, h) over the segment's NSC * C rows
    v_ends: pl.BlockSpec  # specs.v for the ends kernels: their M programs (j >= NV) read block NV-1


def _segmentation(st: Static, b, tp, h, kdim, vd, nseg) -> _Segmentation:
    """_Segmentation of [B, Tp, H, K] operands and V values cut into nseg segments."""
    c = st.chunk
    bv = min(st.cfg.block_v, vd)
    nv = vd // bv
    rows = tp // nseg
    v_ends = pl.BlockSpec(
        (None, rows, None, bv), lambda j, s, bb, hh: (bb, s, hh, jnp.minimum(j, nv - 1))
    )
    specs = seq_specs(rows, c, kdim, bv, segmented=True)
    return _Segmentation(b, h, kdim, vd, nseg, rows // c, bv, nv, specs, v_ends)


def _ends_call(kernel, name: str, in_specs, args, sg: _Segmentation, st: Static, dt, bwd: bool):
    """[B, H, NSEG, K, V + K] fp32, each segment's E (first V columns) and M (last K columns),
    by the ends kernel `kernel` over the grid (NV + K / BV) x NSEG x B x H (step 1 above)."""
    return pl.pallas_call(
        functools.partial(kernel, st=st, dt=dt, nsc=sg.nsc, nv=sg.nv, bv=sg.bv, kdim=sg.kdim),
        grid=(sg.nv + sg.kdim // sg.bv, sg.nseg, sg.b, sg.h),
        in_specs=in_specs,
        out_specs=sg.specs.state,
        out_shape=jax.ShapeDtypeStruct((sg.b, sg.h, sg.nseg, sg.kdim, sg.vd + sg.kdim), F32),
        interpret=st.interpret,
        **launch(name, st, st.cfg.warps, dt, bwd),
    )(*args)


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
    sg = _segmentation(st, b, tp, h, kdim, vd, nseg)
    sp = sg.specs
    ends_specs = [sp.k, sg.v_ends, sp.k, sp.t]
    x = _ends_call(
        _ends_kernel, "gdn_segment_ends", ends_specs, (w, u, kd, gc_src), sg, st, dt, bwd
    )
    starts = _segment_starts(x, s0, vd)
    prefetch, launch_opts = seq_launch("gdn_states_seg", st, sg.nv * nseg * b * h, dt, bwd)
    hmat, vp, ends = pl.pallas_call(
        functools.partial(states_kernel, st=st, dt=dt, nt=sg.nsc, kdim=kdim, prefetch=prefetch),
        grid=(sg.nv, nseg, b, h),
        in_specs=[sp.k, sp.v, sp.k, sp.t, sp.state],
        out_specs=[sp.hs, sp.v, sp.state],
        out_shape=[
            jax.ShapeDtypeStruct((b, h, tp // st.chunk * kdim, vd), dt),
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
    sg = _segmentation(st, b, tp, h, kdim, vd, nseg)
    sp = sg.specs
    ends_specs = [sg.v_ends, sp.c, sp.k, sp.k, sp.k, sp.t]
    ends_args = (do, aqk, qg, kd, w, lgc)
    x = _ends_call(
        _rev_ends_kernel, "gdn_reverse_segment_ends", ends_specs, ends_args, sg, st, dt, bwd=True
    )
    seg_dst = _segment_starts(x, dst, vd, reverse=True)  # dS' at each segment's end
    programs = sg.nv * nseg * b * h
    prefetch, launch_opts = seq_launch("gdn_reverse_dh_seg", st, programs, dt, bwd=True)
    du, dh, seg_ds0 = pl.pallas_call(
        functools.partial(dh_kernel, st=st, dt=dt, nt=sg.nsc, kdim=kdim, prefetch=prefetch),
        grid=(sg.nv, nseg, b, h),
        in_specs=[sp.v, sp.c, sp.k, sp.k, sp.k, sp.t, sp.state],
        out_specs=[sp.v, sp.hs, sp.state],
        out_shape=[
            jax.ShapeDtypeStruct((b, tp, h, vd), dt),
            jax.ShapeDtypeStruct((b, h, tp // st.chunk * kdim, vd), dt),
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
