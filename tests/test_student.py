"""Hybrid student: config validation, decoding on the mixed cache, padding, directory I/O."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import tiny_model_config

from taylorcal_jax.convert.naive import copy_init
from taylorcal_jax.models.config import RopeConfig
from taylorcal_jax.models.mixers import MIXERS
from taylorcal_jax.models.mixers.gdn import GDNConfig, GDNRuntime
from taylorcal_jax.models.student import (
    STUDENT_CONFIG_FILE,
    StudentConfig,
    load_student,
    save_student,
)
from taylorcal_jax.models.teacher import init_cache, init_params

REFERENCE = GDNRuntime(impl="reference")


def _config(model_type="qwen2", layers=3, **kw):
    return tiny_model_config(
        model_type=model_type,
        vocab_size=53,
        num_hidden_layers=layers,
        attention_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        **kw,
    )


@functools.cache  # params are never modified in place
def _params(cfg):
    return jax.jit(init_params, static_argnums=0)(cfg, jax.random.PRNGKey(0))


def _student(conv, keep=(1,), model_type="qwen2", layers=2, **kw):
    cfg = _config(model_type, layers, **kw)
    tparams = _params(cfg)
    sc = StudentConfig.from_teacher(cfg, keep, mixer="gdn", use_short_conv=conv)
    params = copy_init(tparams, sc, jax.random.PRNGKey(1))
    # Larger gates than the standard init so the GDN layers matter in the logits.
    for i in sc.converted_layers:
        gdn = params[f"layers_{i}"]["gdn"]
        gdn["g_proj"] = {"kernel": gdn["g_proj"]["kernel"] * 4}
    return sc, params


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


# ------------------------------------------------------------------ config


def test_mixers_and_converted_layers():
    cfg = _config(layers=4)
    sc = StudentConfig.from_teacher(cfg, [0, 3], mixer="gdn")
    assert sc.keep_full_attention_layers == (0, 3)
    assert sc.mixers == ("attention", "gdn", "gdn", "attention")
    assert sc.converted_layers == (1, 2)
    assert sc.mixer_name == "gdn"
    assert sc.mixer_config.num_heads == 4
    assert sc.mixer_config.head_k_dim == sc.mixer_config.head_v_dim == 8
    assert hash(sc) == hash(StudentConfig.from_teacher(cfg, (0, 3), mixer="gdn"))
    assert sc.model(runtime=REFERENCE).student_mixer.runtime == REFERENCE
    assert sc.model().student_mixer.runtime == GDNRuntime()


@pytest.mark.parametrize(
    "keep,match",
    [
        ((0, 3), r"out of range: the teacher has 3 layers"),
        ((-1,), r"out of range"),
        ((1, 1), r"duplicates \[1\]"),
        ((2, 0), r"sorted ascending.*use \[0, 2\]"),
        ((0.0,), r"must hold ints"),
        ("01", r"sequence of layer indices"),
        (2, r"sequence of layer indices"),
    ],
)
def test_bad_keep_lists(keep, match):
    cfg = _config()
    with pytest.raises(ValueError, match=match):
        StudentConfig(cfg, keep, GDNConfig.from_teacher(cfg))


def test_bad_mixer_is_rejected():
    cfg = _config()
    with pytest.raises(ValueError, match="not the architecture config of a student mixer"):
        StudentConfig(cfg, (0,), GDNRuntime())
    with pytest.raises(ValueError, match="unknown student mixer 'mamba2'"):
        StudentConfig.from_teacher(cfg, (0,), mixer="mamba2")


def test_config_json_round_trip():
    cfg = _config(
        "qwen3",
        layers=2,
        rope=RopeConfig(theta=5e5, rope_type="yarn", factor=4.0, mscale=1.5),
        sliding_windows=(None, 16),
        tie_word_embeddings=True,
        eos_token_id=3,
    )
    sc = StudentConfig.from_teacher(
        cfg,
        (1,),
        mixer="gdn",
        teacher_path="/ckpt/t",
        use_short_conv=True,
        conv_size=3,
        norm_eps=1e-6,
    )
    saved = json.loads(json.dumps(sc.to_dict()))
    assert saved["layer_mixers"] == ["gdn", "attention"]
    assert StudentConfig.from_dict(saved) == sc
    assert not _runtime_keys(saved)
    # several end ids (Llama 3.x Instruct) come back as the tuple of a hashable config
    several = dataclasses.replace(sc, teacher=dataclasses.replace(cfg, eos_token_id=(3, 5)))
    back = StudentConfig.from_dict(json.loads(json.dumps(several.to_dict())))
    assert back == several and back.teacher.end_token_ids == (3, 5)
    hash(back.model())
    bad = {**sc.to_dict(), "version": 99}
    with pytest.raises(ValueError, match="version 99 is not supported"):
        StudentConfig.from_dict(bad)
    two = {**saved, "mixer_configs": {**saved["mixer_configs"], "other": {}}}
    with pytest.raises(ValueError, match="one kind of student mixer"):
        StudentConfig.from_dict(two)
    short = {**saved, "layer_mixers": ["gdn"]}
    with pytest.raises(ValueError, match="1 entries for 2 layers"):
        StudentConfig.from_dict(short)
    stray = {**saved, "layer_mixers": ["mamba2", "attention"]}
    with pytest.raises(ValueError, match=r"layer_mixers name \['mamba2'\]"):
        StudentConfig.from_dict(stray)


def _runtime_keys(tree) -> set:
    """Keys anywhere in a JSON tree that name a runtime option of some mixer."""
    runtime = {f for spec in MIXERS.values() for f in spec.runtime_fields}
    found = set()
    if isinstance(tree, dict):
        found |= set(tree) & runtime
        for v in tree.values():
            found |= _runtime_keys(v)
    elif isinstance(tree, list):
        for v in tree:
            found |= _runtime_keys(v)
    return found


def test_version_1_config_is_read_and_its_runtime_fields_ignored():
    """A student_config.json written before runtime options left the saved config."""
    cfg = _config(layers=3)
    new = StudentConfig.from_teacher(cfg, (0, 2), mixer="gdn", use_short_conv=True)
    v1 = {
        "format": "taylorcal_student",
        "version": 1,
        "teacher_path": None,
        "teacher_config": new.to_dict()["teacher_config"],
        "keep_full_attention_layers": [0, 2],
        "gdn": {
            **new.mixer_config.to_dict(),
            "impl": "pallas",
            "chunk_size": 32,
            "pallas_residuals": "t",
        },
    }
    assert StudentConfig.from_dict(json.loads(json.dumps(v1))) == new


# ------------------------------------------------------------------ decoding and padding


@pytest.mark.parametrize("conv", [False, True])
def test_decode_step_by_step_equals_full_forward(conv):
    sc, params = _student(conv)
    model = sc.model(runtime=REFERENCE)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 8), 0, sc.teacher.vocab_size)
    full, _, _ = jax.jit(model.apply)({"params": params}, tokens)
    apply = jax.jit(lambda t, c: model.apply({"params": params}, t, cache=c)[:2])
    cache = init_cache(model, 2, 8)
    logits, cache = apply(tokens[:, :3], cache)
    outs = [logits]
    for i in range(3, 8):
        logits, cache = apply(tokens[:, i : i + 1], cache)
        outs.append(logits)
    assert _rel(jnp.concatenate(outs, axis=1), full) < 1e-5
    assert cache["layers_0"]["state"].shape == (2, 4, 8, 8)


@pytest.mark.parametrize("conv", [False, True])
def test_left_padding_equals_each_sequence_alone(conv):
    sc, params = _student(conv)
    model = sc.model(runtime=REFERENCE)
    v = sc.teacher.vocab_size
    seqs = [np.arange(7) % v + 5, np.arange(4) % v + 11]
    t = 7
    tokens = np.zeros((2, t), np.int32)
    valid = np.zeros((2, t), bool)
    for i, s in enumerate(seqs):
        tokens[i, t - len(s) :] = s
        valid[i, t - len(s) :] = True
    tokens[1, :3] = 40  # padding content must not matter
    cache = init_cache(model, 2, t + 2)
    logits, cache, _ = jax.jit(model.apply)(
        {"params": params}, jnp.asarray(tokens), valid_bt=jnp.asarray(valid), cache=cache
    )
    nxt = jnp.array([[7], [9]])
    step, _, _ = jax.jit(model.apply)({"params": params}, nxt, cache=cache)
    # The padded row against the same sequence alone (one forward over prompt + next token).
    alone, _, _ = jax.jit(model.apply)({"params": params}, jnp.asarray(np.append(seqs[1], 9))[None])
    assert _rel(logits[1, t - len(seqs[1]) :], alone[0, :-1]) < 1e-5
    assert _rel(step[1], alone[0, -1:]) < 1e-5
    # The unpadded row is unaffected by its neighbour's padding: against a batch of one.
    solo, _, _ = jax.jit(model.apply)({"params": params}, jnp.asarray(tokens[:1]))
    assert _rel(logits[0], solo[0]) < 1e-5


# ------------------------------------------------------------------ directories


def _tree_equal(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb, strict=True):
        assert x.dtype == y.dtype, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


@pytest.mark.parametrize("conv,tied", [(False, False), (True, True)])
def test_save_load_round_trip_exact(tmp_path, conv, tied):
    sc, params = _student(conv, keep=(0, 2), model_type="llama", layers=3, tie_word_embeddings=tied)
    sc = dataclasses.replace(sc, teacher_path="/somewhere/teacher")
    # Mixed dtypes survive as stored.
    params["layers_1"]["gdn"]["v_proj"]["kernel"] = params["layers_1"]["gdn"]["v_proj"][
        "kernel"
    ].astype(jnp.bfloat16)
    root = save_student(tmp_path / "student", sc, params)
    assert (root / STUDENT_CONFIG_FILE).exists() and (root / "config.json").exists()
    assert not _runtime_keys(json.loads((root / STUDENT_CONFIG_FILE).read_text()))
    sc2, params2 = load_student(root)
    assert sc2 == sc
    _tree_equal(params2, params)
    tokens = jnp.arange(6)[None] % sc.teacher.vocab_size
    a, _, _ = jax.jit(sc.model(runtime=REFERENCE).apply)({"params": params}, tokens)
    b, _, _ = jax.jit(sc2.model(runtime=REFERENCE).apply)({"params": params2}, tokens)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_save_load_errors(tmp_path):
    sc, params = _student(False)
    other = StudentConfig.from_teacher(sc.teacher, (0,), mixer="gdn")
    with pytest.raises(
        ValueError, match=r"missing \['layers_0/self_attn.*unexpected \['layers_0/gdn"
    ):
        save_student(tmp_path / "x", other, params)
    # a union of both mixers in every layer (as keep_l runs initialise) was written, and then
    # refused by load_student
    union = {
        **params,
        "layers_0": {**params["layers_0"], "self_attn": params["layers_1"]["self_attn"]},
    }
    with pytest.raises(ValueError, match=r"unexpected \['layers_0/self_attn"):
        save_student(tmp_path / "x", sc, union)
    assert not (tmp_path / "x").exists()
    with pytest.raises(FileNotFoundError, match="student dir"):
        load_student(tmp_path)
