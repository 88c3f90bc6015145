"""Kernel 1 of the Pallas gated delta rule in flash-linear-attention's layout (chunk_kernel="fla").

Letters: B batch, T time, H heads, K key dim, V value dim, C chunk length, NS = C / 16 blocks.

A = strict_lower(beta (k k^T) Gamma) as one [C, K] x [K, C] dot; its NS diagonal 16 x 16 blocks
D are inverted together by forward substitution on an [NS, 16, 16] value (15 steps, all blocks
at once) and placed into Td = (I + D)^-1 [C, C] by a reshape; with L = A - D (strictly
block-lower) and N = Td L (nilpotent, N^NS = 0),

    T = (I + A)^-1 = (I + N)^-1 Td = (I - N + N^2 - ...) Td,   by NS - 1 Horner steps X <- Td - N X,

each a full [C, C] x [C, C] dot (exact fp32 for fp32 inputs at config.f32_precision; for 16-bit
inputs at config.t_precision, three bf16 passes by default). Every partial sum X is the inverse of a
block-banded truncation of (I + A), so no power of A is formed on its own (no overflow beyond T's
own magnitude). Then w = T (beta exp(G) k) and u = T (beta v) are two full [C, C] x [C, K|V] dots.
Timed on an H100 (launch/results/gdn_kernel_h100_call3.json): 0.75-0.76 ms at 8 x 4096 x 16 x 128
against 1.10 ms for pallas_gpu._chunk_kernel ("keep").
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from taylorcal_jax.ops.gdn import pallas_gpu as pg

F32 = jnp.float32


def t_precision(st, dt):
    """Dot precision of the [C, C] products that build T in the "fla" kernel."""
    if dt == F32 or st.interpret:
        return pg._f32_precision(st)
    return {
        "tf32x3": lax.DotAlgorithmPreset.TF32_TF32_F32_X3,
        "bf16x3": lax.DotAlgorithmPreset.BF16_BF16_F32_X3,
        "tf32": lax.Precision.DEFAULT,
    }[st.cfg.t_precision]


def inv_unit_lower16_batched(a3):
    """(I + a)^-1 for each strictly lower [16, 16] block of a3 [NS, 16, 16], fp32."""
    r, c = pg._iota(a3.shape, 1), pg._iota(a3.shape, 2)
    eye = (r == c).astype(F32)
    t = eye
    for i in range(1, 16):
        a_i = jnp.sum(jnp.where(r == i, a3, 0.0), axis=1)  # [NS, 16]: row i of each block
        row = -jnp.sum(a_i[:, :, None] * t, axis=1)  # -a_i @ t (rows < i of t are final)
        t = jnp.where(r == i, eye + row[:, None, :], t)
    return t


def t_inverse_fla(a, prec_t):
    """T = (I + a)^-1 for a strictly lower-triangular [C, C] fp32 value (see module docstring)."""
    c = a.shape[0]
    ns = c // 16
    shp4 = (ns, 16, ns, 16)
    same = pg._iota(shp4, 0) == pg._iota(shp4, 2)
    d3 = jnp.sum(jnp.where(same, a.reshape(shp4), 0.0), axis=2)  # diagonal blocks [NS, 16, 16]
    t3 = inv_unit_lower16_batched(d3)
    td = jnp.where(same, jnp.broadcast_to(t3[:, :, None, :], shp4), 0.0).reshape(c, c)
    if ns == 1:
        return td
    rb = lax.div(pg._iota((c, c), 0), 16)
    cb = lax.div(pg._iota((c, c), 1), 16)
    n = pg._mm(td, jnp.where(rb > cb, a, 0.0), 1, 0, F32, prec_t)
    x = td
    for _ in range(ns - 1):
        x = td - pg._mm(n, x, 1, 0, F32, prec_t)
    return x


def chunk_kernel_fla(
    k_ref, v_ref, g_ref, beta_ref, w_ref, u_ref, gcum_ref, *extra, st, dt, prec, with_t=False
):
    """extra: the kd output if asked for, then (with_t) T itself as [C, C] rows in the ref's
    dtype, which the closed-form backward reads instead of recomputing it."""
    kd_ref = extra[: len(extra) - int(with_t)]
    c = st.chunk
    rc, cc = pg._iota((c, c), 0), pg._iota((c, c), 1)
    g = g_ref[...].astype(F32)
    gg = jnp.sum(jnp.where(cc <= rc, g[None, :], 0.0), axis=1)  # G = cumsum g
    gcum_ref[...] = gg
    beta = beta_ref[...].astype(F32)
    if st.cfg.norm_after_dot and not kd_ref:
        _fla_body_norm_after_dot(k_ref, v_ref, w_ref, u_ref, gg, beta, extra, st, dt, prec, with_t)
        return

    def load_k():
        k = k_ref[...].astype(F32)
        return pg._l2(k) if st.use_l2 else k

    k = load_k()
    if kd_ref:  # k exp(G_C - G) for the split forward's state pass
        kd_ref[0][...] = (k * jnp.exp(jnp.sum(g) - gg)[:, None]).astype(kd_ref[0].dtype)
    strict = rc > cc
    kk = pg._mm(k, k, 1, 1, dt, prec)
    a = jnp.where(strict, beta[:, None] * kk * pg._gamma(gg, strict), 0.0)
    t = t_inverse_fla(a, t_precision(st, dt)).astype(dt)
    if with_t:
        extra[-1][...] = t.astype(extra[-1].dtype)
    rk = (beta * jnp.exp(gg))[:, None] * load_k()
    w_ref[...] = pg._mm(t, rk, 1, 0, dt, prec).astype(w_ref.dtype)
    u_ref[...] = pg._mm(t, beta[:, None] * v_ref[...].astype(F32), 1, 0, dt, prec).astype(
        u_ref.dtype
    )


def _fla_body_norm_after_dot(k_ref, v_ref, w_ref, u_ref, gg, beta, extra, st, dt, prec, with_t):
    """chunk_kernel_fla's A, T, w, u with k given to the dots as loaded: with r = 1 / |k| per row,
    A = strict_lower(diag(beta r) (k k^T) diag(r) Gamma), w = (T diag(beta exp(G) r)) k and
    u = (T diag(beta)) v, so the scalings act on [C, C] tiles instead of [C, K] fp32 copies of k."""
    c = st.chunk
    rc, cc = pg._iota((c, c), 0), pg._iota((c, c), 1)
    k = k_ref[...]
    r = pg._rnorm(k, st.use_l2)
    strict = rc > cc
    kk = pg._mm(k, k, 1, 1, dt, prec) * (beta * r)[:, None] * r[None, :]
    a = jnp.where(strict, kk * pg._gamma(gg, strict), 0.0)
    t = t_inverse_fla(a, t_precision(st, dt))
    if with_t:
        extra[-1][...] = t.astype(extra[-1].dtype)
    w_ref[...] = pg._mm(t * (beta * jnp.exp(gg) * r)[None, :], k, 1, 0, dt, prec).astype(
        w_ref.dtype
    )
    u_ref[...] = pg._mm(t * beta[None, :], v_ref[...], 1, 0, dt, prec).astype(u_ref.dtype)
