"""Closed-form chunk-local backward of the gated delta rule in XLA, given T (config.backward).

Letters: B batch, Tp time (padded to a multiple of C), NT = Tp / C chunks, H heads, K key dim,
V value dim, C chunk length.

The sequential reverse pass (pallas_gpu._backward_seq) yields the cotangents of the chunk-local
quantities of each chunk (within a chunk, G = cumsum g, Gamma_ij = exp(G_i - G_j), q^ and k^ the
L2-normalised q and k, s = K^-1/2):

    Rk = beta exp(G) k^    Rv = beta v    A = strict(beta_i (k^ k^T)_ij Gamma_ij)    T = (I + A)^-1
    w = T Rk    u = T Rv    qg = s q^ exp(G)    kd = k^ exp(G_C - G)    aqk = causal(s q^ k^T Gamma)

and this module maps (dw, du, dqg, dkd, daqk, dG_C) back to (q, k, v, g, beta) by the closed form

    dT = dw Rk^T + du Rv^T      dRk = T^T dw      dRv = T^T du      dA = strict(-T^T dT T^T)
    dbeta = rowsum(dRk exp(G) k^) + rowsum(dRv v) + rowsum(dA (k^ k^T) Gamma)
    dk^ = beta exp(G) dRk + E k^ + E^T k^ + Dq^T q^ + exp(G_C - G) dkd    (E = beta dA Gamma,
    dq^ = s exp(G) dqg + Dq k^                                            Dq = s daqk Gamma)
    dG  = rowsum(dqg qg) + rowsum(dRk Rk) - rowsum(dkd kd) + rows(N) - cols(N) + rows(M) - cols(M)
          (N = dA * A, M = daqk * aqk);  dG_{C-1} += dG_C + sum(dkd kd);  dg = reverse cumsum dG
    dq = (dq^ - q^ (q^ . dq^)) / sqrt(|q|^2 + eps), likewise dk,

instead of differentiating a recompute of the chunk-local map (config.backward = "xla"), which
also recomputes T by blocked inversion and differentiates through it. T itself comes from the
forward's kernel 1 ("fla" body), written once more in the backward: [B, Tp, H, C] fp32, row i of a
chunk's T at time index i. As batched XLA dots (operands in the input dtype, fp32 accumulation)
and fused elementwise work; config.backward = "pallas" runs the same formulas as two Pallas
kernels (pallas_gpu_bwd.py).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from taylorcal_jax.ops.gdn.pallas_gpu import _EPS  # the L2 normalisation's epsilon

F32 = jnp.float32


def chunk_local_backward(
    q, k, v, beta, gcum, tmat, dw, du, dqg, dkd, daqk, dlgc, *, chunk, scale, use_l2, dt
):
    """(dq, dk, dv, dg, dbeta) from the chunk-local cotangents.

    q, k [B, Tp, H, K], v [B, Tp, H, V], beta [B, Tp, H] as given to the op; gcum [B, Tp, H]
    (G = cumsum g within each chunk, fp32); tmat [B, Tp, H, C] (T per chunk, in
    the operand dtype or fp32); dw, dqg, dkd
    [B, Tp, H, K], du [B, Tp, H, V], daqk [B, Tp, H, C] (row i, column j of the chunk), dlgc
    [B, Tp, H] (only each chunk's last entry, the cotangent of G_C, is read). `dt` is the dot
    operand dtype (bf16 for 16-bit inputs; fp32 dots then run at HIGHEST precision).
    """
    b, tp, h, _ = q.shape
    c = chunk
    nt = tp // c
    prec = lax.Precision.HIGHEST if dt == F32 else None

    def ein(spec, x, y):
        return jnp.einsum(
            spec, x.astype(dt), y.astype(dt), precision=prec, preferred_element_type=F32
        )

    # Work per (b, chunk, h) on [C, X] matrices: [B, Tp, H, ...] -> [B, NT, H, C, ...] once, so
    # that every product below is a plain batched matmul (no transposes around each dot).
    def bnh(x):
        return jnp.swapaxes(x.astype(F32).reshape(b, nt, c, h, *x.shape[3:]), 2, 3)

    def back(x):  # [B, NT, H, C, ...] -> [B, Tp, H, ...]
        return jnp.swapaxes(x, 2, 3).reshape(b, tp, h, *x.shape[4:])

    q32, k32, v32 = bnh(q), bnh(k), bnh(v)
    if use_l2:
        rq = lax.rsqrt(jnp.sum(q32 * q32, axis=-1, keepdims=True) + _EPS)
        rk = lax.rsqrt(jnp.sum(k32 * k32, axis=-1, keepdims=True) + _EPS)
        qn, kn = q32 * rq, k32 * rk
    else:
        qn, kn = q32, k32
    be, gg = bnh(beta), bnh(gcum)  # [B,NT,H,C]
    gc = gg[..., -1:]
    eg = jnp.exp(gg)
    edec = jnp.exp(gc - gg)
    t, daqk = bnh(tmat), bnh(daqk)  # [B,NT,H,C,C]
    dw, du, dqg, dkd = (bnh(x) for x in (dw, du, dqg, dkd))

    ri, ci = jnp.arange(c)[:, None], jnp.arange(c)[None, :]
    strict, causal = ri > ci, ri >= ci
    diff = gg[..., :, None] - gg[..., None, :]
    gam_s = jnp.where(strict, jnp.exp(jnp.where(strict, diff, 0.0)), 0.0)
    gam_c = jnp.where(causal, jnp.exp(jnp.where(causal, diff, 0.0)), 0.0)

    rk_ = (be * eg)[..., None] * kn
    rv_ = be[..., None] * v32
    # T and the WY products
    dtm = ein("...ik,...jk->...ij", dw, rk_) + ein("...iv,...jv->...ij", du, rv_)
    drk = ein("...ij,...ik->...jk", t, dw)
    drv = ein("...ij,...iv->...jv", t, du)
    tdt = ein("...ji,...jk->...ik", t, dtm)  # T^T dT
    da = jnp.where(strict, -ein("...ik,...jk->...ij", tdt, t), 0.0)  # -(T^T dT) T^T
    kk = ein("...ik,...jk->...ij", kn, kn)
    da_gam = da * gam_s
    e = be[..., None] * da_gam  # dA / d(k^ k^T)
    n_ = e * kk  # dA * A
    dbeta = (
        jnp.sum(da_gam * kk, axis=-1)
        + jnp.sum(drk * eg[..., None] * kn, axis=-1)
        + jnp.sum(drv * v32, axis=-1)
    )
    dv = drv * be[..., None]
    # the output side: qg and aqk
    qk = ein("...ik,...jk->...ij", qn, kn)
    dq_mat = scale * daqk * gam_c
    m_ = dq_mat * qk  # daqk * aqk
    dqn = scale * eg[..., None] * dqg + ein("...ij,...jk->...ik", dq_mat, kn)
    dkn = (
        (be * eg)[..., None] * drk
        + ein("...ij,...jk->...ik", e, kn)
        + ein("...ji,...jk->...ik", e, kn)
        + ein("...ij,...ik->...jk", dq_mat, qn)
        + edec[..., None] * dkd
    )
    # G: every term above that carries exp(G_i - G_j), exp(G) or exp(G_C - G)
    pkd = jnp.sum(dkd * kn, axis=-1) * edec  # rowsum(dkd kd), [B,NT,H,C]
    nm = n_ + m_
    dgg = (
        scale * jnp.sum(dqg * qn, axis=-1) * eg
        + jnp.sum(drk * rk_, axis=-1)
        - pkd
        + jnp.sum(nm, axis=-1)
        - jnp.sum(nm, axis=-2)
    )
    dgc = bnh(dlgc)[..., -1] + jnp.sum(pkd, axis=-1)  # [B,NT,H]
    dgg = dgg.at[..., -1].add(dgc)
    dg = jnp.flip(jnp.cumsum(jnp.flip(dgg, axis=-1), axis=-1), axis=-1)  # reverse cumsum
    if use_l2:
        dq = (dqn - qn * jnp.sum(qn * dqn, axis=-1, keepdims=True)) * rq
        dk = (dkn - kn * jnp.sum(kn * dkn, axis=-1, keepdims=True)) * rk
    else:
        dq, dk = dqn, dkn
    return back(dq), back(dk), back(dv), back(dg), back(dbeta)
