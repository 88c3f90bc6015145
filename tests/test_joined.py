"""Params joined for decoding (models/joined.py): which kernels are joined, that generation
joins them before its decoding loop and not in it, and that a teacher and a hybrid student give
the same logits and tokens with the joined params as with the original ones, in prefill and
decoding steps, with XLA's products and with the few-row kernel.

The params' norm scales are drawn at random (init sets them to 1), so that folding a norm into
the product after it (joined.py) is a change a wrong fold would show.

Metric: rel = max|a - b| / max|b|. Tolerances (float32 models):
  joined vs original params, XLA's products                        1e-5 (the same sums, rounded
      in another order: rmsnorm(x) W as r (x (diag(scale) W)))
  few-row kernel with joined params vs XLA with the original ones  2e-5 (as tests/test_gemv.py)
bf16 students: the distance of their decoding logits to the float32 student's, with joined
params at most 1.25x that with the params as stored (bf16 rounds the folded and the stored
forms differently, about 2% of the largest logit either way).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decode_testing import greedy_steps
from gdn_testing import rel_err
from jaxpr_testing import equations
from tiny_models import tiny_model_config

from taylorcal_jax.eval.generate import generate
from taylorcal_jax.models import joined
from taylorcal_jax.models.layers import AttentionRuntime
from taylorcal_jax.models.mixers.gdn import GDNRuntime
from taylorcal_jax.models.student import StudentConfig
from taylorcal_jax.models.teacher import Transformer


def _config(bias=True):
    # biases on q, k, v (Qwen2) by default: they join with the kernels
    return tiny_model_config(
        model_type="qwen2" if bias else "llama", num_hidden_layers=3, hidden_size=64,
        intermediate_size=96, head_dim=16, attention_bias=bias, max_position_embeddings=64,
    )  # fmt: skip


def _student(fused=True, gemv="xla"):
    sc = StudentConfig.from_teacher(_config(), (0,), mixer="gdn")
    return sc.model(
        runtime=GDNRuntime(impl="chunked", decode_impl="xla", fused_projections=fused,
                           gemv_impl=gemv),
        attention_runtime=AttentionRuntime(decode_impl="xla", gemv_impl=gemv),
    )  # fmt: skip


def _draw_scales(params):
    """`params` with every RMSNorm scale drawn from 1 + N(0, 0.5^2)."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    drawn = [
        1.0 + 0.5 * jax.random.normal(key, leaf.shape) if path[-1].key == "scale" else leaf
        for (path, leaf), key in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(tree, drawn)


def _params(model):
    tokens = jnp.ones((1, 4), jnp.int32)
    return _draw_scales(model.init(jax.random.PRNGKey(0), tokens)["params"])


def _joined(params):
    return joined.join_for_decoding(_draw_scales(params))


def test_join_replaces_the_groups_kernels_and_nothing_else():
    params = _params(_student())
    out = joined.join_for_decoding(params)
    gdn, gdn_joined = params["layers_1"]["gdn"], out["layers_1"]["gdn"]
    # all six input products of a GDN layer, the gate logits' a and b last, then zero columns
    # up to a multiple of 128 (264 -> 384 here)
    names = ("q_proj", "k_proj", "v_proj", "g_proj", "a_proj", "b_proj")

    # each joined kernel that reads a norm's output holds that norm's scale: diag(scale) W
    def scale(layer, norm):
        return params[layer][norm]["scale"][:, None]

    parts = jnp.concatenate([gdn[n]["kernel"] for n in names], 1)
    assert parts.shape[1] == 264 and gdn_joined["qkvgab_kernel"].shape == (64, 384)
    np.testing.assert_allclose(
        gdn_joined["qkvgab_kernel"][:, :264], scale("layers_1", "input_layernorm") * parts
    )
    np.testing.assert_array_equal(gdn_joined["qkvgab_kernel"][:, 264:], 0.0)
    assert set(gdn_joined) == {"qkvgab_kernel", "o_proj", "A_log", "dt_bias", "o_norm"}
    mlp = params["layers_0"]["mlp"]
    gate_up = jnp.concatenate([mlp["gate_proj"]["kernel"], mlp["up_proj"]["kernel"]], 1)
    np.testing.assert_allclose(
        out["layers_0"]["mlp"]["gate_up_kernel"],
        scale("layers_0", "post_attention_layernorm") * gate_up,
    )
    assert set(out["layers_0"]["mlp"]) == {"gate_up_kernel", "down_proj"}
    # the kept attention layer: q, k and v with their biases (Qwen2), no g; the biases unscaled
    attn, attn_joined = params["layers_0"]["self_attn"], out["layers_0"]["self_attn"]
    kernels = jnp.concatenate([attn[n]["kernel"] for n in ("q_proj", "k_proj", "v_proj")], -1)
    np.testing.assert_allclose(
        attn_joined["qkv_kernel"], scale("layers_0", "input_layernorm") * kernels
    )
    biases = [attn[n]["bias"] for n in ("q_proj", "k_proj", "v_proj")]
    np.testing.assert_array_equal(attn_joined["qkv_bias"], jnp.concatenate(biases))
    assert set(attn_joined) == {"qkv_kernel", "qkv_bias", "o_proj"}
    # both norms of every block folded, the model's final norm kept
    for layer in ("layers_0", "layers_1", "layers_2"):
        assert set(out[layer]) == {"self_attn" if layer == "layers_0" else "gdn", "mlp"}
    assert "norm" in out
    twice = joined.join_for_decoding(out)
    assert jax.tree.structure(twice) == jax.tree.structure(out)
    for a, b in zip(jax.tree.leaves(twice), jax.tree.leaves(out), strict=True):
        np.testing.assert_array_equal(a, b)


