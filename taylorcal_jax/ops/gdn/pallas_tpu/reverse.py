"""The reverse kernel of the TPU gated delta rule's backward: dS carried in VMEM, chunks reversed.

Letters: BH batch * heads, Tp time padded to a multiple of C, K key dim, V value dim,
C chunk length, NT = Tp / C, BV value block, NV = V / BV.

Per chunk the sequential part of the forward is, with h = S entering the chunk and
d = exp(G_C):

    v' = u - w h        o = qg h + aqk v'        S' = d h + kd^T v'

Grid (BH [parallel], NV [parallel], NT [arbitrary], visited last chunk first): a program carries
dS' (the cotangent of S', fp32 [K, BV]) in a VMEM scratch, starting from that of the final state:

    dv' = aqk^T do + kd dS'                 du = dv'
    dw  = -dv' h^T      dqg = do h^T        daqk = do v'^T      dkd = v' dS'^T
    dd  = sum(h * dS')                      dh = d dS' + qg^T do - w^T dv'   (the next dS')

dw, dqg, dkd, daqk contract over the value block, so each value block writes its own partial
[BH, NV, Tp, .] (summed over NV by the caller); dd is written per value column ([BH, NT, 1, V],
summed over V by the caller). dS0 is the carry after the first chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from taylorcal_jax.ops.gdn.call_options import Static
from taylorcal_jax.ops.gdn.pallas_tpu.common import (
    F32,
    column,
    last_row,
    pallas_options,
)
from taylorcal_jax.ops.pallas_dot import mm


def _kernel(
    do_ref, qg_ref, kd_ref, w_ref, aqk_ref, h_ref, vp_ref, grow_ref, dsT_ref,
    du_ref, dw_ref, dqg_ref, dkd_ref, daqk_ref, dd_ref, ds0_ref, ds_ref, *, dt,
):  # fmt: skip
    n = pl.program_id(2)

    @pl.when(n == 0)
    def _():
        ds_ref[...] = dsT_ref[...]

    do, qg, kd, w = do_ref[...], qg_ref[...], kd_ref[...], w_ref[...]
    aqk, vp = aqk_ref[...], vp_ref[...]
    h, ds = h_ref[...], ds_ref[...]  # [K, BV] fp32
    dvp = mm(aqk, do, 0, 0, dt) + mm(kd, ds, 1, 0, dt)  # [C, BV]
    du_ref[...] = dvp
    dw_ref[...] = -mm(dvp, h, 1, 1, dt)
    dqg_ref[...] = mm(do, h, 1, 1, dt)
    daqk_ref[...] = mm(do, vp, 1, 1, dt)
    dkd_ref[...] = mm(vp, ds, 1, 1, dt)
    dd_ref[...] = jnp.sum(h * ds, axis=0, keepdims=True)
    decay = jnp.exp(last_row(column(grow_ref[...])))  # [1, 1]
    ds_ref[...] = decay * ds + mm(qg, do, 0, 0, dt) - mm(w, dvp, 0, 0, dt)

    @pl.when(n == pl.num_programs(2) - 1)
    def _():
        ds0_ref[...] = ds_ref[...]


def reverse_call(do, qg, kd, w, aqk, h, vp, gcum, ds_final, st: Static, dt):
    """Runs the reverse kernel; all inputs [BH, Tp, .] but h [BH, NT * K, V], gcum [BH, Tp] and
    ds_final [BH, K, V] (fp32). Returns (du [BH, Tp, V], dw, dqg, dkd [BH, Tp, K], daqk
    [BH, Tp, C], dd [BH, NT], dS0 [BH, K, V]), all fp32, partials already summed."""
    bh, tp, kdim = qg.shape
    vdim = do.shape[-1]
    c = st.chunk
    nt = tp // c
    bv = st.cfg.value_block(vdim)
    nv = vdim // bv

    def rev(n):  # the chunk visited at step n
        return nt - 1 - n

    def rows(width, by_value=False):
        if by_value:
            return pl.BlockSpec((None, c, width), lambda i, j, n: (i, rev(n), j))
        return pl.BlockSpec((None, c, width), lambda i, j, n: (i, rev(n), 0))

    def partial(width):  # this value block's partial of a [BH, NV, Tp, width] array
        return pl.BlockSpec((None, None, c, width), lambda i, j, n: (i, j, rev(n), 0))

    state_spec = pl.BlockSpec((None, kdim, bv), lambda i, j, n: (i, 0, j))
    in_specs = [
        rows(bv, True), rows(kdim), rows(kdim), rows(kdim), rows(c),
        pl.BlockSpec((None, kdim, bv), lambda i, j, n: (i, rev(n), j)), rows(bv, True),
        pl.BlockSpec((None, None, 1, c), lambda i, j, n: (i, rev(n), 0, 0)), state_spec,
    ]  # fmt: skip
    out_specs = [
        rows(bv, True), partial(kdim), partial(kdim), partial(kdim), partial(c),
        pl.BlockSpec((None, None, 1, bv), lambda i, j, n: (i, rev(n), 0, j)), state_spec,
    ]  # fmt: skip
    shape = jax.ShapeDtypeStruct
    out_shape = [
        shape((bh, tp, vdim), F32),
        *(shape((bh, nv, tp, d), F32) for d in (kdim, kdim, kdim, c)),
        shape((bh, nt, 1, vdim), F32),
        shape((bh, kdim, vdim), F32),
    ]
    du, dw, dqg, dkd, daqk, dd, ds0 = pl.pallas_call(
        functools.partial(_kernel, dt=dt),
        grid=(bh, nv, nt),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((kdim, bv), F32)],
        **pallas_options("gdn_tpu_reverse", st, ("parallel", "parallel", "arbitrary")),
    )(do, qg, kd, w, aqk, h, vp, gcum.reshape(bh, nt, 1, c), ds_final)
    dw, dqg, dkd, daqk = (x.sum(axis=1) for x in (dw, dqg, dkd, daqk))
    return du, dw, dqg, dkd, daqk, dd.sum(axis=(2, 3)), ds0
