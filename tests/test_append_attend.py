"""A decoding step's token appended to the KV cache and attended (decode_attention.api.
append_and_attend): the Pallas kernel in interpret mode (pallas_append.py) against the XLA form
(reference.append_and_attend_xla) and a float64 NumPy reference; what the kernel writes into
the caches; the models taking it for joined params.

Metric: rel = max|a - b| / max|b|. Tolerances:
  context, float32, vs fp64 and vs the XLA form                         2e-5 (fp32 sums)
  context, bfloat16, vs the XLA form                                    1.5e-2 (probabilities
      and the output rounded to bf16: 2^-8 relative each)
  context, bfloat16, vs fp64 of the same bf16 inputs                    2e-2 (as above, and
      q and k rounded to bf16 after their rotation, as the XLA form rounds them)
  the new key in the cache vs the XLA form's                            1 ulp of the cache
      dtype (the same float32 rotation; XLA may fuse a multiply and an add into one rounding)
  the new value, every other slot of both caches                        bitwise
  model decode logits, pallas vs xla, float32                           2e-5
The cases: GQA groups G = 1, 2, 3, 6; head dims 16, 32, 64, 128; batch 1 and 3; S = 69 slots in
blocks of 16 (5 blocks, 2 splits of 3 blocks); the token at slot 0, 31 (mid-block), 48 (the
first slot of a block and of the second split) and 68 (S - 1); rows with all slots up to the
token, left padding, a sliding window.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decode_testing import attend_one_query64, greedy_steps
from gdn_testing import rel_err
from jaxpr_testing import equations
from tiny_models import tiny_model_config

from taylorcal_jax.models.joined import join_for_decoding
from taylorcal_jax.models.layers import AttentionRuntime
from taylorcal_jax.models.rope import rope_cos_sin
from taylorcal_jax.models.teacher import Transformer, init_cache
from taylorcal_jax.ops.decode_attention import api, pallas_append, pallas_gpu, reference

S = 69
STARTS = (0, 31, 48, S - 1)


def _config(b, hkv):
    """block_s 16 -> 5 blocks of S; 2 programs per (b, KV head) -> 2 splits of 3 blocks."""
    config = pallas_gpu.DecodeConfig(block_s=16, programs=2 * b * hkv)
    assert pallas_gpu.split_plan(config, b, hkv, S) == (2, 3)
    return config


def _inputs(b, h, hkv, d, dtype, seed=0):
    """qkv [B, (H + 2 Hkv) d], cos and sin [B, d] (positions 7, 40, 3), caches [B, S, Hkv, d]."""
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    qkv = (2.0 * jax.random.normal(kq, (b, (h + 2 * hkv) * d))).astype(dtype)
    k = (2.0 * jax.random.normal(kk, (b, S, hkv, d))).astype(dtype)
    v = jax.random.normal(kv, (b, S, hkv, d)).astype(dtype)
    rope = tiny_model_config(head_dim=d, max_position_embeddings=64)
    cos, sin = rope_cos_sin(rope, jnp.asarray([[7], [40], [3]])[:b])
    return qkv, cos[:, 0], sin[:, 0], k, v


def _mask(b, start):
    """[B, S] bool, slot `start` valid in every row: all slots up to it; left padding of 3;
    a sliding window of 5 ending at it."""
    s = np.arange(S)
    rows = [s <= start, ((s >= 3) & (s <= start)) | (s == start), (s > start - 5) & (s <= start)]
    return jnp.asarray(np.stack(rows[:b]))


def _append_and_attend64(qkv, cos, sin, k, v, start, mask, heads):
    """(context, K, V) in float64 NumPy: the rotation x cos + rotate_half(x) sin of q and k, the
    new key and value at slot `start`, then attend_one_query64."""
    h, hkv = heads
    b, _, _, d = k.shape
    x = np.asarray(qkv).astype(np.float64).reshape(b, h + 2 * hkv, d)
    c, s = (np.asarray(y, np.float64)[:, None] for y in (cos, sin))

    def rope(y):
        return y * c + np.concatenate([-y[..., d // 2 :], y[..., : d // 2]], -1) * s

    k64, v64 = (np.asarray(y).astype(np.float64) for y in (k, v))
    k64[:, start], v64[:, start] = rope(x[:, h : h + hkv]), x[:, h + hkv :]
    return attend_one_query64(rope(x[:, :h])[:, None], k64, v64, mask), k64, v64


def _pallas(dtype, b, heads):
    config = _config(b, heads[1])
    return jax.jit(
        lambda *a: pallas_append.append_and_attend_pallas(
            *a, dtype, heads=heads, interpret=True, config=config
        )
    )


@pytest.mark.parametrize(
    "h,hkv,d,b",
    [
        (2, 2, 32, 3),
        (2, 1, 16, 3),
        (4, 2, 64, 1),
        (6, 2, 128, 3),
        (6, 1, 32, 1),
        (12, 2, 64, 3),
        (3, 1, 128, 1),
    ],
)  # G = 1, 2, 2, 3, 6, 6, 3
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_equals_xla_form_and_fp64(h, hkv, d, b, dtype):
    f32 = dtype == jnp.float32
    qkv, cos, sin, k, v = _inputs(b, h, hkv, d, dtype)
    pallas = _pallas(dtype, b, (h, hkv))
    xla = jax.jit(
        lambda *a: reference.append_and_attend_xla(*a, dtype, heads=(h, hkv)),
    )
    ulp = float(jnp.finfo(dtype).eps)
    for start in STARTS:
        args = (qkv, cos, sin, k, v, jnp.int32(start), _mask(b, start))
        ctx, k_all, v_all = pallas(*args)
        want_ctx, want_k, want_v = xla(*args)
        ctx64, _, _ = _append_and_attend64(*args[:5], start, args[6], (h, hkv))
        assert ctx.shape == (b, 1, h, d) and ctx.dtype == dtype
        assert rel_err(ctx, want_ctx) <= (2e-5 if f32 else 1.5e-2), start
        assert rel_err(ctx, ctx64) <= (2e-5 if f32 else 2e-2), start
        # the caches: slot `start` holds the token's key and value, every other slot as it was
        assert k_all.dtype == v_all.dtype == dtype
        others = np.arange(S) != start
        for got, old in ((k_all, k), (v_all, v)):
            np.testing.assert_array_equal(np.asarray(got)[:, others], np.asarray(old)[:, others])
        np.testing.assert_array_equal(v_all[:, start], want_v[:, start])
        new_k, want_new_k = (np.asarray(x[:, start], np.float32) for x in (k_all, want_k))
        np.testing.assert_array_less(np.abs(new_k - want_new_k), ulp * np.abs(want_new_k) + 1e-30)


def test_the_token_replaces_whatever_the_cache_held_at_its_slot():
    # the cache holds a stale key and value at the token's slot (a huge one): the attention
    # must see the token's own, as the XLA form writes them before attending
    h, hkv, d, b = 4, 2, 32, 3
    qkv, cos, sin, k, v = _inputs(b, h, hkv, d, jnp.float32, seed=1)
    start = 31
    k, v = k.at[:, start].set(1e4), v.at[:, start].set(-1e4)
    args = (qkv, cos, sin, k, v, jnp.int32(start), _mask(b, start))
    ctx = _pallas(jnp.float32, b, (h, hkv))(*args)[0]
    want = reference.append_and_attend_xla(*args, jnp.float32, heads=(h, hkv))[0]
    assert rel_err(ctx, want) <= 2e-5


def test_api_impls_and_gradients_are_the_xla_forms():
    h, hkv, d, b = 4, 2, 32, 3
    qkv, cos, sin, k, v = _inputs(b, h, hkv, d, jnp.float32, seed=2)
    start, mask = jnp.int32(48), _mask(b, 48)
    w = jax.random.normal(jax.random.PRNGKey(3), (b, 1, h, d))

    def loss(impl):
        def f(*x):
            ctx, k_all, v_all = api.append_and_attend(
                *x, start, mask, jnp.float32, heads=(h, hkv), impl=impl
            )
            return jnp.sum(w * ctx) + jnp.sum(k_all**2) - jnp.sum(v_all**3)

        return f

    got = jax.value_and_grad(loss("pallas"), argnums=range(5))(qkv, cos, sin, k, v)
    want = jax.value_and_grad(loss("xla"), argnums=range(5))(qkv, cos, sin, k, v)
    assert rel_err(got[0], want[0]) <= 2e-5
    for a, b_ in zip(got[1], want[1], strict=True):
        assert rel_err(a, b_) <= 1e-5


def test_where_the_kernel_runs():
    def cache(d, dtype=jnp.float32):
        return jax.ShapeDtypeStruct((1, 8, 2, d), dtype)

    assert jax.default_backend() == "cpu"
    assert api.append_kernel_runs("pallas", cache(32), cache(32), jnp.float32)
    bf16 = cache(128, jnp.bfloat16)
    assert api.append_kernel_runs("pallas", bf16, bf16, jnp.bfloat16)
    assert not api.append_kernel_runs("pallas", cache(128), bf16, jnp.bfloat16)  # k f32
    assert not api.append_kernel_runs("pallas", bf16, bf16, jnp.float32)
    assert not api.append_kernel_runs("auto", cache(32), cache(32), jnp.float32)  # no GPU here
    assert not api.append_kernel_runs("xla", cache(32), cache(32), jnp.float32)
    assert api.append_kernel_runs("pallas", cache(16), cache(16), jnp.float32)
    assert not api.append_kernel_runs("pallas", cache(8), cache(8), jnp.float32)
    assert not api.append_kernel_runs("pallas", cache(48), cache(48), jnp.float32)
    with pytest.raises(ValueError, match="head dim 8 must be a power of two >= 16"):
        args = _inputs(1, 2, 1, 8, jnp.float32)
        pallas_append.append_and_attend_pallas(
            *args, jnp.int32(0), _mask(1, 0), jnp.float32, heads=(2, 1)
        )


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(qkv=lambda x: x[:, :-1]), r"joined q\|k\|v product must be \[B, \(H \+ 2 Hkv\) d\]"),
        (dict(cos=lambda x: x[:, :8]), r"cos and sin must both be \[B, d\]=\(3, 32\)"),
        (dict(k=lambda x: x[:, :, :1]), r"heads \(H, Hkv\)=\(4, 2\) but the caches hold Hkv=1"),
        (dict(v=lambda x: x[:, :3]), "k and v must both be"),
        (dict(k=lambda x: x[0]), r"k and v must both be \[B, S, Hkv, d\]"),
        (dict(start=lambda x: jnp.zeros(2, jnp.int32)), "start must be an integer scalar"),
        (dict(mask=lambda x: x[:, :5]), r"mask must be bool \[B, S\]"),
    ],
)
def test_bad_inputs_are_one_line_errors(change, message):
    qkv, cos, sin, k, v = _inputs(3, 4, 2, 32, jnp.float32)
    args = dict(qkv=qkv, cos=cos, sin=sin, k=k, v=v, start=jnp.int32(0), mask=_mask(3, 0))
    args.update({name: fn(args[name]) for name, fn in change.items()})
    with pytest.raises(ValueError, match=message) as e:
        api.append_and_attend(*args.values(), jnp.float32, heads=(4, 2), impl="xla")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_kernel_lowers_to_triton_with_the_caches_aliased(dtype):
    # Pallas's Triton lowering runs here, without a GPU (the export for platform "cuda"), at
    # the Qwen2.5-1.5B attention shape (S a ragged 65 x 64): both kernels, and the kernel's
    # outputs 3 and 4 (the caches) are its operands 4 and 5, updated in place
    b, s, h, hkv, d = 2, 4160, 12, 2, 128
    shapes = [(b, (h + 2 * hkv) * d), (b, d), (b, d), (b, s, hkv, d), (b, s, hkv, d)]
    args = [jax.ShapeDtypeStruct(x, dtype if i != 1 and i != 2 else jnp.float32)
            for i, x in enumerate(shapes)]  # fmt: skip
    args += [jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((b, s), jnp.bool_)]
    fn = jax.jit(
        lambda *a: pallas_append.append_and_attend_pallas(
            *a, dtype, heads=(h, hkv), interpret=False
        )
    )
    triton = "__gpu$xla.gpu.triton"
    module = jax.export.export(
        fn, platforms=["cuda"], disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton)]
    )(*args).mlir_module()
    assert module.count(triton) == 2  # the kernel and the combine kernel
    for out, operand in ((3, 4), (4, 5)):
        alias = f"output_tuple_indices = [{out}], operand_index = {operand}, operand_tuple"
        assert f"#stablehlo.output_operand_alias<{alias}" in module


@pytest.mark.gpu
@pytest.mark.parametrize("b,s", [(1, 4160), (4, 16448)])
def test_compiled_kernel_in_a_decoding_loop_equals_xla_on_gpu(b, s):
    # the Qwen2.5-1.5B attention shape in bf16, compiled by Triton: 8 tokens appended by a
    # jitted loop that carries the caches, so that XLA may hand the kernel the carry's own
    # buffers to update in place; contexts and caches against the XLA form's loop
    h, hkv, d, steps, dtype = 12, 2, 128, 8, jnp.bfloat16
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(4), 3)
    qkv = jax.random.normal(kq, (steps, b, (h + 2 * hkv) * d), dtype)
    k = jax.random.normal(kk, (b, s, hkv, d), dtype)
    v = jax.random.normal(kv, (b, s, hkv, d), dtype)
    first = s - steps - 3  # the last slots stay as they were
    positions = jnp.broadcast_to(first + jnp.arange(steps), (b, steps))
    cos, sin = rope_cos_sin(tiny_model_config(head_dim=d, max_position_embeddings=s), positions)

    def run(impl):
        def step(i, carry):
            k_c, v_c, ctx = carry
            mask = jnp.broadcast_to(jnp.arange(s) <= first + i, (b, s))
            out = api.append_and_attend(
                qkv[i], cos[:, i], sin[:, i], k_c, v_c, first + i, mask, dtype,
                heads=(h, hkv), impl=impl,
            )  # fmt: skip
            return out[1], out[2], ctx.at[i].set(out[0])

        ctx = jnp.zeros((steps, b, 1, h, d), dtype)
        return jax.jit(lambda k, v: jax.lax.fori_loop(0, steps, step, (k, v, ctx)))(k, v)

    got_k, got_v, got_ctx = run("pallas")
    want_k, want_v, want_ctx = run("xla")
    assert rel_err(got_ctx, want_ctx) <= 1.5e-2
    np.testing.assert_array_equal(np.asarray(got_v), np.asarray(want_v))
    written = slice(first, first + steps)
    np.testing.assert_array_equal(np.asarray(got_k)[:, :first], np.asarray(k)[:, :first])
    np.testing.assert_array_equal(
        np.asarray(got_k)[:, first + steps :], np.asarray(k)[:, first + steps :]
    )
    new_k, xla_k = (np.asarray(x[:, written], np.float32) for x in (got_k, want_k))
    ulp = float(jnp.finfo(dtype).eps)
    np.testing.assert_array_less(np.abs(new_k - xla_k), ulp * np.abs(xla_k) + 1e-30)


def _teacher_config(head_dim):
    # Qwen2 (biases on q, k, v) with a sliding window of 4 in layer 1
    return tiny_model_config(
        model_type="qwen2", hidden_size=64, intermediate_size=96, head_dim=head_dim,
        attention_bias=True, sliding_windows=(None, 4), max_position_embeddings=64,
    )  # fmt: skip


def _step_jaxpr(model, params, cache_dtype=None, batch=2, slots=16):
    """The jaxpr of a one-token cached call (a decoding step); the cache in `cache_dtype` (None:
    the model's)."""
    tokens = jnp.ones((batch, 1), jnp.int32)
    step = lambda p, c: model.apply({"params": p}, tokens, cache=c)[:2]  # noqa: E731
    return jax.make_jaxpr(step)(params, init_cache(model, batch, slots, cache_dtype)).jaxpr


def _cache_writes(jaxpr, config, batch=2, slots=16):
    """dynamic_update_slice equations writing a [B, S, Hkv, d] cache."""
    shape = (batch, slots, config.num_key_value_heads, config.head_dim)
    return [e for e in equations(jaxpr, "dynamic_update_slice") if e.outvars[0].aval.shape == shape]


def test_joined_teacher_decodes_the_same_with_the_appending_kernel():
    config = _teacher_config(head_dim=32)
    models = {
        impl: Transformer(config, attention_runtime=AttentionRuntime(decode_impl=impl))
        for impl in ("xla", "pallas")
    }
    steps = greedy_steps(models, config.vocab_size, params_map=join_for_decoding)
    assert steps["pallas"][1] == 2 * 2 and steps["xla"][1] == 0  # 2 layers: kernel + combine
    assert rel_err(steps["pallas"][0], steps["xla"][0]) <= 2e-5
    params = join_for_decoding(
        models["pallas"].init(jax.random.PRNGKey(0), jnp.ones((2, 4), jnp.int32))["params"]
    )
    jaxpr = _step_jaxpr(models["pallas"], params)
    names = [e.params["name"] for e in equations(jaxpr, "pallas_call")]
    assert names == ["decode_append_attention", "decode_attention_combine"] * 2
    assert not _cache_writes(jaxpr, config)  # the kernel writes the caches
    assert len(_cache_writes(_step_jaxpr(models["xla"], params), config)) == 2 * 2


@pytest.mark.parametrize("case", ["params_as_stored", "qk_norm", "bf16_cache_f32_model"])
def test_models_take_the_separate_ops_where_the_kernel_does_not_run(case):
    # under decode_impl "pallas": the decoding attention kernel after XLA's RoPE and cache
    # writes, where the appending kernel does not take the step
    config = _teacher_config(head_dim=32)
    if case == "qk_norm":
        config = dataclasses.replace(config, model_type="qwen3", qk_norm=True)
    model = Transformer(config, attention_runtime=AttentionRuntime(decode_impl="pallas"))
    params = model.init(jax.random.PRNGKey(0), jnp.ones((2, 4), jnp.int32))["params"]
    if case != "params_as_stored":
        params = join_for_decoding(params)
        assert "qkv_kernel" in params["layers_0"]["self_attn"]
    cache_dtype = jnp.bfloat16 if case == "bf16_cache_f32_model" else None
    jaxpr = _step_jaxpr(model, params, cache_dtype)
    names = [e.params["name"] for e in equations(jaxpr, "pallas_call")]
    assert names == ["decode_attention", "decode_attention_combine"] * 2
    assert len(_cache_writes(jaxpr, config)) == 2 * 2
