"""From a GDN layer's projections of its input to the operands of the gated delta rule.

Letters: B batch, T time (absent for one token), H heads, K key dim, V value dim.

With x a token's input to the layer (flash-linear-attention's GatedDeltaNet, docs/method.md §2):

    q = silu(x Wq), k = silu(x Wk), v = silu(x Wv)              per head [.., H, K|V]
    g = -exp(A_log) softplus(x Wa + dt_bias)                    [.., H], the log decay <= 0
    beta = sigmoid(x Wb)                                        [.., H], the write strength

and where a token is not valid (padding) q, k, v, g and beta are 0, so it neither writes to
nor decays the state. silu is computed in float32 and rounded once to x Wq's dtype (the model's
compute dtype), so XLA and the Pallas step, which computes it per program, round the same
values; g and beta are float32.

The module (models/mixers/gdn.py) applies `activation` and `gates` to its projections (after
the optional short convolution); a decoding step without the convolution takes them inside
the step (decode_api.decode_step_from_projections), from the joined products: `qkv_bc`
[B, 2 H K + H V (+ more)] holds x [Wq | Wk | Wv | ...] and `ab_bc` [B, 2 H] holds x [Wa | Wb]
(or holds them from a given column on: with params joined for decoding both are the one
float32 product of all six kernels, passed twice, q, k and v rounded to the compute dtype
first).
`from_projections` is that step's operands by these definitions; the Pallas step computes the
same per program (decode_pallas.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def activation(x, valid=None):
    """silu(x) computed in float32, in x's dtype; 0 where `valid` (x's shape without its last
    axis) is False."""
    y = jax.nn.silu(x.astype(jnp.float32)).astype(x.dtype)
    return y if valid is None else jnp.where(valid[..., None], y, jnp.zeros_like(y))


def gates(a, b, A_log, dt_bias, valid=None):
    """(g, beta) in float32 from a = x Wa and b = x Wb (module docstring); 0 where `valid`
    (a's shape) is False. A_log and dt_bias broadcast against a's last axis (heads)."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    g = -jnp.exp(A_log.astype(jnp.float32)) * jax.nn.softplus(a + dt_bias.astype(jnp.float32))
    beta = jax.nn.sigmoid(b)
    if valid is not None:
        g, beta = jnp.where(valid, g, 0.0), jnp.where(valid, beta, 0.0)
    return g, beta


def from_projections(qkv_bc, ab_bc, A_log_h, dt_bias_h, valid_b, heads, k_dim, v_dim, *,
                     ab_column=0, dtype=None):  # fmt: skip
    """One token's (q [B, H, K], k [B, H, K], v [B, H, V], g [B, H], beta [B, H]) from the
    joined projections (module docstring); the gate logits are ab_bc's columns ab_column ..
    ab_column + 2 H - 1, and q, k, v are rounded to `dtype` (None: qkv_bc's) before their
    activation, so that one float32 product can serve as both operands."""
    b = qkv_bc.shape[0]
    hk, hv = heads * k_dim, heads * v_dim
    qkv_bc = qkv_bc if dtype is None else qkv_bc.astype(dtype)
    q, k = (qkv_bc[:, i * hk : (i + 1) * hk].reshape(b, heads, k_dim) for i in (0, 1))
    v = qkv_bc[:, 2 * hk : 2 * hk + hv].reshape(b, heads, v_dim)
    q, k, v = (activation(x, valid_b[:, None]) for x in (q, k, v))
    a_bh, b_bh = (ab_bc[:, ab_column + i * heads : ab_column + (i + 1) * heads] for i in (0, 1))
    g, beta = gates(a_bh, b_bh, A_log_h, dt_bias_h, valid_b[:, None])
    return q, k, v, g, beta
