"""One decoding step of the gated delta rule that reads the state once and writes it once.

Letters: B batch, H heads, K key dim, V value dim.

`reference.gated_delta_rule_step` follows the definition: decay S, read S^T k, write the
correction, read S'^T q from the new state. Each of those is a pass over the [B, H, K, V]
float32 state, which at decoding time is the largest thing a GDN layer touches after its
weights (12.6 MB per layer at B = 16, H = 12, K = V = 128). With a = exp(g):

    r_k = S^T k,  r_q = S^T q                (one contraction of the old state with [k, q])
    c   = beta (v - a r_k)                   (the correction)
    S'  = a S + k c^T                        (one elementwise pass: read S, write S')
    o   = s S'^T q = s (a r_q + (k . q) c)   (no read of S')

so XLA's form (`decode_step_xla`) reads S twice (contraction, update) and writes it once, in
two fused programs, and equals the definition in exact arithmetic (tests/test_gdn_decode_step.py
holds it to the float64 definition within 1e-5 in float32).

The models call it through decode_api.py, which also offers the same step as one Pallas kernel
(decode_pallas.py). `decode_step_from_projections_xla` is the step of a GDN layer from its
joined projections of the token (step_inputs.py: silu, gates and the padding mask first).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from taylorcal_jax.ops.gdn import step_inputs
from taylorcal_jax.ops.gdn.reference import step_operands

_HIGHEST = jax.lax.Precision.HIGHEST  # true float32 dots on a GPU (no TF32)


def decode_step_xla(
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
    """`reference.gated_delta_rule_step`, rearranged as in the module docstring.

    Returns (o_bhv in v's dtype, new state [B, H, K, V] in float32, or float64 when any input or
    the state is float64)."""
    q, k, v, g, beta, state, scale = step_operands(
        q_bhk, k_bhk, v_bhv, g_bh, beta_bh, state_bhkv, scale, use_qk_l2norm
    )
    decay_bh = jnp.exp(g)
    reads_bh2v = jnp.einsum("bhkv,bhkn->bhnv", state, jnp.stack([k, q], -1), precision=_HIGHEST)
    correction_bhv = beta[..., None] * (v - decay_bh[..., None] * reads_bh2v[:, :, 0])
    kq_bh = jnp.sum(k * q, axis=-1)
    o_bhv = scale * (decay_bh[..., None] * reads_bh2v[:, :, 1] + kq_bh[..., None] * correction_bhv)
    new_state = decay_bh[..., None, None] * state + k[..., :, None] * correction_bhv[..., None, :]
    return o_bhv.astype(v_bhv.dtype), new_state


def decode_step_from_projections_xla(
    qkv_bc, ab_bc, A_log_h, dt_bias_h, valid_b, state_bhkv, *, scale=None, use_qk_l2norm=True,
    ab_column=0, dtype=None,
):  # fmt: skip
    """`decode_step_xla` of the operands `step_inputs.from_projections` makes: qkv_bc
    [B, 2 H K + H V (+ more)] = x [Wq | Wk | Wv | ...], ab_bc [B, ab_column + 2 H (+ more)]
    holding x [Wa | Wb] from column ab_column on, valid_b [B] bool, q, k, v rounded to `dtype`
    (None: qkv_bc's); H, K, V from the state [B, H, K, V]. o is in `dtype` (or qkv_bc's)."""
    _, h, kd, vd = state_bhkv.shape
    operands = step_inputs.from_projections(qkv_bc, ab_bc, A_log_h, dt_bias_h, valid_b, h, kd, vd,
                                            ab_column=ab_column, dtype=dtype)  # fmt: skip
    return decode_step_xla(*operands, state_bhkv, scale=scale, use_qk_l2norm=use_qk_l2norm)
