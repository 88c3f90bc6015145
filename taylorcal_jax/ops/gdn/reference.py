"""Per-token gated delta rule: the definition every faster implementation is tested against.

Letters: B batch, T time, H heads, K key dim, V value dim.

For each (batch, head), with q_t, k_t L2-normalised (eps 1e-6) and s = K^-1/2:

    S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T      S: [K, V]
    o_t = s * S_t^T q_t

i.e. decay the state, read the current prediction for k_t, and write a beta_t-weighted
correction. Semantics match flash-linear-attention's
`chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)`.
Arithmetic runs in float32 (float64 when the inputs are float64 and x64 is enabled).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def l2_normalize(x, eps: float = 1e-6):
    """x / sqrt(sum(x^2) + eps) over the last axis (flash-linear-attention's convention)."""
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def compute_dtype(*arrays):
    """float64 if any input is float64, else float32."""
    return jnp.float64 if any(a.dtype == jnp.float64 for a in arrays) else jnp.float32


def gated_delta_rule_reference(
    q_bthk,
    k_bthk,
    v_bthv,
    g_bth,
    beta_bth,
    *,
    initial_state_bhkv=None,
    output_final_state: bool = False,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
):
    """Returns (o_bthv in v's dtype, final state [B, H, K, V] in float32/64 or None)."""
    cdt = compute_dtype(q_bthk, k_bthk, v_bthv, g_bth, beta_bth)
    b, t, h, kdim = q_bthk.shape
    vdim = v_bthv.shape[-1]
    scale = kdim**-0.5 if scale is None else scale
    q, k, v = (x.astype(cdt) for x in (q_bthk, k_bthk, v_bthv))
    if use_qk_l2norm:
        q, k = l2_normalize(q), l2_normalize(k)
    g, beta = g_bth.astype(cdt), beta_bth.astype(cdt)
    if initial_state_bhkv is None:
        state = jnp.zeros((b, h, kdim, vdim), cdt)
    else:
        state = initial_state_bhkv.astype(cdt)

    def step(state_bhkv, inputs):
        q_t, k_t, v_t, g_t, beta_t = inputs  # [B,H,K], [B,H,K], [B,H,V], [B,H], [B,H]
        state_bhkv = state_bhkv * jnp.exp(g_t)[..., None, None]
        prediction = jnp.einsum("bhkv,bhk->bhv", state_bhkv, k_t)
        correction = beta_t[..., None] * (v_t - prediction)
        state_bhkv = state_bhkv + k_t[..., :, None] * correction[..., None, :]
        o_t = jnp.einsum("bhkv,bhk->bhv", state_bhkv, q_t) * scale
        return state_bhkv, o_t

    time_major = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, g, beta))
    state, o_tbhv = jax.lax.scan(step, state, time_major)
    o = jnp.moveaxis(o_tbhv, 0, 1).astype(v_bthv.dtype)
    return o, (state if output_final_state else None)
