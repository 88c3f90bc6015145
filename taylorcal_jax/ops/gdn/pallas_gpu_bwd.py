"""Chunk-local backward of the gated delta rule as one Pallas kernel (opt-in: config.backward).

Letters: B batch, T time (Tp padded), H heads, K key dim, V value dim, C chunk length.

The sequential reverse pass (pallas_gpu._reverse_kernel) yields the cotangents of the chunk-local
quantities w, u, qg = s q exp(G), kd = k exp(G_C - G), aqk = s causal Gamma q k^T and G_C. This
kernel (grid NT x B x H) maps them back to (q, k, v, g, beta) in one pass per chunk, recomputing
T = (I + A)^-1 by 16 x 16 blocks as the forward does and assembling it with exact 0/1 dots (or,
with config.chunk_kernel = "fla", as pallas_gpu_chunk.t_inverse_fla does: full [C, C] dots):

    dT = dw Rk^T + du Rv^T        dRk = T^T dw      dRv = T^T du      (Rk = beta exp(G) k,
    dA = strict_lower(-T^T dT T^T)                                      Rv = beta v)
    dbeta = rowsum(dRk exp(G) k) + rowsum(dRv v) + rowsum(dA KK Gamma)
    dk^ = beta exp(G) dRk + E k + E^T k + Dq^T q^ + exp(G_C - G) dkd   (E = dA beta Gamma,
    dq^ = s exp(G) dqg + Dq k^                                          Dq = s daqk causal Gamma)
    dG  = rowsum(dqg qg) + rowsum(dRk Rk) - rowsum(dkd kd) + rows(N) - cols(N) + rows(M) - cols(M)
          (N = dA * A, M = daqk * aqk), dG_C-1 += dG_C + sum(dkd kd);  dg = reverse cumsum dG
    dq = r (dq^ - q^ (q^ . dq^)) with r = 1 / sqrt(|q|^2 + eps), likewise dk.

Status: checked in interpret mode against the XLA vjp (tests/test_gdn_pallas.py); not yet
compiled on a GPU, hence not the default (config.backward = "xla").
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from taylorcal_jax.ops.gdn import pallas_gpu as pg

F32 = jnp.float32


def _sel(rows, cols, offset, transpose=False):
    """0/1 matrix placing a 16-wide block at `offset`: [rows, cols] with 1 at (r, r + offset)."""
    r, c = pg._iota((rows, cols), 0), pg._iota((rows, cols), 1)
    return ((r == c + offset) if transpose else (c == r + offset)).astype(F32)


def _t_full(k_ref, g, beta_ref, st, dt, prec):
    """T = (I + A)^-1 as a full [C, C] fp32 value (16 x 16 blocks as in the forward kernel)."""
    c = st.chunk
    ns = c // 16
    hp = lax.Precision.HIGHEST
    r16c, c16c = pg._iota((16, c), 0), pg._iota((16, c), 1)
    ks, gs, bs = [], [], []
    for i in range(ns):
        k_i = k_ref[pl.ds(16 * i, 16), :].astype(F32)
        ks.append(pg._l2(k_i) if st.use_l2 else k_i)
        gs.append(jnp.sum(jnp.where(c16c <= r16c + 16 * i, g[None, :], 0.0), axis=1))
        bs.append(beta_ref[pl.ds(16 * i, 16)].astype(F32))
    a, t = pg._blocked_a_and_inverse(ks, gs, bs, dt, prec)
    full = None
    for i in range(ns):
        row = None
        for j in range(i + 1):  # row block i: [16, C] = sum_j T_ij P_j^T
            part = pg._mm(t[i, j], _sel(16, c, 16 * j), 1, 0, F32, hp)
            row = part if row is None else row + part
        part = pg._mm(_sel(c, 16, 16 * i, transpose=True), row, 1, 0, F32, hp)
        full = part if full is None else full + part
    return full


def _sum_refs(refs):
    out = refs[0][...].astype(F32)
    for r in refs[1:]:
        out = out + r[...].astype(F32)
    return out


def _chunk_bwd_kernel(*refs, st, dt, prec, prec32, nv):
    """Phases ordered so that inputs are loaded (or reloaded) just before their last use."""
    q_ref, k_ref, v_ref, g_ref, beta_ref = refs[:5]
    dw_p, dqg_p, dkd_p, daqk_p, dlgc_p = (refs[5 + i * nv : 5 + (i + 1) * nv] for i in range(5))
    du_ref = refs[5 + 5 * nv]
    dq_ref, dk_ref, dv_ref, dg_ref, dbeta_ref = refs[6 + 5 * nv :]
    c = st.chunk
    rc, cc = pg._iota((c, c), 0), pg._iota((c, c), 1)
    strict, causal = rc > cc, rc >= cc
    g = g_ref[...].astype(F32)
    gg = jnp.sum(jnp.where(cc <= rc, g[None, :], 0.0), axis=1)  # G = cumsum g
    gc = pg._last(gg, c)
    eg = jnp.exp(gg)
    beta = beta_ref[...].astype(F32)

    def load_n(ref):  # (normalised rows, 1 / norm)
        x = ref[...].astype(F32)
        if not st.use_l2:
            return x, None
        r = lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + pg._EPS)
        return x * r, r

    # phase 1: A and T
    kn, _ = load_n(k_ref)
    diff = gg[:, None] - gg[None, :]
    gam_s = jnp.where(strict, jnp.exp(jnp.where(strict, diff, 0.0)), 0.0)
    kk = pg._mm(kn, kn, 1, 1, dt, prec)
    if st.cfg.chunk_kernel == "fla":  # full [C, C] T from A as kernel 1 "fla" builds it
        from taylorcal_jax.ops.gdn import pallas_gpu_chunk as pc

        t = pc.t_inverse_fla(beta[:, None] * kk * gam_s, pc.t_precision(st, dt))
    else:
        t = _t_full(k_ref, g, beta_ref, st, dt, prec)
    # phase 2: w = T Rk, u = T Rv
    dw = _sum_refs(dw_p)
    du = du_ref[...].astype(F32)
    v = v_ref[...].astype(F32)
    rk_ = (beta * eg)[:, None] * kn
    dt_ = pg._mm(dw, rk_, 1, 1, dt, prec) + pg._mm(du, beta[:, None] * v, 1, 1, dt, prec)
    drk = pg._mm(t, dw, 0, 0, dt, prec)  # T^T dw
    drv = pg._mm(t, du, 0, 0, dt, prec)
    dv_ref[...] = (drv * beta[:, None]).astype(dv_ref.dtype)
    dbeta = jnp.sum(drk * eg[:, None] * kn, axis=1) + jnp.sum(drv * v, axis=1)
    dgg = jnp.sum(drk * rk_, axis=1)
    dkn = drk * (beta * eg)[:, None]
    x = pg._mm(dt_, t, 1, 1, F32, prec32)  # dT T^T
    da = jnp.where(strict, -pg._mm(t, x, 0, 0, F32, prec32), 0.0)  # -T^T dT T^T, strict lower
    dkk = da * gam_s
    dbeta = dbeta + jnp.sum(dkk * kk, axis=1)
    n = dkk * kk * beta[:, None]  # dA * A
    dgg = dgg + jnp.sum(n, axis=1) - jnp.sum(n, axis=0)
    e = dkk * beta[:, None]  # d(KK)
    dkn = dkn + pg._mm(e, kn, 1, 0, dt, prec) + pg._mm(e, kn, 0, 0, dt, prec)
    dbeta_ref[...] = dbeta.astype(dbeta_ref.dtype)
    # phase 3: aqk = s causal Gamma q k^T, qg = s q exp(G), kd = k exp(G_C - G)
    qn, rq = load_n(q_ref)
    gam_c = jnp.where(causal, jnp.exp(jnp.where(causal, diff, 0.0)), 0.0)
    daqk = _sum_refs(daqk_p) * (st.scale * gam_c)  # d(q k^T)
    m = daqk * pg._mm(qn, kn, 1, 1, dt, prec)  # daqk * aqk
    dgg = dgg + jnp.sum(m, axis=1) - jnp.sum(m, axis=0)
    dqg = _sum_refs(dqg_p)
    dgg = dgg + st.scale * jnp.sum(dqg * qn, axis=1) * eg
    dqn = st.scale * eg[:, None] * dqg + pg._mm(daqk, kn, 1, 0, dt, prec)
    if st.use_l2:
        dqn = rq * (dqn - qn * jnp.sum(qn * dqn, axis=-1, keepdims=True))
    dq_ref[...] = dqn.astype(dq_ref.dtype)
    dkn = dkn + pg._mm(daqk, qn, 0, 0, dt, prec)
    ekd = jnp.exp(gc - gg)
    dkd = _sum_refs(dkd_p)
    kd_term = jnp.sum(dkd * kn, axis=1) * ekd
    dkn = dkn + dkd * ekd[:, None]
    last = pg._iota((c,), 0) == c - 1
    dgc = pg._last(_sum_refs(dlgc_p), c)
    dgg = dgg - kd_term + jnp.where(last, dgc + jnp.sum(kd_term), 0.0)
    dg_ref[...] = jnp.sum(jnp.where(rc >= cc, dgg[:, None], 0.0), axis=0)  # reverse cumsum
    if st.use_l2:
        kn, rk = load_n(k_ref)
        dkn = rk * (dkn - kn * jnp.sum(kn * dkn, axis=-1, keepdims=True))
    dk_ref[...] = dkn.astype(dk_ref.dtype)


def chunk_bwd_call(q, k, v, g, beta, dw, du, dqg, dkd, daqk, dlgc, st, dt):
    """(dq, dk, dv, dg, dbeta) in the dtypes of (q, k, v, g, beta).

    dw, dqg, dkd, daqk, dlgc: per-V-block partial cotangents [NV, B, Tp, H, *] from the reverse
    pass, summed inside the kernel (saves an XLA pass over them).
    """
    b, tp, h, kdim = q.shape
    vd = v.shape[-1]
    c = st.chunk
    i4 = lambda i, bb, hh: (bb, i, hh, 0)  # noqa: E731
    i3 = lambda i, bb, hh: (bb, i, hh)  # noqa: E731
    bk, bv = pl.BlockSpec((None, c, None, kdim), i4), pl.BlockSpec((None, c, None, vd), i4)
    bt = pl.BlockSpec((None, c, None), i3)
    nv = dw.shape[0]

    def part(last_dim, j):
        if last_dim is None:
            return pl.BlockSpec((None, None, c, None), lambda i, bb, hh: (j, bb, i, hh))
        return pl.BlockSpec((None, None, c, None, last_dim), lambda i, bb, hh: (j, bb, i, hh, 0))

    part_specs = []
    for last_dim in (kdim, kdim, kdim, c, None):
        part_specs += [part(last_dim, j) for j in range(nv)]
    prec = pg._f32_precision(st)
    prec32 = prec if dt == F32 else None  # bf16 inputs: TF32 for the fp32 [C, C] products
    return pl.pallas_call(
        functools.partial(_chunk_bwd_kernel, st=st, dt=dt, prec=prec, prec32=prec32, nv=nv),
        grid=(tp // c, b, h),
        in_specs=[bk, bk, bv, bt, bt, *part_specs, bv],
        out_specs=[bk, bk, bv, bt, bt],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct(k.shape, k.dtype),
            jax.ShapeDtypeStruct(v.shape, v.dtype),
            jax.ShapeDtypeStruct(g.shape, F32),
            jax.ShapeDtypeStruct(beta.shape, beta.dtype),
        ],
        interpret=st.interpret,
        compiler_params=pg._compiler_params(st, st.cfg.warps_bwd_chunk, dt, bwd=True),
        name="gdn_chunk_bwd",
    )(
        q,
        k,
        v,
        g,
        beta,
        *([dw] * nv),
        *([dqg] * nv),
        *([dkd] * nv),
        *([daqk] * nv),
        *([dlgc] * nv),
        du,
    )


def _qg_aqk_kernel(q_ref, k_ref, gcum_ref, qg_ref, aqk_ref, *, st, dt, prec):
    c = st.chunk
    causal = pg._iota((c, c), 0) >= pg._iota((c, c), 1)
    q = q_ref[...].astype(F32)
    k = k_ref[...].astype(F32)
    if st.use_l2:
        q, k = pg._l2(q), pg._l2(k)
    q = q * st.scale
    gg = gcum_ref[...]
    qk = pg._mm(q, k, 1, 1, dt, prec)
    aqk = jnp.where(causal, qk * jnp.exp(jnp.where(causal, gg[:, None] - gg[None, :], 0.0)), 0.0)
    aqk_ref[...] = aqk.astype(aqk_ref.dtype)
    qg_ref[...] = (q * jnp.exp(gg)[:, None]).astype(qg_ref.dtype)


def qg_aqk_call(q, k, st, dt, gcum):
    """qg = s q exp(G) [B,Tp,H,K] and aqk = s causal Gamma q k^T [B,Tp,H,C] (input dtype) by one
    chunk-parallel Pallas kernel (grid NT x B x H), as the forward's output kernel forms them."""
    b, tp, h, kdim = q.shape
    c = st.chunk
    i4 = lambda i, bb, hh: (bb, i, hh, 0)  # noqa: E731
    bk = pl.BlockSpec((None, c, None, kdim), i4)
    return pl.pallas_call(
        functools.partial(_qg_aqk_kernel, st=st, dt=dt, prec=pg._f32_precision(st)),
        grid=(tp // c, b, h),
        in_specs=[bk, bk, pl.BlockSpec((None, c, None), lambda i, bb, hh: (bb, i, hh))],
        out_specs=[bk, pl.BlockSpec((None, c, None, c), i4)],
        out_shape=[
            jax.ShapeDtypeStruct((b, tp, h, kdim), dt),
            jax.ShapeDtypeStruct((b, tp, h, c), dt),
        ],
        interpret=st.interpret,
        compiler_params=pg._compiler_params(st, st.cfg.warps_out, dt, bwd=True),
        name="gdn_qg_aqk",
    )(q, k, gcum)
