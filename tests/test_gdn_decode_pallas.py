"""The GDN decoding step as one Pallas kernel (ops/gdn/decode_pallas.py) in interpret mode, against
the float64 definition (reference.gated_delta_rule_step) and XLA's form (decode_step_xla); the
same from a GDN layer's joined projections (decode_step_from_projections) against XLA's form of
that; the dispatch of ops/gdn/decode_api.py; a model's decoding steps by either; the Triton
lowering.

Metric: rel = max|a - b| / max|b|. Tolerances:
  float32 kernel vs the fp64 definition, 12 chained steps (o and state)     1e-5 (fp32 sums)
  bfloat16 q, k, v: kernel vs XLA's form on the same values, state          1e-5 (both fp32)
                    output, rounded to bf16 by both                          1e-2 (2^-8 each)
  gradients, kernel vs XLA's form (the kernel's backward is that form's)    1e-6
  model decode logits, pallas vs xla, float32                                2e-5
  from projections, float32: kernel vs XLA's form (o and state)              1e-5
                    bfloat16 projections: state 1e-5, output (bf16) 1e-2, as above (both
                    round the same fp32 silu to bf16)
                    on a GPU: state 1e-3: Triton's and XLA's fp32 exp may differ in the last
                    bits, which moves a few silus across a bf16 rounding boundary (one bf16
                    ulp, 2^-8, in a few of the 3 x 1536 activations per row)
Shapes: K = 32, V = 64 with B * H small, so BV = 16 and four programs share each head's state
(columns split), and V = 16 (one program per head).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decode_testing import greedy_steps
from gdn_testing import random_inputs, rel_err
from jaxpr_testing import equations
from tiny_models import tiny_model_config

from taylorcal_jax.models.layers import AttentionRuntime
from taylorcal_jax.models.mixers.gdn import GDNRuntime
from taylorcal_jax.models.student import StudentConfig
from taylorcal_jax.models.teacher import init_cache
from taylorcal_jax.ops.gdn import decode_api, decode_pallas
from taylorcal_jax.ops.gdn.decode_step import decode_step_from_projections_xla, decode_step_xla
from taylorcal_jax.ops.gdn.reference import gated_delta_rule_step

NAMES = ("q", "k", "v", "g", "beta")
F32 = jnp.float32


def _chain(step, inputs, dtype, **kwargs):
    """Outputs [B, T, H, V] and final state of `step` applied token by token."""
    state = jnp.asarray(inputs["initial_state"], jnp.float64 if dtype == jnp.float64 else F32)
    outs = []
    for t in range(inputs["q"].shape[1]):
        o, state = step(*(jnp.asarray(inputs[n][:, t], dtype) for n in NAMES), state, **kwargs)
        outs.append(o)
    return jnp.stack(outs, axis=1), state


@pytest.mark.parametrize("v", [64, 16])
@pytest.mark.parametrize(
    "kwargs", [{}, {"scale": 0.7}, {"use_qk_l2norm": False}], ids=["default", "scale", "no_l2"]
)
def test_kernel_equals_the_definition(v, kwargs):
    inputs = random_inputs(3, b=2, t=12, h=2, k=32, v=v, dtype=np.float64)
    if not kwargs.get("use_qk_l2norm", True):  # keep the un-normalised recurrence stable
        inputs["k"] = inputs["k"] / np.linalg.norm(inputs["k"], axis=-1, keepdims=True)
    with jax.enable_x64(True):
        o_ref, s_ref = _chain(gated_delta_rule_step, inputs, jnp.float64, **kwargs)
        o_ref, s_ref = np.asarray(o_ref), np.asarray(s_ref)
    assert decode_pallas.DecodeStepConfig().block_v(2, 2, v) == 16  # 4 or 1 programs per head
    step = jax.jit(
        decode_pallas.decode_step_pallas, static_argnames=("scale", "use_qk_l2norm", "interpret")
    )
    o, state = _chain(step, inputs, F32, interpret=True, **kwargs)
    assert o.dtype == F32 and state.dtype == F32
    assert rel_err(o, o_ref) < 1e-5 and rel_err(state, s_ref) < 1e-5


def test_bfloat16_inputs_equal_xla_form():
    inputs = random_inputs(4, b=3, t=1, h=2, k=32, v=64)
    args = [jnp.asarray(inputs[n][:, 0], jnp.bfloat16) for n in ("q", "k", "v")]
    args += [jnp.asarray(inputs[n][:, 0]) for n in ("g", "beta")]
    state = jnp.asarray(inputs["initial_state"])
    o, new_state = decode_pallas.decode_step_pallas(*args, state, interpret=True)
    want_o, want_state = decode_step_xla(*args, state)
    assert o.dtype == jnp.bfloat16 and new_state.dtype == F32
    assert rel_err(new_state, want_state) < 1e-5 and rel_err(o, want_o) < 1e-2


def test_gradients_are_the_xla_forms():
    inputs = random_inputs(5, b=1, t=1, h=2, k=16, v=32)
    args = [jnp.asarray(inputs[n][:, 0]) for n in NAMES] + [jnp.asarray(inputs["initial_state"])]
    weights = jax.random.normal(jax.random.PRNGKey(0), (1, 2, 32))

    def loss(fn):
        def f(*a):
            o, state = fn(*a)
            return jnp.sum(o * weights) + jnp.sum(jnp.sin(state))

        return jax.grad(f, argnums=tuple(range(6)))(*args)

    got = loss(lambda *a: decode_pallas.decode_step_pallas(*a, interpret=True))
    want = loss(decode_step_xla)
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) < 1e-6


def test_launch_plan_spreads_batch_one_over_the_gpu():
    config = decode_pallas.DecodeStepConfig()
    # Qwen2.5-1.5B's GDN layers (H 12, K = V 128): batch 1 -> 96 programs of 16 columns;
    # batch 16 -> 384 programs of 64 columns
    assert config.block_v(1, 12, 128) == 16 and config.block_v(16, 12, 128) == 64
    assert decode_pallas.DecodeStepConfig(programs=1).block_v(1, 1, 128) == 128
    with pytest.raises(ValueError, match="warps must be >= 1"):
        decode_pallas.DecodeStepConfig(warps=0)


def test_dispatch_and_refusals():
    q = jnp.zeros((1, 2, 32))
    v = jnp.zeros((1, 2, 64))
    state = jnp.zeros((1, 2, 32, 64))
    assert decode_api.resolve_impl("auto", q, v, state) == "xla"  # no GPU here
    assert decode_api.resolve_impl("pallas") == "pallas"
    with pytest.raises(ValueError, match="unknown GDN decode step impl 'triton'"):
        decode_api.resolve_impl("triton")
    with pytest.raises(ValueError, match="GDN decode_impl must be one of"):
        GDNRuntime(decode_impl="fast")
    reasons = {
        "K=24 must be a power of two": (jnp.zeros((1, 2, 24)), v, jnp.zeros((1, 2, 24, 64))),
        "a bfloat16 state": (q, v, state.astype(jnp.bfloat16)),
    }
    for message, (qq, vv, ss) in reasons.items():
        assert message in decode_pallas.unsupported_reason(qq, vv, ss)
        with pytest.raises(ValueError, match=message) as e:
            decode_api.gated_delta_rule_decode_step(
                qq, qq, vv, jnp.zeros((1, 2)), jnp.zeros((1, 2)), ss, impl="pallas"
            )
        assert "\n" not in str(e.value) and "impl='xla'" in str(e.value)
    # the step from projections: head dims from the state, dtype from the projections
    qkv, ab, h = jnp.zeros((1, 4 * 2 * 24)), jnp.zeros((1, 4)), jnp.zeros(2)
    assert decode_pallas.unsupported_reason_from_projections(qkv, state) is None
    with pytest.raises(ValueError, match="K=24 must be a power of two") as e:
        decode_api.decode_step_from_projections(
            qkv, ab, h, h, jnp.ones(1, bool), jnp.zeros((1, 2, 24, 24)), impl="pallas"
        )
    assert "\n" not in str(e.value)


def test_model_decode_steps_pallas_equal_xla():
    # a hybrid student with short convs: attention in layer 0, GDN in layers 1 and 2 (K = V =
    # 16); a left-padded prompt into a cache of 16 slots, then three decoding steps
    config = tiny_model_config(
        model_type="llama", num_hidden_layers=3, head_dim=16, max_position_embeddings=64
    )
    sc = StudentConfig.from_teacher(config, (0,), mixer="gdn", use_short_conv=True)
    attention = AttentionRuntime(decode_impl="xla")
    models = {
        impl: sc.model(
            runtime=GDNRuntime(impl="chunked", decode_impl=impl), attention_runtime=attention
        )
        for impl in ("xla", "pallas")
    }
    steps = greedy_steps(models, config.vocab_size)
    for impl, (_, calls) in steps.items():
        assert calls == (2 if impl == "pallas" else 0)  # one per GDN layer
    assert rel_err(steps["pallas"][0], steps["xla"][0]) <= 2e-5


def _projections(seed, b, h, k, v, dtype):
    """Random joined products of one token (x [Wq | Wk | Wv | Wg], x [Wa | Wb]) and decay
    params, all in `dtype` (a model whose params are stored in it), a validity with row 1
    padding when b > 1, and a float32 state."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    qkvg = jax.random.normal(keys[0], (b, 2 * h * k + 2 * h * v)).astype(dtype)
    ab = jax.random.normal(keys[1], (b, 2 * h)).astype(dtype)
    A_log = jax.random.uniform(keys[2], (h,), minval=-1.0, maxval=2.0).astype(dtype)
    dt_bias = jax.random.normal(keys[3], (h,)).astype(dtype)
    valid = jnp.arange(b) != 1
    state = jax.random.normal(keys[4], (b, h, k, v))
    return qkvg, ab, A_log, dt_bias, valid, state


