"""Decoding attention in XLA: one query token per sequence against a KV cache read in place.

Letters: B batch, S cache slots, H query heads, Hkv key/value heads, G = H / Hkv, d head dim.
Query head h uses key/value head h // G (HF's `repeat_kv`).

    logits[b, h, s] = q[b, h] . K[b, s, h // G] / sqrt(d)          (float32)
    P[b, h, :]      = softmax_s(logits[b, h, :] where mask[b, s], else -1e30)
    context[b, h]   = sum_s P[b, h, s] V[b, s, h // G]

A row with no valid slot gets the average of V over all S slots (every logit equal), as the
dense softmax with a finite mask value gives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG = -1e30  # large finite negative for masked logits (fully masked rows stay finite)


def attend_one_query(q_b1hd, k_bshd, v_bshd, mask_bs, dtype):
    """context [B, 1, H, d] in `dtype` (module docstring), reading K and V as they lie in the cache.

    As dot operands with the KV heads as a batch dimension, K and V would be transposed to
    [B, Hkv, S, d] first (XLA puts dot batch dimensions in front): a copy of the whole cache in
    every layer and step. Here the KV head j and the head dim e of K and V [B, S, Hkv, d] are
    both contracted or both kept, with only B as a batch dimension, and query head h is placed
    in its KV head's block, zeros elsewhere: q_bd[b, h, j, e] = q[b, h, e] if j == h // G else 0,
    so that

        logits[b, h, s] = sum_{j,e} q_bd[b, h, j, e] K[b, s, j, e] = q[b, h] . K[b, s, h // G]
        context[b, h] = (sum_s P[b, h, s] V[b, s, j, :]) at j = h // G

    two batched matrix products over [B, S, Hkv*d] (a free reshape of the cache); Hkv times
    the multiply-adds of the grouped form, which a decoding step, bound by memory, does not
    notice. The probabilities go to the second product in `dtype`.
    """
    b, _, h, d = q_b1hd.shape
    hkv = k_bshd.shape[2]
    own_block_hj = (jnp.arange(h)[:, None] // (h // hkv)) == jnp.arange(hkv)[None, :]
    q_bd = q_b1hd[:, 0, :, None, :] * own_block_hj[None, :, :, None].astype(q_b1hd.dtype)
    logits = jnp.einsum("bhje,bsje->bhs", q_bd, k_bshd, preferred_element_type=jnp.float32)
    logits = logits.astype(jnp.float32) * (d**-0.5)
    logits = jnp.where(mask_bs[:, None, :], logits, NEG)  # broadcast over the heads
    probs = jax.nn.softmax(logits, axis=-1)
    ctx_all = jnp.einsum("bhs,bsje->bhje", probs.astype(dtype), v_bshd.astype(dtype))
    own = own_block_hj[None, :, :, None].astype(ctx_all.dtype)
    ctx = jnp.sum(ctx_all * own, axis=2)  # one nonzero term: exact
    return ctx.reshape(b, 1, h, d)