def test_bias_free_attention_joins_and_decodes_the_same():
    # Llama: q|k|v joined without a bias; a layer with biases on some parts only stays as is
    model = Transformer(_config(bias=False))
    params = _params(model)
    out = joined.join_for_decoding(params)
    assert set(out["layers_0"]["self_attn"]) == {"qkv_kernel", "o_proj"}
    prompt = jax.random.randint(jax.random.PRNGKey(3), (1, 6), 1, _config().vocab_size)
    tokens = {
        which: generate(model, p, prompt, max_new_tokens=4)["tokens"]
        for which, p in (("original", params), ("joined", out))
    }
    np.testing.assert_array_equal(tokens["joined"], tokens["original"])
    attn = dict(params["layers_0"]["self_attn"])
    attn["q_proj"] = {**attn["q_proj"], "bias": jnp.zeros(attn["q_proj"]["kernel"].shape[1])}
    assert set(joined.join_for_decoding({"self_attn": attn})["self_attn"]) == set(attn)


@pytest.mark.parametrize("fused", [True, False])
def test_student_and_teacher_decode_the_same_with_joined_params(fused):
    config = _config()
    models = {"student": _student(fused), "teacher": Transformer(config)}
    prompt = jax.random.randint(jax.random.PRNGKey(2), (2, 7), 1, config.vocab_size)
    valid = jnp.asarray([[True] * 7, [False] * 2 + [True] * 5])
    for name, model in models.items():
        params = _params(model)
        out = {
            which: generate(model, p, prompt, valid_bt=valid, max_new_tokens=5)
            for which, p in (("original", params), ("joined", joined.join_for_decoding(params)))
        }
        np.testing.assert_array_equal(out["joined"]["tokens"], out["original"]["tokens"], name)
        logits = {
            which: model.apply({"params": p}, prompt, valid_bt=valid)[0]
            for which, p in (("original", params), ("joined", joined.join_for_decoding(params)))
        }
        assert rel_err(logits["joined"], logits["original"]) < 1e-5, name


def test_student_with_short_convolutions_decodes_the_same_with_joined_params():
    # its decoding steps take the sequence path (convolution, then the step): the folded input
    # norm's row scale reaches the joined product there too
    sc = StudentConfig.from_teacher(_config(), (0,), mixer="gdn", use_short_conv=True)
    model = sc.model(
        runtime=GDNRuntime(impl="chunked", decode_impl="xla"),
        attention_runtime=AttentionRuntime(decode_impl="xla"),
    )
    vocab = _config().vocab_size
    stored = greedy_steps({"m": model}, vocab, params_map=_draw_scales)["m"][0]
    steps = greedy_steps({"m": model}, vocab, params_map=_joined)["m"][0]
    assert rel_err(steps, stored) < 1e-5


def test_joined_params_through_the_few_row_kernel():
    # batch 1 decoding steps with every product of width >= 16 by the kernel (interpret mode):
    # the joined q|k|v|g and gate|up kernels are one product each
    models = {"xla": _student(gemv="xla"), "pallas": _student(gemv="pallas")}
    steps = greedy_steps(models, _config().vocab_size, rows=1, params_map=_joined)
    plain = greedy_steps(
        {"xla": _student(gemv="xla")}, _config().vocab_size, rows=1, params_map=_draw_scales
    )
    # attention layer: q|k|v and o; 2 GDN layers: q|k|v|g|a|b (padded) and o; 3 MLPs: gate|up
    # and down
    assert steps["pallas"][1] == 2 + 2 * 2 + 3 * 2
    assert rel_err(steps["pallas"][0], plain["xla"][0]) <= 2e-5
    assert rel_err(steps["xla"][0], plain["xla"][0]) <= 1e-5


