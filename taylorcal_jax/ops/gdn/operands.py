"""Operand checks shared by the kernel entries of the gated delta rule (GPU and TPU Pallas).

Letters: B batch, T time, H heads, K key dim, V value dim.
"""

from __future__ import annotations

import jax.numpy as jnp


def check_shapes(q_bthk, k_bthk, v_bthv, g_bth, beta_bth) -> tuple[int, int, int, int, int]:
    """(B, T, H, K, V) of q, k [B,T,H,K], v [B,T,H,V] and g, beta [B,T,H]; ValueError else."""
    if q_bthk.ndim != 4 or k_bthk.shape != q_bthk.shape or v_bthv.shape[:3] != q_bthk.shape[:3]:
        raise ValueError(
            f"expected q, k [B,T,H,K] and v [B,T,H,V]; got {q_bthk.shape}, "
            f"{k_bthk.shape}, {v_bthv.shape}"
        )
    b, t, h, kdim = q_bthk.shape
    if g_bth.shape != (b, t, h) or beta_bth.shape != (b, t, h):
        raise ValueError(
            f"g and beta must be [B,T,H]={b, t, h}; got {g_bth.shape}, {beta_bth.shape}"
        )
    return b, t, h, kdim, v_bthv.shape[-1]


def operand_dtype(*xs):
    """bf16 when every array is bf16, else fp32: the dtype of the kernels' dot operands."""
    return jnp.bfloat16 if all(x.dtype == jnp.bfloat16 for x in xs) else jnp.float32
