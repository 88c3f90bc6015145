"""The forward kernel of the TPU gated delta rule: one pass over the chunks, S in VMEM.

Letters: BH batch * heads, Tp time padded to a multiple of C, K key dim, V value dim,
C chunk length, NT = Tp / C, BV value block, NV = V / BV.

Grid (BH [parallel], NV [parallel], NT [arbitrary]): a program is one (b*h, value block) and
runs the chunks in order, carrying the fp32 state S [K, BV] in a VMEM scratch. Per chunk, with
q, k L2-normalised, s the scale, G = cumsum g within the chunk (given), Gamma_ij = exp(G_i - G_j)
for i >= j:

    A   = strict_lower(beta_i (k_i . k_j) Gamma_ij)       T = (I + A)^-1 (common.unit_lower_inverse)
    w   = T (beta exp(G) k)                                u = T (beta v)
    v'  = u - w S
    o   = s (q exp(G)) S + s (causal Gamma q k^T) v'
    S  <- exp(G_C) S + (k exp(G_C - G))^T v'

A and T depend on the keys only; they are formed again in each value block (NV = 1 for V <= BV).
With `with_states` the kernel also writes h (S entering each chunk) and v' for the backward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from taylorcal_jax.ops.gdn.call_options import Static
from taylorcal_jax.ops.gdn.operands import operand_dtype
from taylorcal_jax.ops.gdn.pallas_tpu.common import (
    F32,
    column,
    iota,
    last_row,
    pallas_options,
    unit_lower_inverse,
)
from taylorcal_jax.ops.gdn.reference import l2_normalize
from taylorcal_jax.ops.pallas_dot import mm


def _kernel(*refs, st: Static, dt, has_s0: bool, with_states: bool):
    q_ref, k_ref, v_ref, grow_ref, beta_ref, *refs = refs
    s0_ref = refs.pop(0) if has_s0 else None
    o_ref, sfinal_ref, *refs = refs
    h_ref, vp_ref, s_ref = refs if with_states else (None, None, refs[0])
    n = pl.program_id(2)
    c = st.chunk

    @pl.when(n == 0)
    def _():
        s_ref[...] = s0_ref[...].astype(F32) if has_s0 else jnp.zeros(s_ref.shape, F32)

    q, k = q_ref[...].astype(F32), k_ref[...].astype(F32)  # [C, K]
    if st.use_l2:
        q, k = l2_normalize(q), l2_normalize(k)
    grow = grow_ref[...]  # G [1, C]
    gcol = column(grow)
    beta = column(beta_ref[...].astype(F32))  # [C, 1]
    row, col = iota((c, c), 0), iota((c, c), 1)
    causal, strict = row >= col, row > col
    gamma = jnp.exp(jnp.where(causal, gcol - grow, 0.0))  # masked before the exp
    a = jnp.where(strict, beta * mm(k, k, 1, 1, dt) * gamma, 0.0)
    t = unit_lower_inverse(a)
    g_last = last_row(gcol)  # [1, 1]
    w = mm(t, beta * jnp.exp(gcol) * k, 1, 0, F32)  # [C, K]
    u = mm(t, beta * v_ref[...].astype(F32), 1, 0, F32)  # [C, BV]

    s = s_ref[...]  # [K, BV] fp32, S entering this chunk
    vp = u - mm(w, s, 1, 0, dt)
    intra = jnp.where(causal, mm(q, k, 1, 1, dt) * gamma, 0.0)
    o = mm(q * jnp.exp(gcol), s, 1, 0, dt) + mm(intra, vp, 1, 0, dt)
    o_ref[...] = (st.scale * o).astype(o_ref.dtype)
    if with_states:
        h_ref[...] = s
        vp_ref[...] = vp.astype(vp_ref.dtype)
    kd = k * jnp.exp(g_last - gcol)  # exp(G_C - G_j) <= 1
    s_ref[...] = jnp.exp(g_last) * s + mm(kd, vp, 0, 0, dt)

    @pl.when(n == pl.num_programs(2) - 1)
    def _():
        sfinal_ref[...] = s_ref[...]


def forward_call(q, k, v, gcum, beta, s0, st: Static, with_states: bool = False):
    """Runs the forward kernel on [BH, Tp, .] inputs (gcum: G per token [BH, Tp], fp32).

    Returns (o [BH, Tp, V] in v's dtype, final S [BH, K, V] fp32) and, with `with_states`,
    h [BH, NT * K, V] fp32 and v' [BH, Tp, V] in the operand dtype.
    """
    bh, tp, kdim = q.shape
    vdim = v.shape[-1]
    c = st.chunk
    nt = tp // c
    bv = st.cfg.value_block(vdim)
    dt = operand_dtype(q, k, v)
    per_chunk = pl.BlockSpec((None, None, 1, c), lambda i, j, n: (i, n, 0, 0))  # [1, C] rows

    def rows(width, by_value=False):  # chunk n's rows of a [BH, Tp, width] array
        if by_value:
            return pl.BlockSpec((None, c, width), lambda i, j, n: (i, n, j))
        return pl.BlockSpec((None, c, width), lambda i, j, n: (i, n, 0))

    state_spec = pl.BlockSpec((None, kdim, bv), lambda i, j, n: (i, 0, j))
    in_specs = [
        rows(kdim), rows(kdim), rows(bv, True), per_chunk, per_chunk,
    ]  # fmt: skip
    args = [q, k, v, gcum.reshape(bh, nt, 1, c), beta.reshape(bh, nt, 1, c)]
    if s0 is not None:
        in_specs.append(state_spec)
        args.append(s0)
    out_specs = [rows(bv, True), state_spec]
    out_shape = [
        jax.ShapeDtypeStruct((bh, tp, vdim), v.dtype),
        jax.ShapeDtypeStruct((bh, kdim, vdim), F32),
    ]
    if with_states:
        out_specs += [pl.BlockSpec((None, kdim, bv), lambda i, j, n: (i, n, j)), rows(bv, True)]
        out_shape += [
            jax.ShapeDtypeStruct((bh, nt * kdim, vdim), F32),
            jax.ShapeDtypeStruct((bh, tp, vdim), dt),
        ]
    kernel = functools.partial(
        _kernel, st=st, dt=dt, has_s0=s0 is not None, with_states=with_states
    )
    return pl.pallas_call(
        kernel,
        grid=(bh, vdim // bv, nt),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((kdim, bv), F32)],
        **pallas_options("gdn_tpu_forward", st, ("parallel", "parallel", "arbitrary")),
    )(*args)
