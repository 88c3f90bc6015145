"""The state pass of the Pallas gated delta rule: chunk-start states h and v' by a sequential loop.

Letters: B batch, T time (Tp padded to a multiple of C), H heads, K key dim, V value dim,
C chunk length, NT = Tp / C chunks, BV value block, NV = V / BV.

One program per (V-block, b, h) loops over the chunks with the fp32 state S [K, BV] as the loop
carry; per chunk, from kernel 1's w, u, kd:

    h_i = S (written, operand dtype)      v' = u - w S (written)
    S  <- exp(G_C) S + kd^T v'

and the final state. With kd_from_k (the bfloat16 path where the pass runs unsegmented) it
reads k itself and G of every row, and applies kd = l2(k) exp(G_C - G) to v' instead:
kd^T v' = k^T (diag(r) v') with r = exp(G_C - G) / |k| per row, so that kernel 1 need not write
kd. The segmented form (segments.py) runs the same kernel per sequence segment.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from taylorcal_jax.ops.gdn.call_options import Static
from taylorcal_jax.ops.gdn.pallas_gpu.common import (
    F32,
    chunk_end,
    chunk_loop,
    chunk_rows,
    rnorm,
    seq_launch,
    seq_specs,
    start_state,
    with_s0,
)
from taylorcal_jax.ops.pallas_dot import mm


def states_kernel(
    w_ref,
    u_ref,
    kd_ref,
    gc_ref,
    *refs,
    st,
    dt,
    nt,
    kdim,
    kd_from_k=False,
    has_s0=True,
    prefetch=False,
):
    """gc_ref: any [Tp] vector whose last entry in each chunk is G_C (cumsum G or lgc); with
    kd_from_k, kd_ref holds k and gc_ref the cumulative G of every row, and the scaling that makes
    kd is applied to v' (off the carry's path for the norms: they depend on loads only).
    refs: (s0 if has_s0), h, v', final state."""
    c = st.chunk
    s_start, (h_ref, vp_ref, st_ref) = start_state(refs, has_s0, (kdim, u_ref.shape[-1]))

    def load(i):
        rows = chunk_rows(i, c)
        tiles = (w_ref[rows, :], u_ref[rows, :], kd_ref[rows, :], chunk_end(gc_ref, i, c))
        return tiles + ((gc_ref[rows],) if kd_from_k else ())

    def step(i, tiles, s):
        w, u, kd, gc_last, *gg = tiles
        rows = chunk_rows(i, c)
        h_ref[pl.ds(pl.multiple_of(i * kdim, kdim), kdim), :] = s.astype(h_ref.dtype)
        vp = u.astype(F32) - mm(w, s, 1, 0, dt)
        vp_ref[rows, :] = vp.astype(vp_ref.dtype)
        if kd_from_k:
            # kd^T v' = k^T (diag(r) v') with r = exp(G_C - G) / |k|: scale the [C, BV] v' (fp32,
            # in registers) rather than form a [C, K] fp32 kd; k goes to the dot as loaded
            vp = vp * (jnp.exp(gc_last - gg[0]) * rnorm(kd, st.use_l2))[:, None]
        return s * jnp.exp(gc_last)[:, None] + mm(kd, vp, 0, 0, dt)

    st_ref[...] = chunk_loop(nt, load, step, s_start, prefetch)


def states_call(w, u, kd, gc_src, s0, st: Static, dt, bwd=False, kd_from_k=False):
    """(h [B, H, NT*K, V] chunk-start states, v' [B, Tp, H, V], both in dt; final S fp32), one
    program per (V-block, b, h) over the whole sequence. kd_from_k: `kd` is k itself and gc_src
    the cumulative G of every row (states_kernel)."""
    b, tp, h, kdim = w.shape
    vd = u.shape[-1]
    nt = tp // st.chunk
    bv = min(st.cfg.block_v, vd)
    prefetch, launch_opts = seq_launch("gdn_states", st, (vd // bv) * b * h, dt, bwd)
    sp = seq_specs(tp, st.chunk, kdim, bv)
    specs, args = with_s0([sp.k, sp.v, sp.k, sp.t], [w, u, kd, gc_src], s0, sp.state)
    return pl.pallas_call(
        functools.partial(
            states_kernel,
            st=st,
            dt=dt,
            nt=nt,
            kdim=kdim,
            kd_from_k=kd_from_k,
            has_s0=s0 is not None,
            prefetch=prefetch,
        ),
        grid=(vd // bv, b, h),
        in_specs=specs,
        out_specs=[sp.hs, sp.v, sp.state],
        out_shape=[
            jax.ShapeDtypeStruct((b, h, nt * kdim, vd), dt),
            jax.ShapeDtypeStruct((b, tp, h, vd), dt),
            jax.ShapeDtypeStruct((b, h, kdim, vd), F32),
        ],
        interpret=st.interpret,
        **launch_opts,
    )(*args)
