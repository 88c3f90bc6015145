"""The one entry point for decoding attention: checks the inputs and picks the implementation.

Letters: B batch, S cache slots, H query heads, Hkv key/value heads, d head dim.
Semantics: reference.py (one query token per sequence, grouped-query, float32 softmax).

Implementations (`impl`):
  "xla"     reference.attend_one_query: two batched products over the cache as it lies.
  "pallas"  pallas_gpu.decode_attention_pallas: flash decoding, compiled by Triton on a GPU and
            run in interpret mode on other backends (slow; how the tests run it). Imported only
            when chosen.
  "auto"    "pallas" on a GPU backend when the kernel takes the inputs
            (pallas_gpu.unsupported_reason), else "xla"; the choice is logged once per
            (backend, choice).
"""

from __future__ import annotations

import logging

import jax.numpy as jnp

from taylorcal_jax.ops.decode_attention.reference import attend_one_query
from taylorcal_jax.ops.dispatch import KERNEL_IMPLS, resolve_gpu_kernel

logger = logging.getLogger(__name__)

IMPLS = KERNEL_IMPLS


def resolve_impl(impl: str, q_b1hd=None, k_bshd=None) -> str:
    """ "xla" or "pallas": what `impl` runs as here (dispatch.resolve_gpu_kernel). With the
    inputs given, "auto" also asks whether the kernel takes them."""

    def unsupported():
        from taylorcal_jax.ops.decode_attention import pallas_gpu

        return pallas_gpu.unsupported_reason(q_b1hd, k_bshd)

    return resolve_gpu_kernel(
        "decode attention", impl, logger, None if q_b1hd is None else unsupported
    )


def validate_inputs(q_b1hd, k_bshd, v_bshd, mask_bs) -> None:
    """Raises ValueError saying what is wrong and what is expected."""
    if q_b1hd.ndim != 4 or q_b1hd.shape[1] != 1:
        raise ValueError(f"q must be [B, 1, H, d] (one query token), got {tuple(q_b1hd.shape)}")
    b, _, h, d = q_b1hd.shape
    if k_bshd.ndim != 4 or v_bshd.shape != k_bshd.shape:
        raise ValueError(
            f"k and v must both be [B, S, Hkv, d], got {tuple(k_bshd.shape)}, {tuple(v_bshd.shape)}"
        )
    _, s, hkv, dk = k_bshd.shape
    if k_bshd.shape[0] != b or dk != d:
        raise ValueError(
            f"k [B, S, Hkv, d] must match q's B={b} and d={d}, got {tuple(k_bshd.shape)}"
        )
    if h % hkv:
        raise ValueError(f"query heads H={h} must be a multiple of the KV heads Hkv={hkv}")
    if mask_bs.shape != (b, s) or mask_bs.dtype != jnp.bool_:
        raise ValueError(
            f"mask must be bool [B, S]={b, s}, got {mask_bs.dtype}{list(mask_bs.shape)}"
        )


def decode_attention(q_b1hd, k_bshd, v_bshd, mask_bs, dtype, *, impl: str = "auto"):
    """context [B, 1, H, d] in `dtype`: q [B, 1, H, d] against the cache K, V [B, S, Hkv, d]
    where mask [B, S] (bool: slot s is a key this query sees); softmax in float32."""
    validate_inputs(q_b1hd, k_bshd, v_bshd, mask_bs)
    if resolve_impl(impl, q_b1hd, k_bshd) == "pallas":
        # imported here: the model code needs no Pallas unless a step runs the kernel
        from taylorcal_jax.ops.decode_attention import pallas_gpu

        return pallas_gpu.decode_attention_pallas(q_b1hd, k_bshd, v_bshd, mask_bs, dtype)
    return attend_one_query(q_b1hd, k_bshd, v_bshd, mask_bs, dtype)