def test_generation_joins_the_kernels_before_its_decoding_loop():
    # the cost this removes: a join inside the loop is a copy of the joined kernel per token
    model, d = _student(), _config().hidden_size
    prompt = jnp.ones((1, 5), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda p: generate(model, p, prompt, max_new_tokens=3)["tokens"])(
        _params(model)
    ).jaxpr

    def kernel_joins(eqns):  # concatenations of [D, ...] kernels
        return [e for e in eqns if any(v.aval.ndim == 2 and v.aval.shape[0] == d for v in e.invars)]

    loops = equations(jaxpr, "scan")
    assert loops
    assert not kernel_joins(
        [e for s in loops for e in equations(s.params["jaxpr"].jaxpr, "concatenate")]
    )
    # before the loop: gate|up of 3 MLPs, q|k|v|g|a|b of 2 GDN layers, q|k|v of the attention
    # layer
    assert len(kernel_joins(equations(jaxpr, "concatenate"))) == 3 + 2 + 1


def test_a_norm_read_by_two_joined_kernels_stays():
    # a block holding both mixers (the union params of a keep-set sweep): its input norm feeds
    # two joined kernels, so it stays and neither kernel is scaled; its MLP's norm still folds
    att = _params(Transformer(_config()))["layers_0"]
    gdn = _params(_student())["layers_1"]
    block = {**att, "gdn": gdn["gdn"]}
    out = joined.join_for_decoding(block)
    assert set(out) == {"input_layernorm", "self_attn", "gdn", "mlp"}
    kernels = [att["self_attn"][n]["kernel"] for n in ("q_proj", "k_proj", "v_proj")]
    np.testing.assert_array_equal(out["self_attn"]["qkv_kernel"], jnp.concatenate(kernels, 1))


def test_intermediates_of_folded_norms_are_refused():
    model = _student()
    params = _params(model)
    prompt = jnp.ones((1, 3), jnp.int32)
    with pytest.raises(ValueError, match="norms as stored"):
        model.apply({"params": joined.join_for_decoding(params)}, prompt, return_intermediates=True)


def _bf16_distances(rows, **runtimes):
    """(stored, joined): the relative distance of a bf16 student's greedy decoding steps to the
    float32 student's, with the params as stored and joined for decoding, and the Pallas
    launches of the joined step."""
    sc, vocab = StudentConfig.from_teacher(_config(), (0,), mixer="gdn"), _config().vocab_size
    ref = greedy_steps({"m": sc.model(jnp.float32, **runtimes)}, vocab, rows=rows,
                       params_map=_draw_scales)["m"][0]  # fmt: skip
    bf16 = {"m": sc.model(jnp.bfloat16, **runtimes)}
    stored = greedy_steps(bf16, vocab, rows=rows, params_map=_draw_scales)["m"][0]
    steps, calls = greedy_steps(bf16, vocab, rows=rows, params_map=_joined)["m"]
    far = [rel_err(x.astype(jnp.float32), ref) for x in (stored, steps)]
    return (*far, calls)


@pytest.mark.parametrize("rows", [1, 2])
def test_bf16_decoding_with_joined_params_is_as_close_to_float32(rows):
    # bf16 rounds the folded and the stored forms differently (about 2% of the largest logit
    # here, either way from the float32 model), so they are compared through float32: the
    # joined params must not take a bf16 student farther from it (measured: 0.9x)
    runtimes = {"runtime": GDNRuntime(impl="chunked", decode_impl="xla"),
                "attention_runtime": AttentionRuntime(decode_impl="xla")}  # fmt: skip
    stored, joined_, _ = _bf16_distances(rows, **runtimes)
    assert stored < 5e-2 and joined_ <= 1.25 * stored


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 2])
def test_compiled_bf16_student_decodes_the_same_with_joined_params_on_gpu(rows):
    # the GPU defaults in bf16 (the Pallas GDN step; at batch 1 the few-row kernel, here taking
    # the joined q|k|v|g|a|b product with float32 sums): joined params against the params as
    # stored (two products, the gate logits from float32 operands), both against the float32
    # student, as the test above
    stored, joined_, calls = _bf16_distances(rows)
    assert calls >= 1  # the Pallas GDN step (and, at batch 1, the few-row kernel) ran
    assert stored < 5e-2 and joined_ <= 1.25 * stored
