"""The output o of the Pallas gated delta rule: a chunk-parallel kernel, or a fused sequential pass.

Letters: B batch, T time (Tp padded to a multiple of C), H heads, K key dim, V value dim,
C chunk length, NT = Tp / C chunks, BV value block, NV = V / BV.

Per chunk, with S = h the state entering it, q, k L2-normalised, s = K^-1/2:

    o = s (q exp(G)) S + (s causal Gamma q k^T) v'

`out_call` (grid NT x B x H, all of V per program) reads the state pass's h and v'. On the
bfloat16 path q and k go to the dots as loaded and the norms (r_q, r_k), s and the decays to the
[C, C] and [C, V] results: o = diag(s r_q exp(G)) (q S) + (causal Gamma diag(s r_q) q k^T
diag(r_k)) v'.

`fused_call` (the bfloat16 path's forward outside differentiation, unsegmented) does the state
pass and o in one sequential loop per (V-block, b, h), so neither h nor v' goes to memory:

    v' = u - w S,   o as above,   S <- exp(G_C) S + k^T diag(r_k exp(G_C - G)) v'.
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
    gamma,
    iota,
    launch,
    rnorm,
    seq_specs,
    start_state,
    with_s0,
)
from taylorcal_jax.ops.gdn.reference import l2_normalize
from taylorcal_jax.ops.pallas_dot import mm


def _out_kernel(q_ref, k_ref, gcum_ref, h_ref, vp_ref, o_ref, *, st, dt):
    c = st.chunk
    causal = iota((c, c), 0) >= iota((c, c), 1)
    gg = gcum_ref[...]
    decay = gamma(gg, causal)
    if st.cfg.path == "bfloat16":  # q, k into the dots as loaded; norms, s and decays after
        # the same o as _fused_kernel's step, written out here too: the order of the loads
        # decides this kernel's registers and shared memory
        q, k = q_ref[...], k_ref[...]
        rq, rk = st.scale * rnorm(q, st.use_l2), rnorm(k, st.use_l2)
        qk = mm(q, k, 1, 1, dt) * rq[:, None] * rk[None, :]
        aqk = jnp.where(causal, qk * decay, 0.0)
        o = (rq * jnp.exp(gg))[:, None] * mm(q, h_ref[...], 1, 0, dt)
        o_ref[...] = (o + mm(aqk, vp_ref[...], 1, 0, dt)).astype(o_ref.dtype)
        return
    q = q_ref[...].astype(F32)
    k = k_ref[...].astype(F32)
    if st.use_l2:
        q, k = l2_normalize(q), l2_normalize(k)
    q = q * st.scale
    qk = mm(q, k, 1, 1, dt)
    aqk = jnp.where(causal, qk * decay, 0.0)
    o = mm(q * jnp.exp(gg)[:, None], h_ref[...], 1, 0, dt) + mm(aqk, vp_ref[...], 1, 0, dt)
    o_ref[...] = o.astype(o_ref.dtype)


def out_call(q, k, gcum, hmat, vp, st: Static, dt, out_dtype):
    """o [B, Tp, H, V] in out_dtype from the chunk-start states h and v'."""
    b, tp, h, kdim = q.shape
    vd = vp.shape[-1]
    c = st.chunk
    idx4 = lambda i, bb, hh: (bb, i, hh, 0)  # noqa: E731
    return pl.pallas_call(
        functools.partial(_out_kernel, st=st, dt=dt),
        grid=(tp // c, b, h),
        in_specs=[
            pl.BlockSpec((None, c, None, kdim), idx4),
            pl.BlockSpec((None, c, None, kdim), idx4),
            pl.BlockSpec((None, c, None), lambda i, bb, hh: (bb, i, hh)),
            pl.BlockSpec((None, None, kdim, vd), lambda i, bb, hh: (bb, hh, i, 0)),
            pl.BlockSpec((None, c, None, vd), idx4),
        ],
        out_specs=pl.BlockSpec((None, c, None, vd), idx4),
        out_shape=jax.ShapeDtypeStruct((b, tp, h, vd), out_dtype),
        interpret=st.interpret,
        **launch("gdn_out", st, st.cfg.warps, dt),
    )(q, k, gcum, hmat, vp)


def _fused_kernel(q_ref, k_ref, w_ref, u_ref, gcum_ref, *refs, st, dt, nt, has_s0):
    """The fused pass (module docstring). refs: (s0 if has_s0), o, final state."""
    c = st.chunk
    s_start, (o_ref, st_ref) = start_state(refs, has_s0, (k_ref.shape[-1], u_ref.shape[-1]))
    causal = iota((c, c), 0) >= iota((c, c), 1)

    def load(i):
        rows = chunk_rows(i, c)
        end = chunk_end(gcum_ref, i, c)
        return q_ref[rows, :], k_ref[rows, :], w_ref[rows, :], u_ref[rows, :], gcum_ref[rows], end

    def step(i, tiles, s):
        q, k, w, u, gg, gc_last = tiles
        rq, rk = st.scale * rnorm(q, st.use_l2), rnorm(k, st.use_l2)
        vp = u.astype(F32) - mm(w, s, 1, 0, dt)
        qk = mm(q, k, 1, 1, dt) * rq[:, None] * rk[None, :]
        aqk = jnp.where(causal, qk * gamma(gg, causal), 0.0)
        o = (rq * jnp.exp(gg))[:, None] * mm(q, s, 1, 0, dt) + mm(aqk, vp, 1, 0, dt)
        o_ref[chunk_rows(i, c), :] = o.astype(o_ref.dtype)
        vs = vp * (rk * jnp.exp(gc_last - gg))[:, None]
        return s * jnp.exp(gc_last)[:, None] + mm(k, vs, 0, 0, dt)

    # no prefetch here: with five products per step the carried tiles cost more than they save
    # (docs/kernel.md)
    st_ref[...] = chunk_loop(nt, load, step, s_start, prefetch=False)


def fused_block_v(st: Static, b, h, vd) -> int:
    """The fused pass's value block: config.block_v, halved (down to 16) while the grid has fewer
    than config.fused_programs programs. One program per (V-block, b, h) runs the whole sequence,
    and the fused step runs best with two programs resident per SM (docs/kernel.md)."""
    bv = min(st.cfg.block_v, vd)
    while bv > 16 and (vd // bv) * b * h < st.cfg.fused_programs:
        bv //= 2
    return bv


def fused_call(q, k, w, u, gcum, s0, st: Static, dt, out_dtype):
    """(o [B, Tp, H, V] in out_dtype, final state fp32) by the fused pass."""
    b, tp, h, kd = q.shape
    vd = u.shape[-1]
    bv = fused_block_v(st, b, h, vd)
    nv = vd // bv
    sp = seq_specs(tp, st.chunk, kd, bv)
    kern = functools.partial(_fused_kernel, st=st, dt=dt, nt=tp // st.chunk, has_s0=s0 is not None)
    specs, args = with_s0([sp.k, sp.k, sp.k, sp.v, sp.t], [q, k, w, u, gcum], s0, sp.state)
    return pl.pallas_call(
        kern,
        grid=(nv, b, h),
        in_specs=specs,
        out_specs=[sp.v, sp.state],
        out_shape=[
            jax.ShapeDtypeStruct((b, tp, h, vd), out_dtype),
            jax.ShapeDtypeStruct((b, h, kd, vd), F32),
        ],
        interpret=st.interpret,
        **launch("gdn_seq", st, st.cfg.warps, dt),
    )(*args)