@pytest.mark.parametrize(("b", "v"), [(3, 64), (1, 16)])
def test_step_from_projections_equals_xla_form(b, v):
    # float32, 3 rows (row 1 padding) with 4 programs per head, or one row and one program
    args = _projections(7, b, 2, 32, v, F32)
    o, state = decode_pallas.decode_step_from_projections_pallas(*args, interpret=True)
    want_o, want_state = decode_step_from_projections_xla(*args)
    assert o.dtype == F32 and state.dtype == F32 and o.shape == (b, 2, v)
    assert rel_err(o, want_o) < 1e-5 and rel_err(state, want_state) < 1e-5
    if b > 1:  # the padding row neither decays nor writes its state, and outputs 0
        np.testing.assert_array_equal(state[1], args[-1][1])
        np.testing.assert_array_equal(o[1], 0.0)


def test_step_from_projections_in_bfloat16_and_its_gradients():
    args = _projections(8, 3, 2, 32, 64, jnp.bfloat16)
    o, state = decode_pallas.decode_step_from_projections_pallas(*args, interpret=True)
    want_o, want_state = decode_step_from_projections_xla(*args)
    assert o.dtype == jnp.bfloat16
    assert rel_err(state, want_state) < 1e-5 and rel_err(o, want_o) < 1e-2
    # a, b, A_log and dt_bias reach the kernel in bf16, uncast: a cast outside would be a
    # kernel launch of its own per layer and step
    step = lambda *a: decode_pallas.decode_step_from_projections_pallas(*a, interpret=True)  # noqa: E731
    (call,) = equations(jax.make_jaxpr(step)(*args).jaxpr, "pallas_call")
    assert [v.aval.dtype for v in call.invars[:4]] == [jnp.bfloat16] * 4
    # the backward is XLA's form's: gradients of the float32 inputs
    args = _projections(9, 2, 2, 16, 32, F32)
    weights = jax.random.normal(jax.random.PRNGKey(1), (2, 2, 32))

    def grads(fn):
        def loss(qkvg, ab, A_log, dt_bias, state):
            o, new_state = fn(qkvg, ab, A_log, dt_bias, args[4], state)
            return jnp.sum(o * weights) + jnp.sum(jnp.sin(new_state))

        return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*args[:4], args[5])

    got = grads(lambda *a: decode_pallas.decode_step_from_projections_pallas(*a, interpret=True))
    for g, w in zip(got, grads(decode_step_from_projections_xla), strict=True):
        assert rel_err(g, w) < 1e-6


