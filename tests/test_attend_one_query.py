"""`layers.attend` with one query row (a decoding step) equals the grouped dense pass.

The single-query form reads K and V in their cache layout through block-diagonal queries
(`layers._attend_one_query`); it must give the dense pass's context for every head grouping
(GQA, MQA, MHA), masked keys (left padding, empty slots, a sliding window) and dtype.
Metric: rel = max|a - b| / max|b|; fp32 1e-6 (same sums up to order), bf16 1e-2 (the
products and the probabilities are rounded to bf16 in both forms, in different places).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from taylorcal_jax.models import layers
from taylorcal_jax.models.layers import MaskSpec


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _case(h, hkv, dtype, window, seed=0):
    b, s, d = 3, 29, 16
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = (2.0 * jax.random.normal(kq, (b, 1, h, d))).astype(dtype)
    k = (2.0 * jax.random.normal(kk, (b, s, hkv, d))).astype(dtype)
    v = jax.random.normal(kv, (b, s, hkv, d)).astype(dtype)
    # row 0: all 29 slots filled, query at the last; row 1: left-padded by 4, query at slot 20,
    # later slots empty; row 2: query at slot 0 (one valid key)
    q_idx = jnp.asarray([[28], [20], [0]], jnp.int32)
    k_idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    valid = (k_idx <= q_idx) & (k_idx >= jnp.asarray([[0], [4], [0]]))
    return q, k, v, MaskSpec(q_idx, k_idx, valid, window)


@pytest.mark.parametrize("h,hkv", [(6, 2), (4, 1), (4, 4)])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_one_query_equals_dense(h, hkv, window, dtype, tol):
    q, k, v, spec = _case(h, hkv, dtype, window)
    mask_b1s = spec.rows(spec.q_index_bt)
    want = layers._attend_dense(q, k, v, mask_b1s, dtype)
    got = layers.attend(q, k, v, spec, dtype)  # T == 1 takes the single-query form
    assert got.shape == want.shape == q.shape and got.dtype == want.dtype
    assert _rel(got, want) <= tol
    # and it is not the dense pass under another name: against a numpy reference
    g = h // hkv
    qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
    kn, vn = np.repeat(kn, g, axis=2), np.repeat(vn, g, axis=2)  # HF repeat_kv
    logits = np.einsum("bhd,bshd->bhs", qn[:, 0], kn) / np.sqrt(q.shape[-1])
    logits = np.where(np.asarray(mask_b1s), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ref = np.einsum("bhs,bshd->bhd", p, vn)[:, None]
    assert _rel(got, ref) <= tol


def test_one_query_does_not_move_the_kv_heads_in_front():
    # The point of the single-query form: no [B, Hkv, S, d] copy of K or V in the compiled
    # step. XLA puts dot batch dimensions in front on every backend, so the grouped form
    # (KV heads as a batch dimension) transposes both; how a backend lays out a dot operand
    # beyond that is its own choice (XLA:CPU also wants the contracted S of V minor).
    q, k, v, spec = _case(6, 2, jnp.float32, None)
    mask = spec.rows(spec.q_index_bt)

    def kv_transposes(fn):
        hlo = jax.jit(fn).lower(q, k, v).compile().as_text()
        # a transposed K or V: [B, Hkv, S, d] = f32[3,2,29,16]
        return hlo.count("f32[3,2,29,16]")

    assert kv_transposes(lambda q, k, v: layers._attend_dense(q, k, v, mask, jnp.float32)) > 0
    assert kv_transposes(lambda q, k, v: layers.attend(q, k, v, spec, jnp.float32)) == 0
