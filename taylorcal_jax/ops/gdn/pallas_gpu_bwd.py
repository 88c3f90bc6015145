"""Chunk-local backward of the gated delta rule as two Pallas kernels (config.backward="pallas").

Letters: B batch, T time (Tp padded to a multiple of C), H heads, K key dim, V value dim,
C chunk length, NT = Tp / C chunks.

Exactly the closed form of chunk_local_bwd.py (same letters: G = cumsum g within the chunk,
Gamma_ij = exp(G_i - G_j), q^ and k^ L2-normalised, s = K^-1/2, Rk = beta exp(G) k^, Rv = beta v,
A = strict(beta (k^ k^T) Gamma)), reading T = (I + A)^-1 as written by kernel 1 ("fla" body,
`with_t=True`) instead of recomputing it. Both kernels are chunk-parallel (grid NT x B x H, B and
H squeezed by the BlockSpecs) and split the work so that neither holds more than a few [C, K]
fp32 tiles at once (the former one-kernel version, which also recomputed T, spilled ~1.5-2 KB
per thread on sm_90 and was slower than the XLA closed form):

  kernel A, `_wy_bwd_kernel` (the WY part; from T, k, v, beta, G, dw, du):
    dT = dw Rk^T + du Rv^T     dRk = T^T dw     dRv = T^T du     dA = strict(-T^T dT T^T)
    dv = beta dRv                                                           (final, v's dtype)
    dbeta = rowsum(dRk exp(G) k^) + rowsum(dRv v) + rowsum(dA (k^ k^T) Gamma) (final)
    Pk = beta exp(G) dRk + E k^ + E^T k^        (E = beta dA Gamma)         (partial, in dt)
    Pg = rowsum(dRk Rk) + rows(N) - cols(N)     (N = dA * A = E * k^ k^T)   (fp32 partial)

  kernel B, `_qk_bwd_kernel` (the q/k/g part; from q, k, G, dqg, dkd, daqk, dG_C, Pk, Pg):
    Dq = s daqk Gamma (causal)     M = daqk * aqk = Dq * (q^ k^T)
    dq^ = s exp(G) dqg + Dq k^     dk^ = Pk + Dq^T q^ + exp(G_C - G) dkd
    dG = Pg + rowsum(dqg qg) - rowsum(dkd kd) + rows(M) - cols(M);  dG_{C-1} += dG_C + sum(dkd kd)
    dg = reverse cumsum of dG within the chunk, as a masked column sum (Triton has no reverse
      cumsum): dg_j = sum_{i >= j} dG_i
    dq = (dq^ - q^ (q^ . dq^)) / sqrt(|q|^2 + eps), likewise dk        (final, input dtypes)

Between them one [C, K] partial in the operand dtype and one [C] fp32 partial per chunk go
through HBM. Dots as in the rest of the kernels (pallas_gpu._mm): operands in the input dtype
(bf16 for bf16 inputs, as chunk_local_bwd does) with fp32 accumulation; fp32 inputs at
config.f32_precision. Only G_i - G_j with i >= j and G_C - G_j are exponentiated, masks applied
before the exp and the dots.

Also here: `prep_call`, the chunk-parallel kernel forming the backward's chunk-local inputs
(w, u, kd, qg, aqk, or a subset) from T (used by backward="analytic" and "pallas").
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from taylorcal_jax.ops.gdn import pallas_gpu as pg

F32 = jnp.float32


def _load_normalised(ref, st):
    """(rows of ref L2-normalised when st.use_l2, 1 / norm [C, 1] or None), fp32."""
    x = ref[...].astype(F32)
    if not st.use_l2:
        return x, None
    r = lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + pg._EPS)
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
    prec,
):
    """Kernel A (module docstring), in phases that keep few [C, K] tiles live: the value side;
    dT; dA and E (only [C, C] tiles and k^); then dRk = T^T dw. T, k^ and dw are loaded again
    at each use rather than kept live (kept live, they spilled 56-184 bytes per thread on sm_90;
    the reloads hit L2)."""
    c = st.chunk
    strict = pg._iota((c, c), 0) > pg._iota((c, c), 1)
    beta = beta_ref[...].astype(F32)
    gg = gcum_ref[...]
    eg = jnp.exp(gg)
    bg = beta * eg
    # value side: dRv = T^T du, dv, du Rv^T
    du = du_ref[...].astype(F32)
    v = v_ref[...].astype(F32)
    drv = pg._mm(t_ref[...], du, 0, 0, dt, prec)
    dv_ref[...] = (drv * beta[:, None]).astype(dv_ref.dtype)
    dbeta = jnp.sum(drv * v, axis=1)
    dtm = pg._mm(du, beta[:, None] * v, 1, 1, dt, prec)
    # dT = dw Rk^T + du Rv^T
    kn, _ = _load_normalised(k_ref, st)
    dtm = dtm + pg._mm(dw_ref[...].astype(F32), bg[:, None] * kn, 1, 1, dt, prec)
    # dA = strict(-(T^T dT) T^T), then through A = strict(beta (k^ k^T) Gamma)
    tdt = pg._mm(t_ref[...], dtm, 0, 0, dt, prec)
    da = jnp.where(strict, -pg._mm(tdt, t_ref[...], 1, 1, dt, prec), 0.0)
    gam_s = jnp.where(strict, pg._gamma(gg, strict), 0.0)
    da_gam = da * gam_s
    kk = pg._mm(kn, kn, 1, 1, dt, prec)
    dbeta = dbeta + jnp.sum(da_gam * kk, axis=1)
    e = beta[:, None] * da_gam
    n = e * kk  # dA * A
    dgg = jnp.sum(n, axis=1) - jnp.sum(n, axis=0)
    # key side: dRk = T^T dw; rowsum(dRk Rk) = beta rowsum(dRk exp(G) k^)
    kn, _ = _load_normalised(k_ref, st)
    drk = pg._mm(t_ref[...], dw_ref[...].astype(F32), 0, 0, dt, prec)
    rk_sum = jnp.sum(drk * eg[:, None] * kn, axis=1)
    dbeta_ref[...] = (dbeta + rk_sum).astype(dbeta_ref.dtype)
    dgp_ref[...] = dgg + beta * rk_sum
    # E k^ + E^T k^ as one dot: E is strictly lower, so E + E^T rounds like E and E^T do
    dkp_ref[...] = (bg[:, None] * drk + pg._mm(e + e.T, kn, 1, 0, dt, prec)).astype(dkp_ref.dtype)


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
    prec,
):
    """Kernel B (module docstring): M, then dk, then dq. The first q^ is held in the dot dtype
    (it only feeds dots) and q^ is loaded again, in fp32 with its norm, for dq and dG; held in
    fp32 throughout it spilled on sm_90 (as did several other orders tried)."""
    c = st.chunk
    rc, cc = pg._iota((c, c), 0), pg._iota((c, c), 1)
    causal = rc >= cc
    gg = gcum_ref[...]
    eg = jnp.exp(gg)
    edec = jnp.exp(pg._last(gg, c) - gg)
    qn = _load_normalised(q_ref, st)[0].astype(dt)  # only a dot operand until reloaded
    kn, rk = _load_normalised(k_ref, st)
    gam_c = jnp.where(causal, pg._gamma(gg, causal), 0.0)
    dq_mat = st.scale * daqk_ref[...].astype(F32) * gam_c  # d(q^ k^T)
    m = dq_mat * pg._mm(qn, kn, 1, 1, dt, prec)  # daqk * aqk
    dgg = dgp_ref[...] + jnp.sum(m, axis=1) - jnp.sum(m, axis=0)
    # dk
    dkd = dkd_ref[...].astype(F32)
    pkd = jnp.sum(dkd * kn, axis=1) * edec  # rowsum(dkd kd)
    dkn = dkp_ref[...].astype(F32) + pg._mm(dq_mat, qn, 0, 0, dt, prec) + edec[:, None] * dkd
    dk_ref[...] = _l2_backward(kn, rk, dkn).astype(dk_ref.dtype)
    # dq
    qn, rq = _load_normalised(q_ref, st)
    dqg = dqg_ref[...].astype(F32)
    dgg = dgg + st.scale * jnp.sum(dqg * qn, axis=1) * eg
    dqn = st.scale * eg[:, None] * dqg + pg._mm(dq_mat, kn, 1, 0, dt, prec)
    dq_ref[...] = _l2_backward(qn, rq, dqn).astype(dq_ref.dtype)
    last = pg._iota((c,), 0) == c - 1
    dgg = dgg - pkd + jnp.where(last, pg._last(dlgc_ref[...], c) + jnp.sum(pkd), 0.0)
    dg_ref[...] = jnp.sum(jnp.where(causal, dgg[:, None], 0.0), axis=0)  # reverse cumsum


def chunk_local_backward_call(
    q, k, v, beta, gcum, tmat, dw, du, dqg, dkd, daqk, dlgc, st, dt, g_dtype=F32
):
    """(dq, dk, dv, dg, dbeta) in the dtypes of (q, k, v, g, beta); same contract as
    chunk_local_bwd.chunk_local_backward (all cotangents summed over V-blocks, [B, Tp, H, *])."""
    b, tp, h, kdim = q.shape
    vd = v.shape[-1]
    c = st.chunk
    i4 = lambda i, bb, hh: (bb, i, hh, 0)  # noqa: E731
    i3 = lambda i, bb, hh: (bb, i, hh)  # noqa: E731
    bk, bv = pl.BlockSpec((None, c, None, kdim), i4), pl.BlockSpec((None, c, None, vd), i4)
    bc, bt = pl.BlockSpec((None, c, None, c), i4), pl.BlockSpec((None, c, None), i3)
    prec = pg._f32_precision(st)
    grid = (tp // c, b, h)
    dv, dbeta, dkp, dgp = pl.pallas_call(
        functools.partial(_wy_bwd_kernel, st=st, dt=dt, prec=prec),
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
        **pg._launch("gdn_bwd_wy", st, st.cfg.warps_bwd_chunk, dt, bwd=True),
    )(tmat, k, v, beta, gcum, dw, du)
    dq, dk, dg = pl.pallas_call(
        functools.partial(_qk_bwd_kernel, st=st, dt=dt, prec=prec),
        grid=grid,
        in_specs=[bk, bk, bt, bk, bk, bc, bt, bk, bt],
        out_specs=[bk, bk, bt],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct(k.shape, k.dtype),
            jax.ShapeDtypeStruct(beta.shape, g_dtype),
        ],
        interpret=st.interpret,
        **pg._launch("gdn_bwd_qk", st, st.cfg.warps_bwd_qk, dt, bwd=True),
    )(q, k, gcum, dqg, dkd, daqk, dlgc, dkp, dgp)
    return dq, dk, dv, dg, dbeta


PREP_OUTPUTS = ("w", "u", "kd", "qg", "aqk")


def _prep_kernel(q_ref, k_ref, v_ref, beta_ref, gcum_ref, t_ref, *out_refs, st, dt, prec, outputs):
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
        refs["kd"][...] = (kn * jnp.exp(pg._last(gg, c) - gg)[:, None]).astype(refs["kd"].dtype)
    if "w" in refs:
        w = pg._mm(t_ref[...], (beta * eg)[:, None] * kn, 1, 0, dt, prec)
        refs["w"][...] = w.astype(refs["w"].dtype)
    if "u" in refs:
        rv = beta[:, None] * v_ref[...].astype(F32)
        refs["u"][...] = pg._mm(t_ref[...], rv, 1, 0, dt, prec).astype(refs["u"].dtype)
    if "qg" in refs or "aqk" in refs:
        qn = _load_normalised(q_ref, st)[0] * st.scale
        if "qg" in refs:
            refs["qg"][...] = (qn * eg[:, None]).astype(refs["qg"].dtype)
        if "aqk" in refs:
            causal = pg._iota((c, c), 0) >= pg._iota((c, c), 1)
            gam = pg._gamma(gg, causal)
            aqk = jnp.where(causal, pg._mm(qn, kn, 1, 1, dt, prec) * gam, 0.0)
            refs["aqk"][...] = aqk.astype(refs["aqk"].dtype)


def prep_call(q, k, v, beta, gcum, tmat, st, dt, outputs=PREP_OUTPUTS):
    """{name: [B, Tp, H, *] in dt} for the requested `outputs` (a sub-sequence of PREP_OUTPUTS)
    from T ([B, Tp, H, C]) and G ([B, Tp, H] fp32); one chunk-parallel kernel (grid NT x B x H).
    The backward uses it on the T the forward kept (config.residuals "t" / "states": all five,
    or w, kd, qg, aqk), or for qg and aqk next to kernel 1's recompute (residuals "inputs")."""
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
        functools.partial(_prep_kernel, st=st, dt=dt, prec=pg._f32_precision(st), outputs=outputs),
        grid=(tp // c, b, h),
        in_specs=[bk, bk, bv, bt, bt, bc],
        out_specs=[spec[o] for o in outputs],
        out_shape=[jax.ShapeDtypeStruct((b, tp, h, width[o]), dt) for o in outputs],
        interpret=st.interpret,
        **pg._launch("gdn_bwd_prep", st, st.cfg.warps_bwd_chunk, dt, bwd=True),
    )(q, k, v, beta, gcum, tmat)
    return dict(zip(outputs, outs, strict=True))
