"""The one entry point for a decoding step of the gated delta rule: picks the implementation.

Letters: B batch, H heads, K key dim, V value dim. Semantics: reference.gated_delta_rule_step
(one token per sequence from a state [B, H, K, V]).

Two entries: `gated_delta_rule_decode_step` takes the step's operands (q, k, v, g, beta);
`decode_step_from_projections` takes a GDN layer's joined products of the token and forms them
first (step_inputs.py), which the Pallas kernel does inside the step (decode_pallas.py).

Implementations (`impl`):
  "xla"     decode_step.decode_step_xla: the step rearranged to read the state twice and write
            it once, as XLA's fused programs; any backend, float32 or float64.
  "pallas"  decode_pallas.decode_step_pallas: the same step as one kernel that reads the state
            once and writes it once in place (Triton on a GPU; interpret mode elsewhere, slow:
            how the tests run it). Imported only when chosen.
  "auto"    "pallas" on a GPU backend when the kernel takes the inputs, else "xla"; the choice
            is logged once per (backend, choice).
The models' default (mixers/gdn.GDNRuntime.decode_impl) is "auto". On one H100 the kernel
equals the XLA form (tests/test_gdn_decode_pallas.py's gpu test, batch 1 and 16), and the
student's whole decode step took 0.96x the time of the same step with the XLA form at 16k and
32k contexts, batch 1 and 16 (Qwen2.5-1.5B shape; launch/results/bench_inference_h100_gdn_step_
{pallas,xla}.md; the teacher, unchanged, moved by 0.98x-1.02x between the two runs).
"""

from __future__ import annotations

import logging

from taylorcal_jax.ops.dispatch import KERNEL_IMPLS, resolve_gpu_kernel
from taylorcal_jax.ops.gdn.decode_step import decode_step_from_projections_xla, decode_step_xla
from taylorcal_jax.ops.gdn.operands import check_step_operands

logger = logging.getLogger(__name__)

IMPLS = KERNEL_IMPLS


def resolve_impl(impl: str, q_bhk=None, v_bhv=None, state_bhkv=None) -> str:
    """ "xla" or "pallas": what `impl` runs as here (dispatch.resolve_gpu_kernel). With the
    inputs given, "auto" also asks whether the kernel takes them."""

    def unsupported():
        from taylorcal_jax.ops.gdn import decode_pallas

        return decode_pallas.unsupported_reason(q_bhk, v_bhv, state_bhkv)

    return resolve_gpu_kernel(
        "GDN decode step", impl, logger, None if q_bhk is None else unsupported
    )


def gated_delta_rule_decode_step(
    q_bhk,
    k_bhk,
    v_bhv,
    g_bh,
    beta_bh,
    state_bhkv,
    *,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    impl: str = "xla",
):
    """One decoding step by `impl` (module docstring): q, k [B, H, K], v [B, H, V], g and beta
    [B, H], the state [B, H, K, V] (operands.check_step_operands: ValueError otherwise).

    Returns (o_bhv in v's dtype, new state [B, H, K, V] in float32, or float64 when any input or
    the state is float64 under "xla")."""
    args = (q_bhk, k_bhk, v_bhv, g_bh, beta_bh, state_bhkv)
    check_step_operands(*args)
    if resolve_impl(impl, q_bhk, v_bhv, state_bhkv) == "pallas":
        from taylorcal_jax.ops.gdn.decode_pallas import decode_step_pallas

        return decode_step_pallas(*args, scale=scale, use_qk_l2norm=use_qk_l2norm)
    return decode_step_xla(*args, scale=scale, use_qk_l2norm=use_qk_l2norm)


def decode_step_from_projections(
    qkv_bc,
    ab_bc,
    A_log_h,
    dt_bias_h,
    valid_b,
    state_bhkv,
    *,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    ab_column: int = 0,
    dtype=None,
    impl: str = "xla",
):
    """One decoding step of a GDN layer from its joined projections of the token, by `impl`:
    qkv_bc [B, 2 H K + H V (+ more, ignored)] = x [Wq | Wk | Wv | ...] in the compute dtype,
    ab_bc [B, ab_column + 2 H (+ more)] holding x [Wa | Wb] from column ab_column on, A_log_h
    and dt_bias_h [H], valid_b [B] bool, the state [B, H, K, V] (H, K, V are read from it); the
    operands are step_inputs.from_projections'. dtype: the compute dtype that q, k and v are
    rounded to first (None: qkv_bc's), so that qkv_bc may be float32 sums, and even the same
    array as ab_bc: one product of all six kernels, one operand, no slices (which XLA would
    form as kernels of their own).

    Returns (o [B, H, V] in `dtype` (or qkv_bc's), new state [B, H, K, V] in float32)."""
    args = (qkv_bc, ab_bc, A_log_h, dt_bias_h, valid_b, state_bhkv)
    layout = dict(ab_column=ab_column, dtype=dtype)  # each implementation reads them as given

    def unsupported():
        from taylorcal_jax.ops.gdn import decode_pallas

        return decode_pallas.unsupported_reason_from_projections(qkv_bc, state_bhkv)

    if resolve_gpu_kernel("GDN decode step", impl, logger, unsupported) == "pallas":
        from taylorcal_jax.ops.gdn.decode_pallas import decode_step_from_projections_pallas

        return decode_step_from_projections_pallas(
            *args, scale=scale, use_qk_l2norm=use_qk_l2norm, **layout
        )
    return decode_step_from_projections_xla(
        *args, scale=scale, use_qk_l2norm=use_qk_l2norm, **layout
    )