def _one_product(seed, b, h, d, pad=24):
    """One float32 product of all six kernels, x [Wq | Wk | Wv | Wg | Wa | Wb | 0] [B, C]
    (zero columns after them, as params joined for decoding have), the gate logits' column,
    and the rest of `_projections`' operands in bf16."""
    qkvg, ab, *rest = _projections(seed, b, h, d, d, F32)
    y = jnp.concatenate([qkvg, ab, jnp.zeros((b, pad))], axis=1)
    rest = [x.astype(jnp.bfloat16) if x.dtype == F32 and x.ndim == 1 else x for x in rest]
    return y, qkvg.shape[1], rest


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_step_from_one_float32_product_equals_the_split_operands(impl):
    # the product passed as both operands, q, k, v rounded to bf16 inside: the same values as
    # its slices passed apart, q|k|v|g rounded to bf16 outside (what the model did before)
    y, width, rest = _one_product(12, 3, 2, 32)
    step = functools.partial(decode_api.decode_step_from_projections, impl=impl)
    if impl == "pallas":
        step = functools.partial(decode_pallas.decode_step_from_projections_pallas, interpret=True)
    o, state = step(y, y, *rest, ab_column=width, dtype=jnp.bfloat16)
    want_o, want_state = step(y[:, :width].astype(jnp.bfloat16), y[:, width : width + 4], *rest)
    assert o.dtype == jnp.bfloat16
    np.testing.assert_array_equal(o, want_o)
    np.testing.assert_array_equal(state, want_state)


