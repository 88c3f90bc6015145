"""Per-token gated delta rule: the definition every faster implementation is tested against.

Letters: B batch, T time, H heads, K key dim, V value dim.

For each (batch, head), with q_t, k_t L2-normalised (eps 1e-6) and s = K^-1/2:

    S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T      S: [K, V]
    o_t = s * S_t^T q_t

(the prediction S^T k_t reads the already-decayed state, as in flash-linear-attention).

i.e. decay the state, read the current prediction for k_t, and write a beta_t-weighted
correction. Semantics match flash-linear-attention's
`chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)`.
Arithmetic runs in float32 (float64 when the inputs are float64 and x64 is enabled).
`gated_delta_rule_step` is one token; the scan only repeats it. The models decode through
decode_api.py: the same step rearranged to pass over the state fewer times (decode_step.py), or
as one Pallas kernel (decode_pallas.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# True float32 (not TF32) dots on GPU; a no-op on CPU.
_HIGHEST = jax.lax.Precision.HIGHEST
L2_EPS = 1e-6  # in the L2 normalisation of q and k, as flash-linear-attention's


def l2_normalize(x, eps: float = L2_EPS):
    """x / sqrt(sum(x^2) + eps) over the last axis (flash-linear-attention's convention)."""
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def compute_dtype(*arrays):
    """float64 if any input is float64, else float32 (bf16/fp16 inputs accumulate in fp32)."""
    return jnp.float64 if any(a.dtype == jnp.float64 for a in arrays) else jnp.float32


def step_operands(q_bhk, k_bhk, v_bhv, g_bh, beta_bh, state_bhkv, scale, use_qk_l2norm):
    """One token's operands in the compute dtype (`compute_dtype`): (q, k, v, g, beta, state,
    scale), q and k L2-normalised when asked, scale K^-1/2 unless given."""
    cdt = compute_dtype(q_bhk, k_bhk, v_bhv, g_bh, beta_bh, state_bhkv)
    scale = q_bhk.shape[-1] ** -0.5 if scale is None else scale
    q, k, v, g, beta, state = (
        x.astype(cdt) for x in (q_bhk, k_bhk, v_bhv, g_bh, beta_bh, state_bhkv)
    )
    if use_qk_l2norm:
        q, k = l2_normalize(q), l2_normalize(k)
    return q, k, v, g, beta, state, scale


def gated_delta_rule_step(
    q_bhk,
    k_bhk,
    v_bhv,
    g_bh,
    beta_bh,
    state_bhkv,
    *,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
):
    """One token of the gated delta rule: the definition (O(1) per token, for decoding).

    Decay the state, read the current prediction for k_t, write a beta_t-weighted correction,
    read out with q_t:

        S   <- exp(g_t) S
        S   <- S + beta_t k_t (v_t - S^T k_t)^T
        o_t  = s * S^T q_t

    Returns (o_bhv in v's dtype, new state [B, H, K, V] in float32, or float64 when any input or
    the state is float64).
    """
    q, k, v, g, beta, state, scale = step_operands(
        q_bhk, k_bhk, v_bhv, g_bh, beta_bh, state_bhkv, scale, use_qk_l2norm
    )
    state = state * jnp.exp(g)[..., None, None]
    prediction_bhv = jnp.einsum("bhkv,bhk->bhv", state, k, precision=_HIGHEST)
    correction_bhv = beta[..., None] * (v - prediction_bhv)
    state = state + k[..., :, None] * correction_bhv[..., None, :]
    o_bhv = jnp.einsum("bhkv,bhk->bhv", state, q, precision=_HIGHEST) * scale
    return o_bhv.astype(v_bhv.dtype), state


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
    """`gated_delta_rule_step` scanned over time.

    Returns (o_bthv in v's dtype, final state [B, H, K, V] in float32/64, or None).
    """
    inputs = (q_bthk, k_bthk, v_bthv, g_bth, beta_bth)
    if initial_state_bhkv is not None:
        inputs = inputs + (initial_state_bhkv,)
    cdt = compute_dtype(*inputs)
    b, _, h, kdim = q_bthk.shape
    vdim = v_bthv.shape[-1]
    if initial_state_bhkv is None:
        state = jnp.zeros((b, h, kdim, vdim), cdt)
    else:
        state = initial_state_bhkv.astype(cdt)

    def step(state_bhkv, inputs_t):
        q_t, k_t, v_t, g_t, beta_t = inputs_t  # [B,H,K], [B,H,K], [B,H,V], [B,H], [B,H]
        o_t, state_bhkv = gated_delta_rule_step(
            q_t, k_t, v_t, g_t, beta_t, state_bhkv, scale=scale, use_qk_l2norm=use_qk_l2norm
        )
        return state_bhkv, o_t

    # Cast once up front so every step (and the carry) runs in the compute dtype.
    time_major = tuple(
        jnp.moveaxis(x.astype(cdt), 1, 0) for x in (q_bthk, k_bthk, v_bthv, g_bth, beta_bth)
    )
    state, o_tbhv = jax.lax.scan(step, state, time_major)
    o = jnp.moveaxis(o_tbhv, 0, 1).astype(v_bthv.dtype)
    return o, (state if output_final_state else None)
