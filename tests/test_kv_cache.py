"""KV-cache decoding equals the full forward (fp32), with left padding and sliding windows; the
attention layers share one slot record, written once per call.

Metric: rel_err = max|a - b| / max|b| over valid positions; tolerance 1e-5.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxpr_testing import equations
from tiny_models import tiny_model_config

from taylorcal_jax.models.layers import SLOTS
from taylorcal_jax.models.student import StudentConfig
from taylorcal_jax.models.teacher import Transformer, init_cache, init_params

T = 14


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _config(**kw):
    base = dict(
        model_type="qwen3",
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        head_dim=16,
        qk_norm=True,
    )
    return tiny_model_config(**{**base, **kw})


CONFIGS = {
    "qwen3_full": _config(),
    # layer 0 full attention, layer 1 window 4 (shorter than the sequence)
    "mixed_window": _config(
        model_type="qwen2", attention_bias=True, qk_norm=False, sliding_windows=(None, 4)
    ),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def setup(request):
    config = CONFIGS[request.param]
    params = init_params(config, jax.random.PRNGKey(0))
    model = Transformer(config)
    full = jax.jit(lambda p, x, v: model.apply({"params": p}, x, valid_bt=v)[0])

    @jax.jit
    def step(p, x, v, cache):
        logits, new_cache, _ = model.apply({"params": p}, x, valid_bt=v, cache=cache)
        return logits, new_cache

    return config, params, full, step


def _batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 96, size=(3, T))
    valid = np.ones((3, T), bool)
    valid[1, :3] = False  # left padding of different lengths
    valid[2, :7] = False
    return jnp.asarray(tokens), jnp.asarray(valid)


@pytest.mark.parametrize("prefill,chunk", [(8, 1), (9, 1), (1, 5)])
def test_prefill_then_decode_matches_full_forward(setup, prefill, chunk):
    config, params, full, step = setup
    tokens, valid = _batch()
    ref = np.asarray(full(params, tokens, valid))
    cache = init_cache(Transformer(config), batch=3, max_len=T + 3, dtype=jnp.float32)
    outs = []
    logits, cache = step(params, tokens[:, :prefill], valid[:, :prefill], cache)
    outs.append(logits)
    for s in range(prefill, T, chunk):
        e = min(s + chunk, T)
        logits, cache = step(params, tokens[:, s:e], valid[:, s:e], cache)
        outs.append(logits)
    ours = np.asarray(jnp.concatenate(outs, axis=1))
    v = np.asarray(valid)
    assert rel_err(ours[v], ref[v]) <= 1e-5
    assert int(cache[SLOTS]["index"]) == T
    np.testing.assert_array_equal(np.asarray(cache[SLOTS]["valid"][:, :T]), v)
    np.testing.assert_array_equal(np.asarray(cache["next_position"]), v.sum(1))


def test_cache_layout(setup):
    config, *_ = setup
    cache = init_cache(Transformer(config), batch=2, max_len=5, dtype=jnp.bfloat16)
    layer = cache["layers_1"]
    assert set(layer) == {"k", "v"}
    assert layer["k"].shape == (2, 5, config.num_key_value_heads, config.head_dim)
    assert layer["k"].dtype == jnp.bfloat16
    slots = cache[SLOTS]
    assert slots["valid"].shape == (2, 5) and slots["valid"].dtype == jnp.bool_
    assert not bool(slots["valid"].any()) and int(slots["index"]) == 0


def test_bad_mixers_are_rejected():
    config = CONFIGS["qwen3_full"]
    with pytest.raises(ValueError, match="entries for 2 layers"):
        init_cache(Transformer(config, ("attention",)), 1, 4)
    with pytest.raises(ValueError, match="must be one of"):
        init_cache(Transformer(config, ("attention", "mamba")), 1, 4)
    with pytest.raises(ValueError, match=r"mixers use \['gdn'\] but the model's student_mixer"):
        init_cache(Transformer(config, ("attention", "gdn")), 1, 4)


def test_cache_overflow_is_an_error():
    config = CONFIGS["qwen3_full"]
    model = Transformer(config)
    params = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    cache = init_cache(model, batch=1, max_len=4)
    tokens = jnp.zeros((1, 5), jnp.int32)
    with pytest.raises(ValueError, match="KV cache overflow"):
        jax.eval_shape(lambda p: model.apply({"params": p}, tokens, cache=cache), params)


def test_one_validity_write_per_decoding_step():
    # Four attention layers, two of them windowed: one dynamic_update_slice of the bool [B, S]
    # slot validity per call (the model's slot record), not one per layer.
    config = _config(num_hidden_layers=4, sliding_windows=(None, 4, None, 4))
    model = Transformer(config)
    params = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    cache = init_cache(model, batch=2, max_len=8)

    def step(p, c):
        return model.apply({"params": p}, jnp.zeros((2, 1), jnp.int32), cache=c)

    jaxpr = jax.make_jaxpr(step)(params, cache).jaxpr
    writes = [e.outvars[0].aval for e in equations(jaxpr, "dynamic_update_slice")]
    bool_writes = [a for a in writes if a.dtype == jnp.bool_]
    assert [a.shape for a in bool_writes] == [(2, 8)]
    assert len(writes) == 1 + 2 * 4  # the validity, then k and v of each layer


def test_slot_record_only_with_attention_layers():
    config = CONFIGS["qwen3_full"]
    hybrid = init_cache(StudentConfig.from_teacher(config, (0,), mixer="gdn").model(), 1, 4)
    assert set(hybrid) == {SLOTS, "next_position", "layers_0", "layers_1"}
    assert set(hybrid["layers_0"]) == {"k", "v"} and "state" in hybrid["layers_1"]
    recurrent = init_cache(StudentConfig.from_teacher(config, (), mixer="gdn").model(), 1, 4)
    assert SLOTS not in recurrent


def test_attention_cache_without_slots_is_an_error():
    config = CONFIGS["qwen3_full"]
    model = Transformer(config)
    params = jax.eval_shape(lambda: init_params(config, jax.random.PRNGKey(0)))
    cache = init_cache(model, batch=1, max_len=4)
    del cache[SLOTS]
    tokens = jnp.zeros((1, 1), jnp.int32)
    with pytest.raises(ValueError, match=r"attention layer 0 has a KV cache but no SlotView"):
        jax.eval_shape(lambda p: model.apply({"params": p}, tokens, cache=cache), params)


def test_remat_gives_same_loss_and_grads():
    config = CONFIGS["mixed_window"]
    params = init_params(config, jax.random.PRNGKey(1))
    tokens, valid = _batch()

    def loss(p, model):
        logits = model.apply({"params": p}, tokens, valid_bt=valid)[0]
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0] * valid)

    plain = jax.value_and_grad(loss)(params, Transformer(config))
    remat = jax.value_and_grad(loss)(params, Transformer(config, remat=True))
    assert rel_err(remat[0], plain[0]) <= 1e-6
    for a, b in zip(
        jax.tree_util.tree_leaves(remat[1]), jax.tree_util.tree_leaves(plain[1]), strict=True
    ):
        assert rel_err(a, b) <= 1e-5