def test_model_steps_without_short_conv_take_the_projections_kernel():
    # GDN layers without the short conv decode from their joined projections: one kernel per
    # layer, equal to XLA's form, with the params as stored and joined for decoding
    from taylorcal_jax.models.joined import join_for_decoding

    config = tiny_model_config(
        model_type="llama", num_hidden_layers=3, head_dim=16, max_position_embeddings=64
    )
    sc = StudentConfig.from_teacher(config, (0,), mixer="gdn")
    attention = AttentionRuntime(decode_impl="xla")
    models = {
        impl: sc.model(
            runtime=GDNRuntime(impl="chunked", decode_impl=impl), attention_runtime=attention
        )
        for impl in ("xla", "pallas")
    }
    for params_map in (None, join_for_decoding):
        steps = greedy_steps(models, config.vocab_size, params_map=params_map)
        assert steps["pallas"][1] == 2 and steps["xla"][1] == 0
        assert rel_err(steps["pallas"][0], steps["xla"][0]) <= 2e-5
    step = jax.jit(lambda p, c, t: models["pallas"].apply({"params": p}, t, cache=c)[:2])
    tokens = jnp.ones((1, 1), jnp.int32)
    params = models["pallas"].init(jax.random.PRNGKey(0), tokens)["params"]
    cache = init_cache(models["pallas"], 1, 8)
    names = [e.params["name"] for e in equations(jax.make_jaxpr(step)(params, cache, tokens).jaxpr,
                                                  "pallas_call")]  # fmt: skip
    assert names == ["gdn_decode_step_from_projections"] * 2


def _lowered_for_cuda(fn, args):
    """The export of `fn` for platform "cuda": Pallas's Triton lowering runs here, without a
    GPU; shapes and dtypes of every load, reduction and store pass its checks. Compiling the
    Triton IR needs a GPU."""
    triton = "__gpu$xla.gpu.triton"
    exported = jax.export.export(
        jax.jit(fn),
        platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton)],
    )(*args)
    return exported.mlir_module().count(triton)


@pytest.mark.parametrize("b", [1, 16])
def test_projections_kernel_lowers_to_triton_for_a_gpu(b):
    # the Qwen2.5-1.5B GDN shape, projections and params in bf16, with a float32 state
    h, d = 12, 128
    args = [
        jax.ShapeDtypeStruct((b, 4 * h * d), jnp.bfloat16),
        jax.ShapeDtypeStruct((b, 2 * h), jnp.bfloat16),
    ]
    args += [jax.ShapeDtypeStruct((h,), jnp.bfloat16)] * 2 + [jax.ShapeDtypeStruct((b,), bool)]
    args += [jax.ShapeDtypeStruct((b, h, d, d), F32)]
    fn = lambda *a: decode_pallas.decode_step_from_projections_pallas(*a, interpret=False)  # noqa: E731
    assert _lowered_for_cuda(fn, args) == 1
    # one float32 product as both operands, the gate logits from column 4 h d on
    args[:2] = [jax.ShapeDtypeStruct((b, 4 * h * d + 128), F32)] * 2

    def one(y, _, *rest):
        return decode_pallas.decode_step_from_projections_pallas(
            y, y, *rest, ab_column=4 * h * d, dtype=jnp.bfloat16, interpret=False
        )

    assert _lowered_for_cuda(one, args) == 1


