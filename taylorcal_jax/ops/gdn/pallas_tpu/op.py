"""The TPU Pallas gated delta rule as one differentiable op (custom_vjp): the public entry.

Letters: B batch, T time (Tp padded to a multiple of C), H heads, BH = B * H, K key dim,
V value dim, C chunk length.

Same semantics as reference.gated_delta_rule_reference. Inputs [B, T, H, .] are laid out as
[BH, Tp, .] (heads outermost, so that a chunk of one head is a [C, K] tile) and T is padded
with q = k = v = 0, g = 0, beta = 0, which leave the state unchanged. G = cumsum g within each
chunk is formed in XLA (cumsum does not lower in Mosaic).

Forward: forward.forward_call (one Pallas kernel; S in VMEM). Backward, partly Pallas: the
chunk-local map (local.py) runs in XLA and is differentiated by jax.vjp; the sequential part
is the Pallas reverse kernel (reverse.py). h and v' come from the forward (residuals "states")
or from running the forward kernel again (residuals "inputs"; its o is then computed and
dropped). Numerics: bf16 inputs give bf16 dot operands with fp32 accumulation; G, A, T, w, u
and S stay fp32; float32 inputs give exact fp32 dots (HIGHEST).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from taylorcal_jax.ops.gdn.call_options import Static, call_options
from taylorcal_jax.ops.gdn.operands import check_operands, operand_dtype
from taylorcal_jax.ops.gdn.pallas_tpu.common import F32
from taylorcal_jax.ops.gdn.pallas_tpu.config import CHUNK_SIZES, TPUConfig, resolve_residuals
from taylorcal_jax.ops.gdn.pallas_tpu.forward import forward_call
from taylorcal_jax.ops.gdn.pallas_tpu.local import chunk_cumsum, chunk_local_map
from taylorcal_jax.ops.gdn.pallas_tpu.reverse import reverse_call


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _gdn(q, k, v, g, beta, s0, st: Static):
    return tuple(forward_call(q, k, v, chunk_cumsum(g, st.chunk), beta, s0, st))


def _gdn_fwd(q, k, v, g, beta, s0, st):
    keep = st.residuals == "states"
    outs = forward_call(q, k, v, chunk_cumsum(g, st.chunk), beta, s0, st, with_states=keep)
    return tuple(outs[:2]), (q, k, v, g, beta, s0, *outs[2:])


def _gdn_bwd(st: Static, res, cts):
    q, k, v, g, beta, s0, *kept = res
    do, ds_final = cts
    dt = operand_dtype(q, k, v)
    gcum = chunk_cumsum(g, st.chunk)
    if kept:
        h, vp = kept
    else:
        h, vp = forward_call(q, k, v, gcum, beta, s0, st, with_states=True)[2:]
    local = functools.partial(
        chunk_local_map, chunk=st.chunk, scale=st.scale, use_l2=st.use_l2, dt=dt
    )
    (w, u, qg, kd, aqk, g_last), vjp = jax.vjp(local, q, k, v, g, beta)
    du, dw, dqg, dkd, daqk, dd, ds0 = reverse_call(
        do.astype(dt), qg, kd, w, aqk, h, vp, gcum, ds_final.astype(F32), st, dt
    )
    d_g_last = dd * jnp.exp(g_last)  # d/dG_C of exp(G_C)
    grads = vjp(tuple(x.astype(dt) for x in (dw, du, dqg, dkd, daqk)) + (d_g_last,))
    return (*grads, None if s0 is None else ds0.astype(s0.dtype))


_gdn.defvjp(_gdn_fwd, _gdn_bwd)


def unsupported_reason(
    q_bthk, k_bthk, v_bthv, chunk_size, config: TPUConfig | None = None, residuals="auto"
):
    """Why the TPU kernels cannot take these inputs or these residuals (api.py's "auto" asks,
    and then runs the chunked op), or None."""
    if q_bthk.shape[1] == 0:
        return "an empty sequence (T = 0)"
    try:
        resolve_residuals(residuals)
    except ValueError as e:
        return str(e)
    if chunk_size not in CHUNK_SIZES:
        return f"chunk_size must be one of {CHUNK_SIZES} for the TPU kernels, got {chunk_size}"
    if any(x.dtype == jnp.float64 for x in (q_bthk, k_bthk, v_bthv)):
        return "float64 inputs (the kernels compute in float32)"
    if q_bthk.shape[-1] % 8:
        # the chunk states [BH, NT * K, V] are stored in blocks of K rows, and Mosaic takes a
        # block's second-to-last dimension in multiples of 8 only
        return f"head dim K must be a multiple of 8 for the TPU kernels, got {q_bthk.shape[-1]}"
    try:
        (config or TPUConfig()).value_block(v_bthv.shape[-1])
    except ValueError as e:
        return str(e)
    return None


def _heads_outer(x, tp):
    """[B, T, H, ...] -> [B*H, Tp, ...], zero-padded in time."""
    pad = [(0, 0), (0, tp - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
    x = jnp.moveaxis(jnp.pad(x, pad), 2, 1)
    return x.reshape((x.shape[0] * x.shape[1], tp) + x.shape[3:])


def gated_delta_rule_pallas_tpu(
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
    interpret: bool = False,
    config: TPUConfig | None = None,
    residuals: str = "auto",
):
    """Gated delta rule by TPU Pallas kernels; returns (o_bthv in v's dtype, final state fp32
    or None). interpret=True runs the kernels in the TPU interpreter (CPU tests). residuals
    (config.RESIDUALS or "auto") is what the forward under differentiation keeps. Differentiable
    (custom_vjp) in all float inputs and the initial state."""
    inputs = (q_bthk, k_bthk, v_bthv, g_bth, beta_bth)
    b, t, h, kdim, vdim = check_operands(*inputs, initial_state_bhkv, chunk_size)
    config = config or TPUConfig()
    reason = unsupported_reason(q_bthk, k_bthk, v_bthv, chunk_size, config)
    if reason:
        raise ValueError(f"{reason}; use impl='chunked' for such inputs")
    st = call_options(
        chunk_size=chunk_size,
        kdim=kdim,
        scale=scale,
        use_qk_l2norm=use_qk_l2norm,
        interpret=interpret,
        config=config,
        residuals=resolve_residuals(residuals),
    )
    s0 = None
    if initial_state_bhkv is not None:
        s0 = initial_state_bhkv.astype(F32).reshape(b * h, kdim, vdim)
    tp = -(-t // chunk_size) * chunk_size
    q, k, v = (_heads_outer(x, tp) for x in (q_bthk, k_bthk, v_bthv))
    g, beta = _heads_outer(g_bth.astype(F32), tp), _heads_outer(beta_bth, tp)
    o, s_final = _gdn(q, k, v, g, beta, s0, st)
    o = jnp.moveaxis(o.reshape(b, h, tp, vdim), 1, 2)[:, :t]
    return o, (s_final.reshape(b, h, kdim, vdim) if output_final_state else None)
