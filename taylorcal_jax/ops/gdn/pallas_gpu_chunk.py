"""Kernel 1 of the Pallas gated delta rule with fewer live registers (config.chunk_kernel="reload").

Letters: B batch, T time, H heads, K key dim, V value dim, C chunk length.

Same outputs and the same arithmetic as pallas_gpu._chunk_kernel (w = T beta exp(G) k,
u = T beta v, G = cumsum g, optionally kd = k exp(G_C - G); T = (I + A)^-1 by 16 x 16 blocks), but
only the dot-operand copies of k (dt) stay live while A and T are built, and each 16-row block of
k and v is reloaded from its Ref (an L1/L2 hit) when w and u are formed, instead of keeping four
fp32 [16, K] blocks of k, beta exp(G) k and beta v in registers for the whole program.

Why: compiled for sm_90 with Triton (outside XLA, same Triton IR), the original kernel uses all
255 registers per thread at 4 warps (two programs per SM) and spills; see
launch/results/gdn_kernel_notes.md. Not yet timed on a GPU, hence not the default.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from taylorcal_jax.ops.gdn import pallas_gpu as pg

F32 = jnp.float32


def chunk_kernel_reload(k_ref, v_ref, g_ref, beta_ref, w_ref, u_ref, gcum_ref, *kd_ref, st, dt,
                        prec):
    c = st.chunk
    ns = c // 16
    g = g_ref[...].astype(F32)  # [C]
    g_total = jnp.sum(g)
    rc, cc = pg._iota((c, c), 0), pg._iota((c, c), 1)
    gcum_ref[...] = jnp.sum(jnp.where(cc <= rc, g[None, :], 0.0), axis=1)
    r16c, c16c = pg._iota((16, c), 0), pg._iota((16, c), 1)
    r16, c16 = pg._iota((16, 16), 0), pg._iota((16, 16), 1)

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
                kd_ref[0].dtype)
    hp = lax.Precision.HIGHEST
    a, t = {}, {}
    for i in range(ns):
        for j in range(i + 1):
            kk = pg._mm(kdt[i], kdt[j], 1, 1, dt, prec)
            diff = gs[i][:, None] - gs[j][None, :]
            if i == j:
                low = r16 > c16
                a[i, j] = jnp.where(low, bs[i][:, None] * kk * jnp.exp(jnp.where(low, diff, 0.0)),
                                    0.0)
            else:
                a[i, j] = bs[i][:, None] * kk * jnp.exp(diff)
    for i in range(ns):
        t[i, i] = pg._inv_unit_lower16(a[i, i])
        for j in range(i - 1, -1, -1):
            acc = pg._mm(a[i, j], t[j, j], 1, 0, F32, hp)
            for m in range(j + 1, i):
                acc = acc + pg._mm(a[i, m], t[m, j], 1, 0, F32, hp)
            t[i, j] = -pg._mm(t[i, i], acc, 1, 0, F32, hp)
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
