"""The Pallas gated delta rule as one differentiable op (custom_vjp): the public entry.

Letters: B batch, T time (Tp padded to a multiple of C), H heads, K key dim, V value dim,
C chunk length.

Same semantics as reference.gated_delta_rule_reference. The forward is forward.forward, the
backward backward.backward, each by the kernel path of the configuration (config.py; by default
the operand dtype's). T is padded to a multiple of C with q = k = v = 0, g = 0, beta = 0, which
leave the state unchanged. Without an initial state the sequential kernels start from zero (no
zeros array is made or read). Numerics: bf16 inputs give bf16 dot operands with fp32
accumulation; G, A, T and the state S stay in fp32; float32 inputs give exact fp32 dots.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from taylorcal_jax.ops.gdn.call_options import Static, call_options
from taylorcal_jax.ops.gdn.operands import check_operands, operand_dtype
from taylorcal_jax.ops.gdn.pallas_gpu.backward import backward
from taylorcal_jax.ops.gdn.pallas_gpu.common import F32
from taylorcal_jax.ops.gdn.pallas_gpu.config import (
    GDNPallasConfig,
    default_config,
    resolve_residuals,
)
from taylorcal_jax.ops.gdn.pallas_gpu.forward import forward


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _gdn(q, k, v, g, beta, s0, st: Static):
    return forward(q, k, v, g, beta, s0, st)[0]


def _gdn_fwd(q, k, v, g, beta, s0, st):
    out, kept = forward(q, k, v, g, beta, s0, st, keep=st.residuals != "inputs")
    return out, (q, k, v, g, beta, s0) + (kept or ())


_gdn.defvjp(_gdn_fwd, backward)


def unsupported_reason(q_bthk, k_bthk, v_bthv, chunk_size, residuals="auto") -> str | None:
    """Why the Pallas kernels cannot take these inputs, or these residuals on the path the
    operand dtype picks (api.py's "auto" asks, and then runs the chunked op), or None."""
    if q_bthk.shape[1] == 0:
        return "an empty sequence (T = 0)"
    if chunk_size not in (16, 32, 64):
        return f"chunk_size must be 16, 32 or 64 for the Pallas kernels, got {chunk_size}"
    for name, d in (("K", q_bthk.shape[-1]), ("V", v_bthv.shape[-1])):
        if d < 16 or d & (d - 1):
            return f"{name}={d} must be a power of two >= 16 for the Pallas kernels"
    if any(x.dtype == jnp.float64 for x in (q_bthk, k_bthk, v_bthv)):
        return "float64 inputs (the kernels compute in float32)"
    config = default_config(
        operand_dtype(q_bthk, k_bthk, v_bthv), q_bthk.shape[-1], v_bthv.shape[-1]
    )
    try:
        resolve_residuals(config, residuals)
    except ValueError as e:
        return str(e)
    return None


def gated_delta_rule_pallas(
    q_bthk,
    k_bthk,
    v_bthv,
    g_bth,
    beta_bth,
    *,
    initial_state_bhkv=None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    interpret: bool | None = False,
    config: GDNPallasConfig | None = None,
    residuals: str = "auto",
):
    """Gated delta rule by Pallas kernels; returns (o_bthv in v's dtype, final state fp32 or None).

    interpret=None picks interpret mode on CPU backends. config=None picks the kernel path of
    the operand dtype and its launch options for the head dims (config.default_config: bf16
    when q, k and v all are; four backward warps at K, V <= 64); the float32 path
    takes float32 operands only, the bfloat16 path either. residuals (config.RESIDUALS, or "auto"
    = the path's default) is what the forward run under differentiation keeps for the backward.
    Differentiable (custom_vjp) in all float inputs and the initial state.
    """
    inputs = (q_bthk, k_bthk, v_bthv, g_bth, beta_bth)
    b, t, h, kdim, vd = check_operands(*inputs, initial_state_bhkv, chunk_size)
    reason = unsupported_reason(q_bthk, k_bthk, v_bthv, chunk_size)
    if reason:
        raise ValueError(f"{reason}; use impl='chunked' for such inputs")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    dt = operand_dtype(q_bthk, k_bthk, v_bthv)
    if config is None:
        config = default_config(dt, kdim, vd)
    elif config.path == "float32" and dt != F32:
        raise ValueError(
            "the float32 kernel path takes float32 operands; bfloat16 q, k, v take BF16Config "
            "(config=None picks by dtype)"
        )
    st = call_options(
        chunk_size=chunk_size,
        kdim=kdim,
        scale=scale,
        use_qk_l2norm=use_qk_l2norm,
        interpret=interpret,
        config=config,
        residuals=resolve_residuals(config, residuals),
    )
    # without an initial state the kernels start from zero: no zeros array to fill and read
    s0 = None if initial_state_bhkv is None else initial_state_bhkv.astype(F32)
    pad = (-t) % chunk_size
    q, k, v, g, beta = q_bthk, k_bthk, v_bthv, g_bth.astype(F32), beta_bth
    if pad:
        p4 = ((0, 0), (0, pad), (0, 0), (0, 0))
        q, k, v = (jnp.pad(x, p4) for x in (q, k, v))
        g, beta = (jnp.pad(x, p4[:3]) for x in (g, beta))
    o, s_final = _gdn(q, k, v, g, beta, s0, st)
    if pad:
        o = o[:, :t]
    return o, (s_final if output_final_state else None)
