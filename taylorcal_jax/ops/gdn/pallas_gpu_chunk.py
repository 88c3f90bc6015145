"""Alternative bodies of kernel 1 of the Pallas gated delta rule (config.chunk_kernel).

Letters: B batch, T time, H heads, K key dim, V value dim, C chunk length, NS = C / 16 blocks.

"reload": fewer live registers than pallas_gpu._chunk_kernel.

Same outputs and the same arithmetic as pallas_gpu._chunk_kernel (w = T beta exp(G) k,
u = T beta v, G = cumsum g, optionally kd = k exp(G_C - G); T = (I + A)^-1 by 16 x 16 blocks), but
only the dot-operand copies of k (dt) stay live while A and T are built, and each 16-row block of
k and v is reloaded from its Ref (an L1/L2 hit) when w and u are formed, instead of keeping four
fp32 [16, K] blocks of k, beta exp(G) k and beta v in registers for the whole program.

Why: compiled for sm_90 with Triton (outside XLA, same Triton IR), the original kernel uses all
255 registers per thread at 4 warps (two programs per SM) and spills; see
launch/results/gdn_kernel_notes.md. Not yet timed on a GPU, hence not the default.

"fla": flash-linear-attention's layout. A = strict_lower(beta (k k^T) Gamma) as one [C, K] x [K, C]
dot; its NS diagonal 16 x 16 blocks D are inverted together by forward substitution on an
[NS, 16, 16] value (15 steps, all blocks at once) and placed into Td = (I + D)^-1 [C, C] by a
reshape; with L = A - D (strictly block-lower) and N = Td L (nilpotent, N^NS = 0),

    T = (I + A)^-1 = (I + N)^-1 Td = (I - N + N^2 - ...) Td,   by NS - 1 Horner steps X <- Td - N X,

each a full [C, C] x [C, C] dot (exact fp32 for fp32 inputs at config.f32_precision; for 16-bit
inputs at config.t_precision, three bf16 passes by default). Every partial sum X is the inverse of a
block-banded truncation of (I + A), so no power of A is formed on its own (no overflow beyond T's
own magnitude). Then w = T (beta exp(G) k) and u = T (beta v) are two full [C, C] x [C, K|V] dots.
Interpret-checked and compiled for sm_90 outside XLA (launch/gdn_kernel_resources.py); not timed.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

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
    """extra: the kd output if asked for, then (with_t) T itself as fp32 [C, C] rows, which the
    closed-form backward (chunk_local_bwd.py) reads instead of recomputing it."""
    kd_ref = extra[: len(extra) - int(with_t)]
    c = st.chunk
    rc, cc = pg._iota((c, c), 0), pg._iota((c, c), 1)
    g = g_ref[...].astype(F32)
    gg = jnp.sum(jnp.where(cc <= rc, g[None, :], 0.0), axis=1)  # G = cumsum g
    gcum_ref[...] = gg
    beta = beta_ref[...].astype(F32)

    def load_k():
        k = k_ref[...].astype(F32)
        return pg._l2(k) if st.use_l2 else k

    k = load_k()
    if kd_ref:  # k exp(G_C - G) for the split forward's state pass
        kd_ref[0][...] = (k * jnp.exp(jnp.sum(g) - gg)[:, None]).astype(kd_ref[0].dtype)
    strict = rc > cc
    kk = pg._mm(k, k, 1, 1, dt, prec)
    a = jnp.where(
        strict, beta[:, None] * kk * jnp.exp(jnp.where(strict, gg[:, None] - gg[None, :], 0.0)), 0.0
    )
    t = t_inverse_fla(a, t_precision(st, dt))
    if with_t:
        extra[-1][...] = t
    t = t.astype(dt)
    w_ref[...] = pg._mm(t, (beta * jnp.exp(gg))[:, None] * load_k(), 1, 0, dt, prec).astype(
        w_ref.dtype
    )
    u_ref[...] = pg._mm(t, beta[:, None] * v_ref[...].astype(F32), 1, 0, dt, prec).astype(
        u_ref.dtype
    )


def chunk_kernel_reload(
    k_ref, v_ref, g_ref, beta_ref, w_ref, u_ref, gcum_ref, *kd_ref, st, dt, prec
):
    c = st.chunk
    ns = c // 16
    g = g_ref[...].astype(F32)  # [C]
    g_total = jnp.sum(g)
    rc, cc = pg._iota((c, c), 0), pg._iota((c, c), 1)
    gcum_ref[...] = jnp.sum(jnp.where(cc <= rc, g[None, :], 0.0), axis=1)
    r16c, c16c = pg._iota((16, c), 0), pg._iota((16, c), 1)

    def load_k(i):
        k_i = k_ref[pl.ds(16 * i, 16), :].astype(F32)
        return pg._l2(k_i) if st.use_l2 else k_i

    kdt, gs, bs = [], [], []
    for i in range(ns):
        k_i = load_k(i)
        g_i = jnp.sum(jnp.where(c16c <= r16c + 16 * i, g[None, :], 0.0), axis=1)
        gs.append(g_i)
        bs.append(beta_ref[pl.ds(16 * i, 16)].astype(F32))
        kdt.append(k_i.astype(dt))
        if kd_ref:
            kd_ref[0][pl.ds(16 * i, 16), :] = (k_i * jnp.exp(g_total - g_i)[:, None]).astype(
                kd_ref[0].dtype
            )
    a, t = pg._blocked_a_and_inverse(kdt, gs, bs, dt, prec)
    for i in range(ns):
        w_i = u_i = None
        for j in range(i + 1):
            rk = (bs[j] * jnp.exp(gs[j]))[:, None] * load_k(j)
            rv = bs[j][:, None] * v_ref[pl.ds(16 * j, 16), :].astype(F32)
            dw = pg._mm(t[i, j], rk, 1, 0, dt, prec)
            du = pg._mm(t[i, j], rv, 1, 0, dt, prec)
            w_i = dw if w_i is None else w_i + dw
            u_i = du if u_i is None else u_i + du
        w_ref[pl.ds(16 * i, 16), :] = w_i.astype(w_ref.dtype)
        u_ref[pl.ds(16 * i, 16), :] = u_i.astype(u_ref.dtype)
