"""Blockwise attention statistics vs a dense reference that materialises P; teacher pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from taylorcal_jax.calibrate.stats import attention_stats_sequence, dense_attention_stats


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


@pytest.mark.parametrize("window,block", [(None, 8), (7, 16)])
def test_blockwise_equals_dense_gqa_window_padding(window, block):
    t, h, hkv, d = 37, 4, 2, 8  # T not a multiple of the block, GQA groups of 2
    kq, kk = jax.random.split(jax.random.PRNGKey(0))
    q = 2.0 * jax.random.normal(kq, (t, h, d))
    k = 2.0 * jax.random.normal(kk, (t, hkv, d))
    valid = jnp.arange(t) >= 5  # left padding
    got = attention_stats_sequence(q, k, valid, scale=d**-0.5, window=window, block_size=block)
    want = dense_attention_stats(q, k, valid, scale=d**-0.5, window=window)
    for g, w in zip(got, want, strict=True):
        assert _rel(g, w) <= 1e-5
    assert float(got[2]) == 32.0  # valid queries counted once
    # with values: the same pass returns the attention context (flash attention)
    from taylorcal_jax.models.layers import attend, attention_mask

    v = jax.random.normal(jax.random.PRNGKey(7), (t, hkv, d))
    res = attention_stats_sequence(
        q, k, valid, scale=d**-0.5, window=window, block_size=block, v_tkd=v
    )
    idx = jnp.arange(t)[None]
    mask = attention_mask(idx, idx, valid[None], window)
    want_ctx = attend(q[None], k[None], v[None], mask, jnp.float32)[0]
    assert _rel(res[3][5:], want_ctx[5:]) <= 1e-5
    np.testing.assert_array_equal(res[3][:5], 0.0)  # padding queries see no key


def test_known_answers_uniform_and_window_one():
    # q = 0: uniform attention over the i + 1 visible keys: D_i = (0.5 + sum_{m=1..i} m)/(i+1),
    # E_i = log(i + 1).
    t, d = 12, 4
    q = jnp.zeros((t, 2, d))
    k = jax.random.normal(jax.random.PRNGKey(1), (t, 1, d))
    valid = jnp.ones((t,), bool)
    dsum, esum, cnt = attention_stats_sequence(q, k, valid, scale=0.5, block_size=5)
    i = np.arange(t)
    want_d = np.sum((0.5 + i * (i + 1) / 2) / (i + 1))
    want_e = np.sum(np.log(i + 1))
    assert _rel(dsum, [want_d, want_d]) <= 1e-5
    assert _rel(esum, [want_e, want_e]) <= 1e-5
    # window 1: every query sees only itself -> distance 0.5, entropy 0.
    dsum, esum, _ = attention_stats_sequence(q, k, valid, scale=0.5, window=1, block_size=5)
    np.testing.assert_allclose(dsum, 0.5 * t, rtol=1e-6)
    np.testing.assert_allclose(esum, 0.0, atol=1e-5)


def test_large_logits_are_stable():
    t, d = 40, 8
    q = 30.0 * jax.random.normal(jax.random.PRNGKey(2), (t, 2, d))
    k = 30.0 * jax.random.normal(jax.random.PRNGKey(3), (t, 2, d))
    valid = jnp.ones((t,), bool)
    got = attention_stats_sequence(q, k, valid, scale=d**-0.5, block_size=8)
    want = dense_attention_stats(q, k, valid, scale=d**-0.5)
    assert all(np.all(np.isfinite(g)) for g in got)
    assert _rel(got[0], want[0]) <= 1e-5
    # entropies are ~1e-17 here (one key dominates): compare absolutely
    np.testing.assert_allclose(got[1], want[1], atol=1e-6)


def _tiny_teacher(model_type="mistral", window=5):
    from tiny_models import tiny_model_config

    from taylorcal_jax.models.teacher import Transformer, init_params

    cfg = tiny_model_config(model_type=model_type, vocab_size=50, sliding_windows=(window, None))
    return cfg, Transformer(cfg), init_params(cfg, jax.random.PRNGKey(0))


def test_collect_matches_dense_on_teacher_with_window_and_padding():
    from taylorcal_jax.calibrate.stats import collect
    from taylorcal_jax.models.layers import attention_qkv

    cfg, model, params = _tiny_teacher()
    n, t = 3, 13
    tokens = jax.random.randint(jax.random.PRNGKey(1), (n, t), 0, cfg.vocab_size)
    valid = jnp.arange(t)[None, :] >= jnp.array([0, 4, 2])[:, None]
    st = collect(
        model,
        params,
        cfg,
        tokens,
        valid_nt=valid,
        block_size=4,
        sequences_per_batch=2,
        teacher_pass="model",
    )
    assert st.layers == (0, 1)
    # the O(T)-memory teacher pass (context from the blockwise kernel) gives the same numbers
    # on valid tokens; layers in any order
    bw = collect(model, params, cfg, tokens, valid_nt=valid, layers=(1, 0), block_size=4)
    m = np.asarray(valid)
    for row, layer in enumerate((1, 0)):
        for field in ("x_lntd", "context_lnthd", "attn_out_lntd"):
            got = np.asarray(getattr(bw, field)[row])[m]
            want = np.asarray(getattr(st, field)[layer])[m]
            assert _rel(got, want) <= 1e-5, field
        assert _rel(bw.distance_lh[row], st.distance_lh[layer]) <= 1e-5
        assert _rel(bw.entropy_lh[row], st.entropy_lh[layer]) <= 1e-5
    _, _, inter = model.apply({"params": params}, tokens, valid_bt=valid, return_intermediates=True)
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    for row, layer in enumerate(st.layers):
        x = inter[f"layers_{layer}"]["attn_in"]
        np.testing.assert_allclose(st.x_lntd[row], x, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            st.attn_out_lntd[row], inter[f"layers_{layer}"]["attn_out"], rtol=1e-5, atol=1e-6
        )
        q, k, _ = attention_qkv(params[f"layers_{layer}"]["self_attn"], cfg, x, positions)
        sums = [
            dense_attention_stats(
                q[i], k[i], valid[i], scale=cfg.head_dim**-0.5, window=cfg.sliding_windows[layer]
            )
            for i in range(n)
        ]
        cnt = sum(float(s[2]) for s in sums)
        want_d = sum(np.asarray(s[0]) for s in sums) / cnt
        want_e = sum(np.asarray(s[1]) for s in sums) / cnt
        assert _rel(st.distance_lh[row], want_d) <= 1e-5
        assert _rel(st.entropy_lh[row], want_e) <= 1e-5
    assert np.all(np.asarray(st.distance_lh) >= 0.5)
    # layer 0 (window 5) looks back less far on average than the full layer can
    assert float(np.max(st.distance_lh[0])) <= 4.0


def test_collect_refuses_inputs_it_would_misread():
    """A valid mask of another shape, a block of 0 and ids outside the vocabulary (which embed
    as NaN: every statistic NaN) are refused in one line, before any work."""
    from taylorcal_jax.calibrate.stats import collect

    cfg, model, params = _tiny_teacher()
    tokens = jnp.ones((2, 9), jnp.int32)
    for kw, match in [
        (dict(valid_nt=jnp.ones((2, 8), bool)), r"valid_nt shape \(2, 8\) != tokens shape"),
        (dict(block_size=0), "block_size must be >= 1"),
        (dict(tokens_nt=tokens.at[1, 3].set(cfg.vocab_size)), "token ids must be in"),
        (dict(tokens_nt=tokens.at[0, 0].set(-1)), "token ids must be in"),
    ]:
        kw = {"tokens_nt": tokens, **kw}
        with pytest.raises(ValueError, match=match):
            collect(model, params, cfg, kw.pop("tokens_nt"), **kw)
