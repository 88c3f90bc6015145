"""Naive conversions: zero_gate == ablated teacher, GQA repetition, layout, copied parts."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import tiny_model_config

from taylorcal_jax.convert.naive import NAIVE_STRATEGIES, convert, copy_init
from taylorcal_jax.models.mixers import CONVERSIONS
from taylorcal_jax.models.mixers.gdn import SMALL_GATE_FACTOR, GDNConfig, GDNRuntime
from taylorcal_jax.models.student import StudentConfig
from taylorcal_jax.models.teacher import Transformer, init_params

REFERENCE = GDNRuntime(impl="reference")

H, HKV, HEAD, D = 4, 2, 8, 32


@functools.cache  # params are never modified in place
def _teacher(model_type="qwen2", layers=3):
    cfg = tiny_model_config(
        model_type=model_type,
        vocab_size=61,
        hidden_size=D,
        num_hidden_layers=layers,
        num_attention_heads=H,
        num_key_value_heads=HKV,
        head_dim=HEAD,
        attention_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
    )
    return cfg, jax.jit(init_params, static_argnums=0)(cfg, jax.random.PRNGKey(0))


def _tree_equal(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb, strict=True):
        assert x.dtype == y.dtype, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


@pytest.mark.parametrize("model_type,conv", [("qwen2", False), ("qwen3", True)])
def test_zero_gate_equals_teacher_without_converted_attention(model_type, conv):
    cfg, tparams = _teacher(model_type)
    sc = StudentConfig.from_teacher(cfg, (1,), mixer="gdn", use_short_conv=conv)
    sparams = NAIVE_STRATEGIES["zero_gate"](tparams, sc, jax.random.PRNGKey(1))
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 9), 0, cfg.vocab_size)
    valid = jnp.array([[True] * 9, [False] * 2 + [True] * 7])
    student = sc.model(runtime=REFERENCE)
    student_logits, _, _ = student.apply({"params": sparams}, tokens, valid_bt=valid)
    # Independent path: the all-attention teacher with the converted layers' o_proj zeroed.
    ablated = jax.tree_util.tree_map(lambda x: x, tparams)
    for i in sc.converted_layers:
        o = ablated[f"layers_{i}"]["self_attn"]["o_proj"]
        o["kernel"] = jnp.zeros_like(o["kernel"])
    teacher_logits, _, _ = Transformer(cfg).apply({"params": ablated}, tokens, valid_bt=valid)
    np.testing.assert_array_equal(np.asarray(student_logits), np.asarray(teacher_logits))
    # ... and the converted layers matter for the full teacher (the test can fail).
    full, _, _ = Transformer(cfg).apply({"params": tparams}, tokens, valid_bt=valid)
    assert np.abs(np.asarray(full - teacher_logits)).max() > 1e-3


def test_gqa_repetition_and_copied_parts():
    cfg, tparams = _teacher("qwen2")
    sc = StudentConfig.from_teacher(cfg, (1,), mixer="gdn")
    sparams = copy_init(tparams, sc, jax.random.PRNGKey(3))
    groups = H // HKV
    for i in sc.converted_layers:
        attn = tparams[f"layers_{i}"]["self_attn"]
        gdn = sparams[f"layers_{i}"]["gdn"]
        assert gdn["q_proj"]["kernel"] is attn["q_proj"]["kernel"]  # the teacher's own arrays
        assert gdn["o_proj"]["kernel"] is attn["o_proj"]["kernel"]
        for name in ("k_proj", "v_proj"):
            student = np.asarray(gdn[name]["kernel"]).reshape(D, H, HEAD)
            teacher = np.asarray(attn[name]["kernel"]).reshape(D, HKV, HEAD)
            for h in range(H):
                np.testing.assert_array_equal(student[:, h], teacher[:, h // groups])
        assert "self_attn" not in sparams[f"layers_{i}"]
        assert set(gdn) == {
            "q_proj", "k_proj", "v_proj", "a_proj", "b_proj", "g_proj", "o_proj",
            "A_log", "dt_bias", "o_norm",
        }  # fmt: skip
        a = np.exp(np.asarray(gdn["A_log"]))
        assert np.all((a > 0) & (a <= 16))
        dt = np.log1p(np.exp(np.asarray(gdn["dt_bias"], np.float64)))
        assert np.all((dt > 0.999e-3) & (dt < 1.001e-1))
        np.testing.assert_array_equal(gdn["o_norm"]["scale"], 1.0)
        bound = 1 / np.sqrt(D)
        assert np.abs(np.asarray(gdn["g_proj"]["kernel"])).max() <= bound
        assert np.asarray(gdn["g_proj"]["kernel"]).std() > 0.3 * bound
    # Kept layer and the shared parts are the teacher's, unchanged.
    _tree_equal(sparams["layers_1"], tparams["layers_1"])
    for i in sc.converted_layers:
        for part in ("input_layernorm", "post_attention_layernorm", "mlp"):
            _tree_equal(sparams[f"layers_{i}"][part], tparams[f"layers_{i}"][part])
    for part in ("embed_tokens", "norm", "lm_head"):
        _tree_equal(sparams[part], tparams[part])


@pytest.mark.parametrize("conv", [False, True])
def test_layout_matches_student_model_init(conv):
    cfg, tparams = _teacher("llama", layers=2)
    sc = StudentConfig.from_teacher(cfg, (1,), mixer="gdn", use_short_conv=conv)
    assert tuple(NAIVE_STRATEGIES) == CONVERSIONS
    init = jax.eval_shape(
        lambda: sc.model().init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32))["params"]
    )
    for name, fn in NAIVE_STRATEGIES.items():
        sparams = fn(tparams, sc, jax.random.PRNGKey(4))
        shapes = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), sparams)
        expected = jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), init)
        assert shapes == expected, name


def test_gate_variants_and_conv_identity():
    cfg, tparams = _teacher("llama", layers=2)
    sc = StudentConfig.from_teacher(cfg, (), mixer="gdn", use_short_conv=True)
    rng = jax.random.PRNGKey(5)
    base = copy_init(tparams, sc, rng)
    small = NAIVE_STRATEGIES["small_gate"](tparams, sc, rng)
    zero = NAIVE_STRATEGIES["zero_gate"](tparams, sc, rng)
    for i in (0, 1):
        g = np.asarray(base[f"layers_{i}"]["gdn"]["g_proj"]["kernel"])
        np.testing.assert_allclose(
            small[f"layers_{i}"]["gdn"]["g_proj"]["kernel"], g * SMALL_GATE_FACTOR, rtol=1e-7
        )
        np.testing.assert_array_equal(zero[f"layers_{i}"]["gdn"]["g_proj"]["kernel"], 0.0)
        conv = np.asarray(base[f"layers_{i}"]["gdn"]["q_conv"]["kernel"])
        np.testing.assert_array_equal(conv[-1], 1.0)
        np.testing.assert_array_equal(conv[:-1], 0.0)
    # Different layers get different random gates; the same rng gives the same params.
    assert not np.allclose(
        base["layers_0"]["gdn"]["a_proj"]["kernel"], base["layers_1"]["gdn"]["a_proj"]["kernel"]
    )
    _tree_equal(copy_init(tparams, sc, rng), base)
    # Short conv initialised to identity: same logits as the conv-free student.
    sc_plain = StudentConfig.from_teacher(cfg, (), mixer="gdn")
    plain = copy_init(tparams, sc_plain, rng)
    tokens = jax.random.randint(jax.random.PRNGKey(6), (1, 6), 0, cfg.vocab_size)
    a, _, _ = jax.jit(sc.model(runtime=REFERENCE).apply)({"params": base}, tokens)
    b, _, _ = jax.jit(sc_plain.model(runtime=REFERENCE).apply)({"params": plain}, tokens)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_errors():
    cfg, tparams = _teacher("llama", layers=2)
    bad = StudentConfig(cfg, (0,), GDNConfig(num_heads=2, head_k_dim=HEAD, head_v_dim=HEAD))
    with pytest.raises(ValueError, match="GDN heads/dims equal to the teacher"):
        copy_init(tparams, bad, jax.random.PRNGKey(0))
    sc = StudentConfig.from_teacher(cfg, (0,), mixer="gdn")
    student = copy_init(tparams, sc, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="not a student's"):
        copy_init(student, sc, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="unknown conversion 'random'"):
        convert("random", tparams, sc, jax.random.PRNGKey(0))


def test_hf_qwen2_checkpoint_gqa_order_and_zero_gate(tmp_path):
    """On a real transformers checkpoint (non-zero q/k/v biases, GQA): the GDN k/v head blocks
    are HF's kv heads in `repeat_kv` order (read from the file, not through our loader), and
    zero_gate still equals the teacher with those attention sublayers removed."""
    from hf_factory import make_tiny_checkpoint

    from taylorcal_jax.models import hf_io
    from taylorcal_jax.models.safetensors_io import read_tensors

    path = make_tiny_checkpoint(tmp_path, "qwen2", num_hidden_layers=2)
    cfg, tparams = hf_io.load_pretrained(path)
    h, d, groups = cfg.num_attention_heads, cfg.head_dim, cfg.num_kv_groups
    assert groups > 1 and cfg.attention_bias
    sc = StudentConfig.from_teacher(cfg, (0,), mixer="gdn")
    student = NAIVE_STRATEGIES["zero_gate"](tparams, sc, jax.random.PRNGKey(0))
    raw = read_tensors(path / "model.safetensors")
    for name in ("k_proj", "v_proj"):
        w = raw[f"model.layers.1.self_attn.{name}.weight"]  # [Hkv*d, D]
        kernel = np.asarray(student["layers_1"]["gdn"][name]["kernel"])  # [D, H*d]
        for head in range(h):
            j = head // groups
            np.testing.assert_array_equal(
                kernel[:, head * d : (head + 1) * d], w[j * d : (j + 1) * d].T
            )
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 7), 0, cfg.vocab_size)
    logits, _, _ = sc.model(runtime=REFERENCE).apply({"params": student}, tokens)
    ablated = jax.tree_util.tree_map(lambda x: x, tparams)
    o = ablated["layers_1"]["self_attn"]["o_proj"]
    o["kernel"] = jnp.zeros_like(o["kernel"])
    ref, _, _ = Transformer(cfg).apply({"params": ablated}, tokens)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(ref))


def test_a_bf16_teacher_gives_float32_mixers_that_phase_2_trains_like_a_float32_one():
    """From a bf16 checkpoint, AdamW's small steps on bf16 mixer weights would round away."""
    import sys

    from taylorcal_jax.calibrate import align, select, taylor
    from taylorcal_jax.calibrate import stats as stats_lib
    from taylorcal_jax.models.mixers import StudentMixer
    from taylorcal_jax.utils import sharding

    sys.path.insert(0, "configs")
    import common

    cfg = tiny_model_config(num_hidden_layers=2, vocab_size=64)
    bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), init_params(cfg, jax.random.PRNGKey(0)))
    f32 = jax.tree.map(lambda a: a.astype(jnp.float32), bf16)  # the same values
    tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 32), 0, 64)
    stats = stats_lib.collect(Transformer(cfg), f32, cfg, tokens, block_size=8)
    mixer = StudentMixer(GDNConfig.from_teacher(cfg), GDNRuntime(impl="chunked", chunk_size=8))
    ctx = select.CalibrationContext(
        cfg,
        mixer,
        taylor.TaylorConstants.from_config(common.get_config().calibration),
        align.AlignConfig(
            steps=20,
            lr_qkv=1e-4,
            lr_gates=1e-3,
            weight_decay=0.01,
            clip_norm=1.0,
            checkpoint_every=0,
        ),
        sharding.make_mesh({"layers": 1, "data": 1}, jax.devices()[:1]),
        0,
    )
    out = {}
    for name, teacher in (("bf16", bf16), ("f32", f32)):
        for strategy in ("copy", "taylor_calibrate"):
            student, _ = select.initial_student(strategy, teacher, stats, ctx)
            dtypes = {str(x.dtype) for x in jax.tree.leaves(student["layers_0"]["gdn"])}
            assert dtypes == {"float32"}, (name, strategy)
        out[name] = select.aligned_student("taylor_calibrate", student, stats, ctx)
    (p16, r16), (p32, r32) = out["bf16"], out["f32"]
    np.testing.assert_allclose(r16["align"]["loss_after"], r32["align"]["loss_after"], rtol=1e-5)
    for a, b in zip(
        jax.tree.leaves(p16["layers_0"]["gdn"]),
        jax.tree.leaves(p32["layers_0"]["gdn"]),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
