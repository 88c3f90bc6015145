"""The entry points of decoding attention: they check the inputs and pick the implementation.

Letters: B batch, S cache slots, H query heads, Hkv key/value heads, d head dim.
Semantics: reference.py (one query token per sequence, grouped-query, float32 softmax).

Two entries: `decode_attention` attends q to the cache; `append_and_attend` takes the step's
token as the joined q|k|v product gives it (before RoPE), rotates q and k, writes k and v into
the caches at the token's slot and attends, which the Pallas kernel does in one partials kernel
(pallas_append.py). `append_kernel_runs` says where that kernel runs (the models ask).

Implementations (`impl`):
  "xla"     reference.attend_one_query (reference.append_and_attend_xla: the rotations and the
            cache updates as XLA ops first): two batched products over the cache as it lies.
  "pallas"  pallas_gpu.decode_attention_pallas (pallas_append.append_and_attend_pallas): flash
            decoding, compiled by Triton on a GPU and run in interpret mode on other backends
            (slow; how the tests run it). Imported only when chosen.
  "auto"    "pallas" on a GPU backend when the kernel takes the inputs (the kernel module's
            unsupported_reason), else "xla"; the choice is logged once per (backend, choice).
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from taylorcal_jax.ops.decode_attention.reference import append_and_attend_xla, attend_one_query
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


def _resolve_append(impl: str, k_bshd, v_bshd, dtype) -> str:
    """ "xla" or "pallas": what `impl` of append_and_attend runs as here, for caches k, v and a
    joined product in `dtype`."""

    def unsupported():
        from taylorcal_jax.ops.decode_attention import pallas_append

        return pallas_append.unsupported_reason(k_bshd, v_bshd, dtype)

    return resolve_gpu_kernel("decode append attention", impl, logger, unsupported)


def append_kernel_runs(impl: str, k_bshd, v_bshd, dtype) -> bool:
    """Whether append_and_attend by `impl` runs the Pallas kernel here on caches k, v [B, S, Hkv,
    d] and a joined product in `dtype`: `impl` resolves to "pallas" and the kernel takes them
    (pallas_append.unsupported_reason: head dim a power of two >= 16, not float64, caches in
    the product's dtype)."""
    if _resolve_append(impl, k_bshd, v_bshd, dtype) != "pallas":
        return False
    from taylorcal_jax.ops.decode_attention import pallas_append

    # "pallas" asked by name resolves as such whatever the inputs: the kernel must take them too
    return pallas_append.unsupported_reason(k_bshd, v_bshd, dtype) is None


def validate_append_inputs(qkv_bw, cos_bd, sin_bd, k_bshd, v_bshd, start, mask_bs, heads):
    """Raises ValueError saying what is wrong and what is expected."""
    h, hkv = heads
    if k_bshd.ndim != 4:
        raise ValueError(f"k and v must both be [B, S, Hkv, d], got {tuple(k_bshd.shape)}")
    b, _, hkv_cache, d = k_bshd.shape
    if hkv != hkv_cache:
        raise ValueError(f"heads (H, Hkv)={tuple(heads)} but the caches hold Hkv={hkv_cache}")
    validate_inputs(jax.ShapeDtypeStruct((b, 1, h, d), qkv_bw.dtype), k_bshd, v_bshd, mask_bs)
    width = (h + 2 * hkv) * d
    if qkv_bw.shape != (b, width):
        raise ValueError(
            f"the joined q|k|v product must be [B, (H + 2 Hkv) d]={b, width}, got "
            f"{tuple(qkv_bw.shape)}"
        )
    if cos_bd.shape != (b, d) or sin_bd.shape != (b, d):
        raise ValueError(
            f"cos and sin must both be [B, d]={b, d}, got {tuple(cos_bd.shape)}, "
            f"{tuple(sin_bd.shape)}"
        )
    if jnp.shape(start) != () or not jnp.issubdtype(jnp.result_type(start), jnp.integer):
        raise ValueError(f"start must be an integer scalar (the token's slot), got {start!r}")


def append_and_attend(
    qkv_bw, cos_bd, sin_bd, k_bshd, v_bshd, start, mask_bs, dtype, *, heads, impl: str = "auto"
):
    """(context [B, 1, H, d] in `dtype`, new K cache, new V cache) of a decoding step whose
    token's joined product qkv [B, (H + 2 Hkv) d] (q, k, v before RoPE) goes to slot `start`
    (int32 scalar) of the caches K, V [B, S, Hkv, d]: q and k rotated by cos, sin [B, d] of the
    token's position, k and v written at `start`, q attended to the caches where mask [B, S]
    (bool, slot `start` included); heads = (H, Hkv). reference.append_and_attend_xla defines
    it."""
    validate_append_inputs(qkv_bw, cos_bd, sin_bd, k_bshd, v_bshd, start, mask_bs, heads)
    args = (qkv_bw, cos_bd, sin_bd, k_bshd, v_bshd, start, mask_bs, dtype)
    if _resolve_append(impl, k_bshd, v_bshd, qkv_bw.dtype) == "pallas":
        from taylorcal_jax.ops.decode_attention import pallas_append

        return pallas_append.append_and_attend_pallas(*args, heads=heads)
    return append_and_attend_xla(*args, heads=heads)
