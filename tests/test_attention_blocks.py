"""Query-blocked softmax attention (`layers.attend` with T > block) equals the dense pass.

Metric: rel = max|a - b| / max|b| (fp32); 1e-6 for `attend` itself, 1e-5 through a whole model.
The memory check compares XLA's compiled temp bytes of the dense and blocked forms.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import windowed_qwen2_config

from taylorcal_jax.models import layers
from taylorcal_jax.models.layers import MaskSpec, attend, attention_mask
from taylorcal_jax.models.teacher import Transformer, init_cache, init_params

DENSE = 1 << 30  # a block no T reaches: the dense path


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _qkv(t, s, h, hkv, d, seed=0):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = 2.0 * jax.random.normal(kq, (2, t, h, d))
    k = 2.0 * jax.random.normal(kk, (2, s, hkv, d))
    v = jax.random.normal(kv, (2, s, hkv, d))
    return q, k, v


def _spec(t, window, pad=(0, 5)):
    """Self-attention mask inputs for a batch of 2 with left padding `pad` per row."""
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (2, t))
    valid = idx >= jnp.asarray(pad)[:, None]
    return MaskSpec(idx, idx, valid, window)


@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("t,block", [(37, 8), (37, 36), (16, 8)])
def test_blocked_equals_dense(t, block, window):
    # T not a multiple of the block (37), one short last block (36), exact multiple (16);
    # GQA groups of 2; row 1 left-padded by 5 (its first queries see no valid key at all).
    q, k, v = _qkv(t, t, 4, 2, 8)
    spec = _spec(t, window)
    want = attend(q, k, v, spec, jnp.float32, block=DENSE)
    got = attend(q, k, v, spec, jnp.float32, block=block)
    assert got.shape == want.shape
    assert _rel(got, want) <= 1e-6
    # a precomputed [B, T, S] mask takes the same blocked path
    got_arr = attend(q, k, v, spec.rows(spec.q_index_bt), jnp.float32, block=block)
    assert _rel(got_arr, want) <= 1e-6


def test_blocked_cache_slots_equal_dense():
    # queries at cache slots [start, start + T) against S > T slots, some of them still empty
    t, s, start, window = 21, 40, 6, 9
    q, k, v = _qkv(t, s, 6, 2, 8, seed=1)
    q_idx = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (2, t))
    k_idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (2, s))
    k_valid = (k_idx < start + t) & (k_idx >= jnp.asarray([0, 3])[:, None])
    spec = MaskSpec(q_idx, k_idx, k_valid, window)
    want = attend(q, k, v, attention_mask(q_idx, k_idx, k_valid, window), jnp.float32)
    assert _rel(attend(q, k, v, spec, jnp.float32, block=5), want) <= 1e-6


def test_blocked_gradients_equal_dense():
    t = 11
    q, k, v = _qkv(t, t, 4, 2, 8, seed=2)
    w = jax.random.normal(jax.random.PRNGKey(3), (2, t, 4, 8))
    spec = _spec(t, 4, pad=(2, 0))

    def loss(block):
        return lambda q, k, v: jnp.sum(w * attend(q, k, v, spec, jnp.float32, block=block))

    want = jax.grad(loss(DENSE), argnums=(0, 1, 2))(q, k, v)
    got = jax.grad(loss(4), argnums=(0, 1, 2))(q, k, v)
    for g, wt in zip(got, want, strict=True):
        assert _rel(g, wt) <= 1e-6


def _config():
    return windowed_qwen2_config()


def test_model_blocked_prefill_then_decode(monkeypatch):
    # whole teacher with a 4-row block: the full forward (T = 19) and a 9-token prefill into a
    # KV cache take the blocked path; the decode steps (T = 1) the dense one.
    config, t, prefill = _config(), 19, 9
    params = init_params(config, jax.random.PRNGKey(0))
    model = Transformer(config)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 96, size=(3, t)))
    valid = np.ones((3, t), bool)
    valid[1, :3] = False
    valid[2, :6] = False
    valid = jnp.asarray(valid)

    def fresh():  # a new function each time: jax caches traces by function identity
        def full(x, m):
            return model.apply({"params": params}, x, valid_bt=m)[0]

        return full

    def step(x, m, cache):
        logits, cache, _ = model.apply({"params": params}, x, valid_bt=m, cache=cache)
        return logits, cache

    def traced_loops():
        return str(jax.make_jaxpr(fresh())(tokens, valid)).count("scan[")

    dense = np.asarray(jax.jit(fresh())(tokens, valid))
    assert traced_loops() == 0
    monkeypatch.setattr(layers, "ATTEND_BLOCK", 4)  # read when the functions below are traced
    assert traced_loops() == 2  # one lax.map over query blocks per attention layer
    blocked = np.asarray(jax.jit(fresh())(tokens, valid))
    ok = np.asarray(valid)
    assert _rel(blocked[ok], dense[ok]) <= 1e-5

    step = jax.jit(step)
    cache = init_cache(model, batch=3, max_len=t + 2, dtype=jnp.float32)
    logits, cache = step(tokens[:, :prefill], valid[:, :prefill], cache)
    outs = [logits]
    for s in range(prefill, t):
        logits, cache = step(tokens[:, s : s + 1], valid[:, s : s + 1], cache)
        outs.append(logits)
    cached = np.concatenate([np.asarray(o) for o in outs], axis=1)
    assert _rel(cached[ok], dense[ok]) <= 1e-5


def test_blocked_temp_memory_is_linear_in_t():
    # Self-attention (S = T), 4 heads, block 256, at T = 2048 and 4096: the dense form's temp
    # memory grows 4x (its [B,H,T,S] logits: 64 MiB, then 256 MiB), the blocked form's 2x (a few
    # [B,H,block,S] buffers), forward and backward alike. Compiled only, never run.
    b, h, hkv, d, block = 1, 4, 2, 16, 256

    def temp_bytes(t, blk, grad):
        def f(q, k, v, valid):
            idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            return attend(q, k, v, MaskSpec(idx, idx, valid, None), jnp.float32, block=blk)

        if grad:
            f = jax.grad(lambda *a, f=f: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2))
        q = jax.ShapeDtypeStruct((b, t, h, d), jnp.float32)
        kv = jax.ShapeDtypeStruct((b, t, hkv, d), jnp.float32)
        valid = jax.ShapeDtypeStruct((b, t), jnp.bool_)
        stats = jax.jit(f).lower(q, kv, kv, valid).compile().memory_analysis()
        if stats is None:
            pytest.skip("compiled memory_analysis() returned None on this jax/backend")
        return stats.temp_size_in_bytes

    for grad in (False, True):
        dense = [temp_bytes(t, DENSE, grad) for t in (2048, 4096)]
        blocked = [temp_bytes(t, block, grad) for t in (2048, 4096)]
        print(f"grad={grad} T=2048,4096 block={block}: dense {dense} B, blocked {blocked} B")
        for t, dn, bl in zip((2048, 4096), dense, blocked, strict=True):
            assert dn >= b * h * t * t * 4  # the measure sees the dense logits
            assert bl <= 6 * b * h * block * t * 4  # a few block x S buffers, nothing T x S
        assert dense[1] >= 3.5 * dense[0]
        assert blocked[1] <= 2.2 * blocked[0]
