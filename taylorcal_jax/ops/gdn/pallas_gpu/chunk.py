"""Kernel 1 of the Pallas gated delta rule: the chunk-local WY form, one program per chunk.

Letters: B batch, T time (Tp padded to a multiple of C), H heads, K key dim, V value dim,
C chunk length, NS = C / 16 blocks.

Per (b, h) and chunk, with k L2-normalised, G = cumsum g within the chunk and Gamma_ij =
exp(G_i - G_j) (i >= j only):

    A = strict_lower(beta_i (k_i . k_j) Gamma_ij)      T = (I + A)^-1
    w = T (beta exp(G) k)      u = T (beta v)      kd = k exp(G_C - G)

Grid NT x B x H; inputs stay in [B, T, H, D] layout (B and H squeezed by the BlockSpecs). Writes
w, u (operand dtype), G (fp32), and on request kd and T (operand dtype). Two bodies, one per
kernel path (config.py):

  float32 path, `_blocked_kernel`: A and T by 16 x 16 blocks; the diagonal blocks of T by
    forward substitution, T_ij = -T_ii sum_{m=j}^{i-1} A_im T_mj by small exact dots; w and u
    block-row by block-row.
  bfloat16 path, `_fla_kernel` (flash-linear-attention's layout): A as one [C, K] x [K, C] dot;
    its NS diagonal 16 x 16 blocks D inverted together by forward substitution on an
    [NS, 16, 16] value and placed into Td = (I + D)^-1 [C, C] by a reshape; with L = A - D
    (strictly block-lower) and N = Td L (nilpotent, N^NS = 0),

        T = (I + A)^-1 = (I + N)^-1 Td = (I - N + N^2 - ...) Td,  by NS - 1 steps X <- Td - N X,

    each a full [C, C] x [C, C] dot (t_precision). Every partial sum X is the inverse of a
    block-banded truncation of (I + A), so no power of A is formed on its own (no overflow
    beyond T's own magnitude). Then w and u as two full [C, C] x [C, K|V] dots. Where kd is not
    written (the state pass forms it), the body gives k to its dots as loaded and applies the
    norms to the results (`_fla_norm_after_dot`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from taylorcal_jax.ops.gdn.call_options import Static
from taylorcal_jax.ops.gdn.pallas_gpu.common import (
    F32,
    gamma,
    iota,
    launch,
    rnorm,
)
from taylorcal_jax.ops.gdn.reference import l2_normalize
from taylorcal_jax.ops.pallas_dot import mm

# ----------------------------------------------------------------------------- float32 path


def _inv_unit_lower16(a):
    """(I + a)^-1 for a strictly lower-triangular [16, 16] fp32 block, by forward substitution."""
    r, c = iota((16, 16), 0), iota((16, 16), 1)
    eye = (r == c).astype(F32)
    t = eye
    for i in range(1, 16):
        a_i = jnp.sum(jnp.where(r == i, a, 0.0), axis=0)  # row i of a
        row = -jnp.sum(a_i[:, None] * t, axis=0)  # -a_i @ t (rows < i of t are final)
        t = jnp.where(r == i, eye + row[None, :], t)
    return t


def _blocked_a_and_inverse(ks, gs, bs, dt):
    """A and T = (I + A)^-1 of one chunk by 16 x 16 blocks, as dicts keyed (i, j), j <= i.

    A_ij = strict_lower(beta_i (k_i k_j^T) exp(G_i - G_j)) (masked before the exp on the
    diagonal blocks); T_ii by forward substitution, then T_ij = -T_ii sum_{m=j}^{i-1} A_im T_mj.
    ks, gs, bs: per 16-row block, k [16, K], cumulative G [16] and beta [16].
    """
    ns = len(ks)
    r16, c16 = iota((16, 16), 0), iota((16, 16), 1)
    a, t = {}, {}
    for i in range(ns):
        for j in range(i + 1):
            kk = mm(ks[i], ks[j], 1, 1, dt)
            diff = gs[i][:, None] - gs[j][None, :]
            if i == j:
                low = r16 > c16
                a[i, j] = jnp.where(
                    low, bs[i][:, None] * kk * jnp.exp(jnp.where(low, diff, 0.0)), 0.0
                )
            else:
                a[i, j] = bs[i][:, None] * kk * jnp.exp(diff)
    for i in range(ns):
        t[i, i] = _inv_unit_lower16(a[i, i])
        for j in range(i - 1, -1, -1):
            acc = mm(a[i, j], t[j, j], 1, 0, F32)
            for m in range(j + 1, i):
                acc = acc + mm(a[i, m], t[m, j], 1, 0, F32)
            t[i, j] = -mm(t[i, i], acc, 1, 0, F32)
    return a, t


def _blocked_kernel(k_ref, v_ref, g_ref, beta_ref, w_ref, u_ref, gcum_ref, *kd_ref, st, dt):
    c = st.chunk
    ns = c // 16
    g = g_ref[...].astype(F32)  # [C]
    g_total = jnp.sum(g)
    rc, cc = iota((c, c), 0), iota((c, c), 1)
    gcum_ref[...] = jnp.sum(jnp.where(cc <= rc, g[None, :], 0.0), axis=1)
    r16c, c16c = iota((16, c), 0), iota((16, c), 1)
    ks, gs, bs, rks, rvs = [], [], [], [], []
    for i in range(ns):
        rows = pl.ds(16 * i, 16)
        k_i = k_ref[rows, :].astype(F32)
        if st.use_l2:
            k_i = l2_normalize(k_i)
        g_i = jnp.sum(jnp.where(c16c <= r16c + 16 * i, g[None, :], 0.0), axis=1)  # G rows
        b_i = beta_ref[rows].astype(F32)
        v_i = v_ref[rows, :].astype(F32)
        ks.append(k_i)
        gs.append(g_i)
        bs.append(b_i)
        rks.append((b_i * jnp.exp(g_i))[:, None] * k_i)
        rvs.append(b_i[:, None] * v_i)
        if kd_ref:  # k exp(G_C - G) for the state pass
            kd_ref[0][rows, :] = (k_i * jnp.exp(g_total - g_i)[:, None]).astype(kd_ref[0].dtype)
    _, t = _blocked_a_and_inverse(ks, gs, bs, dt)
    for i in range(ns):
        w_i = mm(t[i, 0], rks[0], 1, 0, dt)
        u_i = mm(t[i, 0], rvs[0], 1, 0, dt)
        for j in range(1, i + 1):
            w_i = w_i + mm(t[i, j], rks[j], 1, 0, dt)
            u_i = u_i + mm(t[i, j], rvs[j], 1, 0, dt)
        w_ref[pl.ds(16 * i, 16), :] = w_i.astype(w_ref.dtype)
        u_ref[pl.ds(16 * i, 16), :] = u_i.astype(u_ref.dtype)


# ----------------------------------------------------------------------------- bfloat16 path


def t_precision(st: Static, dt):
    """Precision of the [C, C] fp32 products that build T in `_fla_kernel`: one TF32 pass for
    16-bit operands (its error is about that of the bf16 rounding T gets before the w and u
    dots anyway; docs/kernel.md), exact for fp32 operands and in interpret mode."""
    if dt == F32 or st.interpret:
        return lax.Precision.HIGHEST
    return lax.Precision.DEFAULT


def inv_unit_lower16_batched(a3):
    """(I + a)^-1 for each strictly lower [16, 16] block of a3 [NS, 16, 16], fp32."""
    r, c = iota(a3.shape, 1), iota(a3.shape, 2)
    eye = (r == c).astype(F32)
    t = eye
    for i in range(1, 16):
        a_i = jnp.sum(jnp.where(r == i, a3, 0.0), axis=1)  # [NS, 16]: row i of each block
        row = -jnp.sum(a_i[:, :, None] * t, axis=1)  # -a_i @ t (rows < i of t are final)
        t = jnp.where(r == i, eye + row[:, None, :], t)
    return t


def t_inverse(a, prec_t):
    """T = (I + a)^-1 for a strictly lower-triangular [C, C] fp32 value (module docstring)."""
    c = a.shape[0]
    ns = c // 16
    shp4 = (ns, 16, ns, 16)
    same = iota(shp4, 0) == iota(shp4, 2)
    d3 = jnp.sum(jnp.where(same, a.reshape(shp4), 0.0), axis=2)  # diagonal blocks [NS, 16, 16]
    t3 = inv_unit_lower16_batched(d3)
    td = jnp.where(same, jnp.broadcast_to(t3[:, :, None, :], shp4), 0.0).reshape(c, c)
    if ns == 1:
        return td
    sixteen = jnp.int32(16)  # iota's dtype, also where 64-bit mode makes Python ints int64
    rb = lax.div(iota((c, c), 0), sixteen)
    cb = lax.div(iota((c, c), 1), sixteen)
    n = mm(td, jnp.where(rb > cb, a, 0.0), 1, 0, F32, prec_t)
    x = td
    for _ in range(ns - 1):
        x = td - mm(n, x, 1, 0, F32, prec_t)
    return x


def _fla_kernel(k_ref, v_ref, g_ref, beta_ref, w_ref, u_ref, gcum_ref, *extra, st, dt, with_t):
    """extra: the kd output if asked for, then (with_t) T itself as [C, C] rows in the ref's
    dtype, which the backward reads instead of inverting again."""
    kd_ref = extra[: len(extra) - int(with_t)]
    c = st.chunk
    rc, cc = iota((c, c), 0), iota((c, c), 1)
    g = g_ref[...].astype(F32)
    gg = jnp.sum(jnp.where(cc <= rc, g[None, :], 0.0), axis=1)  # G = cumsum g
    gcum_ref[...] = gg
    beta = beta_ref[...].astype(F32)
    if not kd_ref:
        _fla_norm_after_dot(k_ref, v_ref, w_ref, u_ref, gg, beta, extra, st, dt, with_t)
        return

    def load_k():
        k = k_ref[...].astype(F32)
        return l2_normalize(k) if st.use_l2 else k

    k = load_k()
    kd_ref[0][...] = (k * jnp.exp(jnp.sum(g) - gg)[:, None]).astype(kd_ref[0].dtype)
    strict = rc > cc
    kk = mm(k, k, 1, 1, dt)
    a = jnp.where(strict, beta[:, None] * kk * gamma(gg, strict), 0.0)
    t = t_inverse(a, t_precision(st, dt)).astype(dt)
    if with_t:
        extra[-1][...] = t.astype(extra[-1].dtype)
    rk = (beta * jnp.exp(gg))[:, None] * load_k()
    w_ref[...] = mm(t, rk, 1, 0, dt).astype(w_ref.dtype)
    u_ref[...] = mm(t, beta[:, None] * v_ref[...].astype(F32), 1, 0, dt).astype(u_ref.dtype)


def _fla_norm_after_dot(k_ref, v_ref, w_ref, u_ref, gg, beta, extra, st, dt, with_t):
    """_fla_kernel's A, T, w, u with k given to the dots as loaded: with r = 1 / |k| per row,
    A = strict_lower(diag(beta r) (k k^T) diag(r) Gamma), w = (T diag(beta exp(G) r)) k and
    u = (T diag(beta)) v, so the scalings act on [C, C] tiles instead of [C, K] fp32 copies of k.
    (Writing kd from this body as well would keep more state live; the kd-writing body above
    normalises k first.)"""
    c = st.chunk
    rc, cc = iota((c, c), 0), iota((c, c), 1)
    k = k_ref[...]
    r = rnorm(k, st.use_l2)
    strict = rc > cc
    kk = mm(k, k, 1, 1, dt) * (beta * r)[:, None] * r[None, :]
    a = jnp.where(strict, kk * gamma(gg, strict), 0.0)
    t = t_inverse(a, t_precision(st, dt))
    if with_t:
        extra[-1][...] = t.astype(extra[-1].dtype)
    w_ref[...] = mm(t * (beta * jnp.exp(gg) * r)[None, :], k, 1, 0, dt).astype(w_ref.dtype)
    u_ref[...] = mm(t * beta[None, :], v_ref[...], 1, 0, dt).astype(u_ref.dtype)


# ----------------------------------------------------------------------------- call


def chunk_call(k, v, g, beta, st: Static, dt, with_kd=False, with_t=False):
    """(w, u, gcum[, kd][, T]), all [B, Tp, H, *]. T only on the bfloat16 path, in dt: the
    forward rounds T to dt before its w and u dots, and every backward use of T is a dot operand
    in dt, so the rounding loses nothing that is used (fp32 operands keep fp32 T)."""
    b, tp, h, kd = k.shape
    vd = v.shape[-1]
    c = st.chunk
    nt = tp // c
    idx4 = lambda i, bb, hh: (bb, i, hh, 0)  # noqa: E731
    idx3 = lambda i, bb, hh: (bb, i, hh)  # noqa: E731
    if st.cfg.path == "bfloat16":
        kern = functools.partial(_fla_kernel, st=st, dt=dt, with_t=with_t)
    elif with_t:
        raise ValueError("T is written only by the bfloat16 path's kernel 1")
    else:
        kern = functools.partial(_blocked_kernel, st=st, dt=dt)
    extra_spec = [pl.BlockSpec((None, c, None, kd), idx4)] if with_kd else []
    extra_shape = [jax.ShapeDtypeStruct((b, tp, h, kd), dt)] if with_kd else []
    if with_t:
        extra_spec.append(pl.BlockSpec((None, c, None, c), idx4))
        extra_shape.append(jax.ShapeDtypeStruct((b, tp, h, c), dt))
    return pl.pallas_call(
        kern,
        grid=(nt, b, h),
        in_specs=[
            pl.BlockSpec((None, c, None, kd), idx4),
            pl.BlockSpec((None, c, None, vd), idx4),
            pl.BlockSpec((None, c, None), idx3),
            pl.BlockSpec((None, c, None), idx3),
        ],
        out_specs=[
            pl.BlockSpec((None, c, None, kd), idx4),
            pl.BlockSpec((None, c, None, vd), idx4),
            pl.BlockSpec((None, c, None), idx3),
        ]
        + extra_spec,
        out_shape=[
            jax.ShapeDtypeStruct((b, tp, h, kd), dt),
            jax.ShapeDtypeStruct((b, tp, h, vd), dt),
            jax.ShapeDtypeStruct((b, tp, h), F32),
        ]
        + extra_shape,
        interpret=st.interpret,
        **launch("gdn_chunk", st, st.cfg.warps, dt),
    )(k, v, g, beta)