@pytest.mark.parametrize("b", [1, 16])
def test_kernel_lowers_to_triton_for_a_gpu(b):
    # `_lowered_for_cuda`, at the Qwen2.5-1.5B GDN shape in bf16 with a float32 state
    h, d = 12, 128
    args = [jax.ShapeDtypeStruct((b, h, d), jnp.bfloat16) for _ in range(3)]
    args += [jax.ShapeDtypeStruct((b, h), F32)] * 2 + [jax.ShapeDtypeStruct((b, h, d, d), F32)]
    fn = lambda *a: decode_pallas.decode_step_pallas(*a, interpret=False)  # noqa: E731
    assert _lowered_for_cuda(fn, args) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("b", [1, 16])
def test_compiled_kernel_equals_xla_on_gpu(b):
    # the Qwen2.5-1.5B GDN shape (12 heads, K = V = 128), bf16 q, k, v and a float32 state,
    # compiled by Triton, 4 chained steps
    inputs = random_inputs(6, b=b, t=4, h=12, k=128, v=128)
    state = jnp.asarray(inputs["initial_state"])
    step = {
        impl: jax.jit(lambda *a, impl=impl: decode_api.gated_delta_rule_decode_step(*a, impl=impl))
        for impl in ("xla", "pallas")
    }
    states = {impl: state for impl in step}
    for t in range(4):
        args = [jnp.asarray(inputs[n][:, t], jnp.bfloat16) for n in ("q", "k", "v")]
        args += [jnp.asarray(inputs[n][:, t]) for n in ("g", "beta")]
        outs = {}
        for impl, fn in step.items():
            outs[impl], states[impl] = fn(*args, states[impl])
        assert rel_err(outs["pallas"], outs["xla"]) < 1e-2
    assert rel_err(states["pallas"], states["xla"]) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("b", [1, 16])
def test_compiled_step_from_one_float32_product_equals_xla_on_gpu(b):
    # the Qwen2.5-1.5B GDN shape, the model's decoding form with params joined for decoding
    h, d = 12, 128
    y, width, rest = _one_product(13, b, h, d, pad=104)
    outs = {
        impl: jax.jit(lambda y, *r, impl=impl: decode_api.decode_step_from_projections(
            y, y, *r, ab_column=width, dtype=jnp.bfloat16, impl=impl))(y, *rest)
        for impl in ("xla", "pallas")
    }  # fmt: skip
    assert rel_err(outs["pallas"][0], outs["xla"][0]) < 1e-2
    assert rel_err(outs["pallas"][1], outs["xla"][1]) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("b", [1, 16])
def test_compiled_projections_kernel_equals_xla_on_gpu(b):
    # the Qwen2.5-1.5B GDN shape, bf16 projections (row 1 padding at batch 16), a float32
    # state, compiled by Triton, 4 chained steps; tolerances in the module docstring
    h, d = 12, 128
    step = {
        impl: jax.jit(lambda *a, impl=impl: decode_api.decode_step_from_projections(*a, impl=impl))
        for impl in ("xla", "pallas")
    }
    state = _projections(10, b, h, d, d, jnp.bfloat16)[-1]
    states = {impl: state for impl in step}
    for t in range(4):
        args = _projections(11 + t, b, h, d, d, jnp.bfloat16)[:-1]
        outs = {}
        for impl, fn in step.items():
            outs[impl], states[impl] = fn(*args, states[impl])
        assert rel_err(outs["pallas"], outs["xla"]) < 1e-2
    assert rel_err(states["pallas"], states["xla"]) < 1e-3
