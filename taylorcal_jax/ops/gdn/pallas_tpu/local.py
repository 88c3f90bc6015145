"""The chunk-local map of the gated delta rule in XLA: what the backward differentiates by jax.vjp.

Letters: BH batch * heads, Tp time padded to a multiple of C, K key dim, V value dim,
C chunk length, NT = Tp / C.

The sequential part of the rule reads the inputs only through

    (q, k, v, g, beta) -> (w, u, qg = s q exp(G), kd = k exp(G_C - G),
                           aqk = s causal Gamma q k^T, G_C)

(forward.py has the definitions), all chunk-parallel. The backward's reverse kernel
(reverse.py) gives the cotangents of these outputs; jax.vjp of this map takes them back to the
inputs. The Pallas forward kernel forms the same quantities in VMEM.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from taylorcal_jax.ops.gdn.chunked import unit_lower_inverse
from taylorcal_jax.ops.gdn.pallas_tpu.common import F32
from taylorcal_jax.ops.gdn.reference import l2_normalize


def chunk_cumsum(g, c):
    """G = cumsum of g within each chunk of C tokens ([BH, Tp] fp32)."""
    bh, tp = g.shape
    return jnp.cumsum(g.astype(F32).reshape(bh, tp // c, c), axis=-1).reshape(bh, tp)


def chunk_local_map(q, k, v, g, beta, *, chunk: int, scale: float, use_l2: bool, dt):
    """(w, u, qg, kd, aqk) [BH, Tp, K | V | K | K | C] in dt and G_C [BH, NT] fp32."""
    bh, tp, kdim = q.shape
    c = chunk
    nt = tp // c
    prec = lax.Precision.HIGHEST if dt == F32 else None

    def dot(spec, x, y):
        return jnp.einsum(
            spec, x.astype(dt), y.astype(dt), precision=prec, preferred_element_type=F32
        )

    q, k, v = (x.astype(F32).reshape(bh, nt, c, x.shape[-1]) for x in (q, k, v))
    if use_l2:
        q, k = l2_normalize(q), l2_normalize(k)
    gg = chunk_cumsum(g, c).reshape(bh, nt, c)
    be = beta.astype(F32).reshape(bh, nt, c)
    g_last = gg[..., -1]
    row, col = jnp.arange(c)[:, None], jnp.arange(c)[None, :]
    causal, strict = row >= col, row > col
    gamma = jnp.exp(jnp.where(causal, gg[..., :, None] - gg[..., None, :], 0.0))
    a = jnp.where(strict, be[..., :, None] * dot("...ik,...jk->...ij", k, k) * gamma, 0.0)
    t = unit_lower_inverse(a)  # fp32, exact blocked inversion
    # T's products take fp32 operands at HIGHEST whatever dt is, as in the forward kernel.
    highest = lax.Precision.HIGHEST
    w = jnp.einsum("...ij,...jk->...ik", t, (be * jnp.exp(gg))[..., None] * k, precision=highest)
    u = jnp.einsum("...ij,...jv->...iv", t, be[..., None] * v, precision=highest)
    qg = scale * q * jnp.exp(gg)[..., None]
    kd = k * jnp.exp(g_last[..., None] - gg)[..., None]
    aqk = jnp.where(causal, scale * dot("...ik,...jk->...ij", q, k) * gamma, 0.0)
    outs = (w, u, qg, kd, aqk)
    return tuple(x.reshape(bh, tp, x.shape[-1]).astype(dt) for x in outs) + (g_last,)
