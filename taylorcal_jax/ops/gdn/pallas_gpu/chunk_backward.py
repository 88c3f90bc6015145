"""Chunk-parallel kernels of the bfloat16 path's backward: the chunk-local map's inputs from T, and
its closed-form backward.

Letters: B batch, T time (Tp padded to a multiple of C), H heads, K key dim, V value dim,
C chunk length, NT = Tp / C chunks.

Within a chunk: G = cumsum g, Gamma_ij = exp(G_i - G_j), q^ and k^ the L2-normalised q and k,
s = K^-1/2, and the chunk-local map of the forward

    Rk = beta exp(G) k^    Rv = beta v    A = strict(beta_i (k^ k^T)_ij Gamma_ij)    T = (I + A)^-1
    w = T Rk    u = T Rv    qg = s q^ exp(G)    kd = k^ exp(G_C - G)    aqk = causal(s q^ k^T Gamma)

`prep_call` forms any of w, u, kd, qg, aqk from T and G (T as kernel 1 wrote it in the forward,
or in the backward's rerun of kernel 1), without a second inversion.

`chunk_local_backward_call` maps the reverse pass's cotangents (dw, du, dqg, dkd, daqk, dG_C)
back to (q, k, v, g, beta) by the closed form

    dT = dw Rk^T + du Rv^T      dRk = T^T dw      dRv = T^T du      dA = strict(-T^T dT T^T)
    dbeta = rowsum(dRk exp(G) k^) + rowsum(dRv v) + rowsum(dA (k^ k^T) Gamma)
    dk^ = beta exp(G) dRk + E k^ + E^T k^ + Dq^T q^ + exp(G_C - G) dkd    (E = beta dA Gamma,
    dq^ = s exp(G) dqg + Dq k^                                            Dq = s daqk Gamma)
    dG  = rowsum(dqg qg) + rowsum(dRk Rk) - rowsum(dkd kd) + rows(N) - cols(N) + rows(M) - cols(M)
          (N = dA * A, M = daqk * aqk);  dG_{C-1} += dG_C + sum(dkd kd)
    dg  = reverse cumsum of dG within the chunk, as a masked column sum (Triton has no reverse
          cumsum): dg_j = sum_{i >= j} dG_i
    dq = (dq^ - q^ (q^ . dq^)) / sqrt(|q|^2 + eps), likewise dk

as two kernels that split the work so that neither holds more than a few [C, K] fp32 tiles at
once (grid NT x B x H, B and H squeezed by the BlockSpecs):

  kernel A, `_wy_bwd_kernel` (the WY part; from T, k, v, beta, G, dw, du): dv and dbeta (final),
    Pk = beta exp(G) dRk + E k^ + E^T k^ (partial dk^, in the operand dtype) and
    Pg = rowsum(dRk Rk) + rows(N) - cols(N) (partial dG, fp32);
  kernel B, `_qk_bwd_kernel` (the q/k/g part; from q, k, G, dqg, dkd, daqk, dG_C, Pk, Pg): dq,
    dk, dg (final).

Dots take operands in the operand dtype (bf16 for bf16 inputs) with fp32 accumulation; only
G_i - G_j with i >= j and G_C - G_j are exponentiated, masks applied before the exp and the dots.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from taylorcal_jax.ops.gdn.pallas_gpu.common import F32, gamma, iota, last, launch
from taylorcal_jax.ops.gdn.reference import L2_EPS
from taylorcal_jax.ops.pallas_dot import mm


def _load_normalised(ref, st):
    """(rows of ref L2-normalised when st.use_l2, 1 / norm [C, 1] or None), fp32."""
    x = ref[...].astype(F32)
    if not st.use_l2:
        return x, None
    r = lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + L2_EPS)
    return x * r, r


def _l2_backward(xn, r, dxn):
    """Cotangent of x from that of x^ = x r: r (dx^ - x^ (x^ . dx^)); identity without l2."""
    if r is None:
        return dxn
    return r * (dxn - xn * jnp.sum(xn * dxn, axis=-1, keepdims=True))


def _wy_bwd_kernel(
    t_ref,
    k_ref,
    v_ref,
    beta_ref,
    gcum_ref,
    dw_ref,
    du_ref,
    dv_ref,
    dbeta_ref,
    dkp_ref,
    dgp_ref,
    *,
    st,
    dt,
):
    """Kernel A (module docstring), in phases that keep few [C, K] tiles live: the value side;
    dT; dA and E (only [C, C] tiles and k^); then dRk = T^T dw. T, k^ and dw are loaded again
    at each use rather than kept live: kept live they spill registers, and the reloads hit L2
    (docs/kernel.md)."""
    c = st.chunk
    strict = iota((c, c), 0) > iota((c, c), 1)
    beta = beta_ref[...].astype(F32)
    gg = gcum_ref[...]
    eg = jnp.exp(gg)
    bg = beta * eg
    # value side: dRv = T^T du, dv, du Rv^T
    du = du_ref[...].astype(F32)
    v = v_ref[...].astype(F32)
    drv = mm(t_ref[...], du, 0, 0, dt)
    dv_ref[...] = (drv * beta[:, None]).astype(dv_ref.dtype)
    dbeta = jnp.sum(drv * v, axis=1)
    dtm = mm(du, beta[:, None] * v, 1, 1, dt)
    # dT = dw Rk^T + du Rv^T
    kn, _ = _load_normalised(k_ref, st)
    dtm = dtm + mm(dw_ref[...].astype(F32), bg[:, None] * kn, 1, 1, dt)
    # dA = strict(-(T^T dT) T^T), then through A = strict(beta (k^ k^T) Gamma)
    tdt = mm(t_ref[...], dtm, 0, 0, dt)
    da = jnp.where(strict, -mm(tdt, t_ref[...], 1, 1, dt), 0.0)
    gam_s = jnp.where(strict, gamma(gg, strict), 0.0)
    da_gam = da * gam_s
    kk = mm(kn, kn, 1, 1, dt)
    dbeta = dbeta + jnp.sum(da_gam * kk, axis=1)
    e = beta[:, None] * da_gam
    n = e * kk  # dA * A
    dgg = jnp.sum(n, axis=1) - jnp.sum(n, axis=0)
    # key side: dRk = T^T dw; rowsum(dRk Rk) = beta rowsum(dRk exp(G) k^)
    kn, _ = _load_normalised(k_ref, st)
    drk = mm(t_ref[...], dw_ref[...].astype(F32), 0, 0, dt)
    rk_sum = jnp.sum(drk * eg[:, None] * kn, axis=1)
    dbeta_ref[...] = (dbeta + rk_sum).astype(dbeta_ref.dtype)
    dgp_ref[...] = dgg + beta * rk_sum
    # E k^ + E^T k^ as one dot: E is strictly lower, so E + E^T rounds like E and E^T do
    dkp_ref[...] = (bg[:, None] * drk + mm(e + e.T, kn, 1, 0, dt)).astype(dkp_ref.dtype)


def _qk_bwd_kernel(
    q_ref,
    k_ref,
    gcum_ref,
    dqg_ref,
    dkd_ref,
    daqk_ref,
    dlgc_ref,
    dkp_ref,
    dgp_ref,
    dq_ref,
    dk_ref,
    dg_ref,
    *,
    st,
    dt,
):
    """Kernel B (module docstring): M, then dk, then dq. The first q^ is held in the dot dtype
    (it only feeds dots) and q^ is loaded again, in fp32 with its norm, for dq and dG (held in
    fp32 throughout, it spills registers)."""
    c = st.chunk
    rc, cc = iota((c, c), 0), iota((c, c), 1)
    causal = rc >= cc
    gg = gcum_ref[...]
    eg = jnp.exp(gg)
    edec = jnp.exp(last(gg, c) - gg)
    qn = _load_normalised(q_ref, st)[0].astype(dt)  # only a dot operand until reloaded
    kn, rk = _load_normalised(k_ref, st)
    gam_c = jnp.where(causal, gamma(gg, causal), 0.0)
    dq_mat = st.scale * daqk_ref[...].astype(F32) * gam_c  # d(q^ k^T)
    m = dq_mat * mm(qn, kn, 1, 1, dt)  # daqk * aqk
    dgg = dgp_ref[...] + jnp.sum(m, axis=1) - jnp.sum(m, axis=0)
    # dk
    dkd = dkd_ref[...].astype(F32)
    pkd = jnp.sum(dkd * kn, axis=1) * edec  # rowsum(dkd kd)
    dkn = dkp_ref[...].astype(F32) + mm(dq_mat, qn, 0, 0, dt) + edec[:, None] * dkd
    dk_ref[...] = _l2_backward(kn, rk, dkn).astype(dk_ref.dtype)
    # dq
    qn, rq = _load_normalised(q_ref, st)
    dqg = dqg_ref[...].astype(F32)
    dgg = dgg + st.scale * jnp.sum(dqg * qn, axis=1) * eg
    dqn = st.scale * eg[:, None] * dqg + mm(dq_mat, kn, 1, 0, dt)
    dq_ref[...] = _l2_backward(qn, rq, dqn).astype(dq_ref.dtype)
    is_last = iota((c,), 0) == c - 1
    dgg = dgg - pkd + jnp.where(is_last, last(dlgc_ref[...], c) + jnp.sum(pkd), 0.0)
    dg_ref[...] = jnp.sum(jnp.where(causal, dgg[:, None], 0.0), axis=0)  # reverse cumsum


def chunk_local_backward_call(
    q, k, v, beta, gcum, tmat, dw, du, dqg, dkd, daqk, dlgc, st, dt, g_dtype=F32
):
    """(dq, dk, dv, dg, dbeta) in the dtypes of (q, k, v, g, beta) from the chunk-local
    cotangents, all [B, Tp, H, *]: q, k [B, Tp, H, K], v [B, Tp, H, V], beta [B, Tp, H] as given
    to the op; gcum [B, Tp, H] (G, fp32); tmat [B, Tp, H, C] (T per chunk, row i of a chunk at
    time index i); dw, dqg, dkd [B, Tp, H, K], du [B, Tp, H, V], daqk [B, Tp, H, C], dlgc
    [B, Tp, H] (only each chunk's last entry, the cotangent of G_C, is read)."""
    b, tp, h, kdim = q.shape
    vd = v.shape[-1]
    c = st.chunk
    i4 = lambda i, bb, hh: (bb, i, hh, 0)  # noqa: E731
    i3 = lambda i, bb, hh: (bb, i, hh)  # noqa: E731
    bk, bv = pl.BlockSpec((None, c, None, kdim), i4), pl.BlockSpec((None, c, None, vd), i4)
    bc, bt = pl.BlockSpec((None, c, None, c), i4), pl.BlockSpec((None, c, None), i3)
    grid = (tp // c, b, h)
    dv, dbeta, dkp, dgp = pl.pallas_call(
        functools.partial(_wy_bwd_kernel, st=st, dt=dt),
        grid=grid,
        in_specs=[bc, bk, bv, bt, bt, bk, bv],
        out_specs=[bv, bt, bk, bt],
        out_shape=[
            jax.ShapeDtypeStruct(v.shape, v.dtype),
            jax.ShapeDtypeStruct(beta.shape, beta.dtype),
            jax.ShapeDtypeStruct(q.shape, dt),
            jax.ShapeDtypeStruct(beta.shape, F32),
        ],
        interpret=st.interpret,
        **launch("gdn_bwd_wy", st, st.cfg.warps_bwd_chunk, dt, bwd=True),
    )(tmat, k, v, beta, gcum, dw, du)
    dq, dk, dg = pl.pallas_call(
        functools.partial(_qk_bwd_kernel, st=st, dt=dt),
        grid=grid,
        in_specs=[bk, bk, bt, bk, bk, bc, bt, bk, bt],
        out_specs=[bk, bk, bt],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct(k.shape, k.dtype),
            jax.ShapeDtypeStruct(beta.shape, g_dtype),
        ],
        interpret=st.interpret,
        **launch("gdn_bwd_qk", st, st.cfg.warps_bwd_chunk, dt, bwd=True),
    )(q, k, gcum, dqg, dkd, daqk, dlgc, dkp, dgp)
    return dq, dk, dv, dg, dbeta


PREP_OUTPUTS = ("w", "u", "kd", "qg", "aqk")


def _prep_kernel(q_ref, k_ref, v_ref, beta_ref, gcum_ref, t_ref, *out_refs, st, dt, outputs):
    """Chunk-local quantities from T and G: any of (in PREP_OUTPUTS order) w = T (beta exp(G) k^),
    u = T (beta v), kd = k^ exp(G_C - G), qg = s q^ exp(G), aqk = s causal(q^ k^T Gamma), with
    the formulas and roundings of kernel 1 and the forward's output kernel, without the [C, C]
    inversion. Inputs that no requested output reads (q for w/u/kd only, v without u, T for
    qg/aqk only) are never loaded."""
    refs = dict(zip(outputs, out_refs, strict=True))
    c = st.chunk
    gg = gcum_ref[...]
    eg = jnp.exp(gg)
    beta = beta_ref[...].astype(F32)
    kn = _load_normalised(k_ref, st)[0]
    if "kd" in refs:
        refs["kd"][...] = (kn * jnp.exp(last(gg, c) - gg)[:, None]).astype(refs["kd"].dtype)
    if "w" in refs:
        w = mm(t_ref[...], (beta * eg)[:, None] * kn, 1, 0, dt)
        refs["w"][...] = w.astype(refs["w"].dtype)
    if "u" in refs:
        rv = beta[:, None] * v_ref[...].astype(F32)
        refs["u"][...] = mm(t_ref[...], rv, 1, 0, dt).astype(refs["u"].dtype)
    if "qg" in refs or "aqk" in refs:
        qn = _load_normalised(q_ref, st)[0] * st.scale
        if "qg" in refs:
            refs["qg"][...] = (qn * eg[:, None]).astype(refs["qg"].dtype)
        if "aqk" in refs:
            causal = iota((c, c), 0) >= iota((c, c), 1)
            gam = gamma(gg, causal)
            aqk = jnp.where(causal, mm(qn, kn, 1, 1, dt) * gam, 0.0)
            refs["aqk"][...] = aqk.astype(refs["aqk"].dtype)


def prep_call(q, k, v, beta, gcum, tmat, st, dt, outputs=PREP_OUTPUTS):
    """{name: [B, Tp, H, *] in dt} for the requested `outputs` (a sub-sequence of PREP_OUTPUTS)
    from T ([B, Tp, H, C]) and G ([B, Tp, H] fp32); one chunk-parallel kernel (grid NT x B x H).
    The backward uses it on the T the forward kept (residuals "t" / "states": all five, or w,
    kd, qg, aqk), or for qg and aqk next to kernel 1's rerun (residuals "inputs")."""
    if tuple(o for o in PREP_OUTPUTS if o in outputs) != tuple(outputs):
        raise ValueError(f"outputs must be a sub-sequence of {PREP_OUTPUTS}, got {outputs}")
    b, tp, h, kdim = k.shape
    vd = v.shape[-1]
    c = st.chunk
    i4 = lambda i, bb, hh: (bb, i, hh, 0)  # noqa: E731
    bk, bv = pl.BlockSpec((None, c, None, kdim), i4), pl.BlockSpec((None, c, None, vd), i4)
    bc = pl.BlockSpec((None, c, None, c), i4)
    bt = pl.BlockSpec((None, c, None), lambda i, bb, hh: (bb, i, hh))
    width = {"w": kdim, "u": vd, "kd": kdim, "qg": kdim, "aqk": c}
    spec = {"w": bk, "u": bv, "kd": bk, "qg": bk, "aqk": bc}
    outs = pl.pallas_call(
        functools.partial(_prep_kernel, st=st, dt=dt, outputs=outputs),
        grid=(tp // c, b, h),
        in_specs=[bk, bk, bv, bt, bt, bc],
        out_specs=[spec[o] for o in outputs],
        out_shape=[jax.ShapeDtypeStruct((b, tp, h, width[o]), dt) for o in outputs],
        interpret=st.interpret,
        **launch("gdn_bwd_prep", st, st.cfg.warps_bwd_chunk, dt, bwd=True),
    )(q, k, v, beta, gcum, tmat)
    return dict(zip(outputs, outs, strict=True))
