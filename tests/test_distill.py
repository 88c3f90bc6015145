"""Distillation: stage 1 (per-layer, teacher-forced) and stage 2 (chunked KL) on the training
loop, each against a reference computed here; learning, 8 simulated devices == one device,
resume == uninterrupted (bit-identical on the CPU). Both stages from taylorcal_jax.main:
tests/test_main.py."""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxpr_testing import equations
from tiny_models import tiny_model_config

from taylorcal_jax.calibrate import select
from taylorcal_jax.calibrate.stacking import stack_mixers
from taylorcal_jax.data import packing
from taylorcal_jax.models.layers import AttentionRuntime
from taylorcal_jax.models.mixers import StudentMixer
from taylorcal_jax.models.mixers.gdn import GDNConfig, GDNRuntime
from taylorcal_jax.models.paths import layer_key, layer_mixer
from taylorcal_jax.models.student import StudentConfig
from taylorcal_jax.models.teacher import Transformer, init_params
from taylorcal_jax.train import distill, distill_layers, kl, layerwise, loop, optim
from taylorcal_jax.train.distill_stages import STAGE_KL, STAGE_LAYERS, Budget, batch_seed
from taylorcal_jax.utils import sharding

MC = tiny_model_config(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    max_position_embeddings=64,
)
GDN = StudentMixer(GDNConfig.from_teacher(MC), GDNRuntime(impl="chunked", chunk_size=8))
SC = StudentConfig(MC, (0,), GDN.config)  # layers 1 and 2 converted
LAYERS = SC.converted_layers
TEACHER = init_params(MC, jax.random.PRNGKey(0))
STREAM = np.random.default_rng(0).integers(0, MC.vocab_size, 3000).astype(np.int32)
B, T = 8, 16
ONE = sharding.make_mesh({"layers": 1, "data": 1}, jax.devices()[:1])


def _student():
    mixers = {
        i: GDN.spec.conversion("copy")(
            layer_mixer(TEACHER, i, "attention"), MC, GDN.config, jax.random.PRNGKey(i)
        )
        for i in LAYERS
    }
    return select.assemble_student(TEACHER, mixers, SC)


STUDENT = _student()
BATCHES = loop.StreamBatches(functools.partial(packing.train_batch, STREAM, B, T, 0))
FIXED = jnp.asarray(packing.train_batch(STREAM, B, T, 7, 0))  # held out from the run's batches


def _max_rel_err(a, b):
    errs = jax.tree.map(
        lambda x, y: float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-12)), a, b
    )
    return max(jax.tree.leaves(errs))


@functools.cache
def _loss_and_grad(task):
    """Jitted params -> (loss on FIXED, its gradient) of a task."""
    return jax.jit(jax.value_and_grad(lambda p: task.loss_fn(p, FIXED, None, TEACHER)[0]))


def _loss(task, params) -> float:
    return float(_loss_and_grad(task)(params)[0])


def _run(task, params, steps, *, mesh=ONE, ckpt=None, stop=None):
    opts = loop.LoopOptions(
        steps=steps, steps_per_call=1, log_every=1, eval_every=0, checkpoint_every=3, desc="t"
    )
    state = loop.init_state(task, params, rng=jax.random.PRNGKey(0))
    result = loop.run(
        task,
        state,
        BATCHES,
        opts,
        mesh=mesh,
        checkpoint_dir=ckpt,
        constants=TEACHER,
        stop_after_steps=stop,
    )
    return None if result is None else jax.device_get(result.state)


# --------------------------------------------------------------------------- stage 1

LAYER_CFG = distill_layers.LayerDistillConfig(
    steps=8,
    learning_rate=3e-2,
    warmup_steps=2,
    min_lr_ratio=0.1,
    weight_decay=0.0,
    clip_norm=1.0,
    dtype="float32",
    remat=False,
)


def _stacked(mesh):
    pad = layerwise.layer_padding(len(LAYERS), mesh)
    return layerwise.pad_layers(stack_mixers(STUDENT, LAYERS, GDN.name), pad)


def test_stage1_loss_is_the_mean_per_token_rms_error_of_the_converted_layers():
    task = distill_layers.make_task(MC, GDN, LAYERS, LAYER_CFG, ONE)
    got, aux = jax.jit(task.loss_fn)(_stacked(ONE), FIXED, None, TEACHER)
    forward = jax.jit(functools.partial(Transformer(MC).apply, return_intermediates=True))
    _, _, inters = forward({"params": TEACHER}, FIXED)
    want = []
    for i in LAYERS:
        x = inters[layer_key(i)]["attn_in"]
        y = np.asarray(inters[layer_key(i)]["attn_out"], np.float64)
        out, _, _ = jax.jit(GDN.module(MC).apply)({"params": layer_mixer(STUDENT, i, GDN.name)}, x)
        err = np.asarray(out, np.float64) - y
        want.append(np.mean(np.sqrt(np.sum(err**2, axis=-1) / MC.hidden_size)))
    np.testing.assert_allclose(aux["layer_loss"], want, rtol=1e-5)
    np.testing.assert_allclose(got, np.mean(want), rtol=1e-5)
    # a zero error has loss 0 and gradient 0 (not the NaN of sqrt at 0)
    y = jnp.ones((2, 3, 4))
    g = jax.grad(lambda o: distill_layers.rms_error(o, y, jnp.ones((2, 3), bool)))(y)
    assert float(distill_layers.rms_error(y, y, jnp.ones((2, 3), bool))) == 0.0
    assert np.all(np.asarray(g) == 0.0)


def test_stage1_learns_and_remat_changes_nothing():
    task = distill_layers.make_task(MC, GDN, LAYERS, LAYER_CFG, ONE)
    remat = dataclasses.replace(LAYER_CFG, remat=True)
    task_remat = distill_layers.make_task(MC, GDN, LAYERS, remat, ONE)
    params = _stacked(ONE)
    before = _loss(task, params)
    trained = _run(task, params, LAYER_CFG.steps).params
    after = _loss(task, trained)
    assert after < 0.8 * before, (before, after)
    # every mixer param trains, o_proj included (alignment keeps it frozen)
    assert _max_rel_err(trained["o_proj"], params["o_proj"]) > 0
    grads = [_loss_and_grad(t)(params)[1] for t in (task, task_remat)]
    assert _max_rel_err(grads[1], grads[0]) < 1e-6


@pytest.mark.parametrize("axes", [{"layers": 8, "data": 1}, {"layers": 2, "data": 4}])
def test_stage1_on_eight_devices_equals_one_device(axes):
    mesh = sharding.make_mesh(axes)
    steps = 4
    one = _run(distill_layers.make_task(MC, GDN, LAYERS, LAYER_CFG, ONE), _stacked(ONE), steps)
    split = _run(
        distill_layers.make_task(MC, GDN, LAYERS, LAYER_CFG, mesh), _stacked(mesh), steps, mesh=mesh
    )
    real = jax.tree.map(lambda a: a[: len(LAYERS)], split.params)
    assert _max_rel_err(real, one.params) < 1e-5


def test_stage1_resume_after_interrupt_is_bit_identical(tmp_path):
    task = distill_layers.make_task(MC, GDN, LAYERS, LAYER_CFG, ONE)
    full = _run(task, _stacked(ONE), 8, ckpt=str(tmp_path / "a"))
    assert _run(task, _stacked(ONE), 8, ckpt=str(tmp_path / "b"), stop=5) is None
    assert sorted(os.listdir(tmp_path / "b")) == ["3"]
    resumed = _run(task, _stacked(ONE), 8, ckpt=str(tmp_path / "b"))
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(full), strict=True):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- stage 2

KL_CFG = distill.KLDistillConfig(
    lr_mixer=1e-2, lr_rest=1e-3, warmup_steps=0, weight_decay=0.0, clip_norm=1.0, chunk_size=5
)


def _models(chunked_student=SC):
    return chunked_student.model(runtime=GDN.runtime), Transformer(MC)


def _reference_kl(student_model, params):
    """KL(teacher || student) averaged over all positions, from the whole logits."""
    logits_s, _, _ = student_model.apply({"params": params}, FIXED)
    logits_t, _, _ = Transformer(MC).apply({"params": TEACHER}, FIXED)
    logp = jax.nn.log_softmax(logits_t, axis=-1)
    logq = jax.nn.log_softmax(logits_s, axis=-1)
    return jnp.mean(jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1))


def test_the_two_stages_cut_their_windows_at_unrelated_offsets():
    """Under one seed, step s of stage 1 (short windows) and of stage 2 (long ones) start at
    about the same offsets, so stage 2 would begin over stage 1's text."""
    stream = np.arange(1_000_000, dtype=np.int32)  # a token's value is its offset

    def starts(seed, seq_len):
        return np.concatenate(
            [packing.train_batch(stream, 8, seq_len, seed, s)[:, 0] for s in range(4)]
        )

    same = np.abs(starts(0, 512).astype(np.int64) - starts(0, 2048))
    assert same.max() < 2048  # the offsets nearly coincide
    a, b = starts(batch_seed(0, STAGE_LAYERS), 512), starts(batch_seed(0, STAGE_KL), 2048)
    assert np.median(np.abs(a.astype(np.int64) - b)) > 10_000
    assert batch_seed(0, STAGE_LAYERS) == batch_seed(0, STAGE_LAYERS) != batch_seed(1, STAGE_LAYERS)


def test_kl_is_zero_when_the_student_keeps_every_layer():
    every = StudentConfig(MC, (0, 1, 2), GDN.config)
    student, teacher = _models(every)
    kl_loss = jax.jit(functools.partial(distill.kl_loss, student, teacher, chunk=5))
    total, count = kl_loss(TEACHER, TEACHER, FIXED)
    assert int(count) == B * T
    assert abs(float(total / count)) < 1e-7


def test_chunked_kl_equals_the_unchunked_kl_and_its_gradient():
    student, teacher = _models()

    def chunked(params, chunk):
        total, count = distill.kl_loss(student, teacher, params, TEACHER, FIXED, chunk=chunk)
        return total / count

    want, g_want = jax.jit(jax.value_and_grad(lambda p: _reference_kl(student, p)))(STUDENT)
    assert float(want) > 1e-3  # the converted student differs from the teacher
    for chunk in (5,):  # three chunks, the last one padded
        got, g_got = jax.jit(jax.value_and_grad(chunked), static_argnums=1)(STUDENT, chunk)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        assert _max_rel_err(g_got, g_want) < 1e-4
    with pytest.raises(ValueError, match="chunk length must be positive"):
        kl.kl_sum(
            jnp.zeros((1, 2, 3)),
            jnp.zeros((3, 4)),
            jnp.zeros((1, 2, 3)),
            jnp.zeros((3, 4)),
            jnp.ones((1, 2), bool),
            chunk=0,
        )


def _plain_kl_sum(h_t, w_t, h_s, w_s, valid):
    """The KL sum from whole float32 logits, differentiated by JAX."""
    logp = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", h_t, w_t), -1)
    logq = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", h_s, w_s), -1)
    return jnp.sum(jnp.where(valid, jnp.sum(jnp.exp(logp) * (logp - logq), -1), 0.0))


def test_kl_gradient_formed_in_the_forward_pass_matches_autodiff_and_runs_in_bf16():
    # masked positions and a padded last chunk; the teacher's inputs get zero gradients
    ks = jax.random.split(jax.random.PRNGKey(3), 4)
    h_t, h_s = (jax.random.normal(k, (2, 5, 16)) for k in ks[:2])
    w_t, w_s = (jax.random.normal(k, (16, 40)) * 0.5 for k in ks[2:])
    valid = jnp.array([[1, 1, 1, 0, 1], [1, 0, 1, 1, 1]], bool)
    args = (h_t, w_t, h_s, w_s, valid)

    def total(h_t_, w_t_, h_s_, w_s_, chunk):
        return kl.kl_sum(h_t_, w_t_, h_s_, w_s_, valid, chunk=chunk)[0]

    want, g_want = jax.value_and_grad(_plain_kl_sum, argnums=(2, 3))(*args)
    for chunk in (2, 5):
        got, g_got = jax.value_and_grad(total, argnums=(0, 1, 2, 3))(*args[:4], chunk)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        assert _max_rel_err(g_got[2:], g_want) < 1e-5
        assert not np.any(g_got[0]) and not np.any(g_got[1])
    assert float(jax.jit(total, static_argnums=4)(*args[:4], 2)) == pytest.approx(float(want))

    # bf16 operands over float32 master weights: the four head products per chunk (teacher,
    # student, dh, dW) all take bf16 operands; the gradients come back in the inputs' dtypes,
    # within bf16 rounding of the float32 ones
    h16_t, h16_s = h_t.astype(jnp.bfloat16), h_s.astype(jnp.bfloat16)
    grad16 = jax.grad(total, argnums=(2, 3))
    jaxpr = jax.make_jaxpr(grad16, static_argnums=4)(h16_t, w_t, h16_s, w_s, 2)
    dots = equations(jaxpr.jaxpr, "dot_general")
    assert len(dots) == 4
    assert all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
    g16 = grad16(h16_t, w_t, h16_s, w_s, 2)
    assert g16[0].dtype == jnp.bfloat16 and g16[1].dtype == jnp.float32
    g32 = jax.grad(_plain_kl_sum, argnums=(2, 3))(
        h16_t.astype(jnp.float32), w_t, h16_s.astype(jnp.float32), w_s, valid
    )
    assert _max_rel_err(jax.tree.map(lambda x: x.astype(jnp.float32), g16), g32) < 2e-2


def test_stage2_groups_learn_and_bf16_compute_keeps_fp32_masters():
    labels = distill.mixer_labels(GDN.name)(STUDENT)
    groups = {jax.tree_util.keystr(k): g for k, g in jax.tree_util.tree_leaves_with_path(labels)}
    assert all((g == "mixer") == ("'gdn'" in k) for k, g in groups.items())
    assert sum(g == "mixer" for g in groups.values()) == 2 * len(STUDENT[layer_key(1)]["gdn"])
    student, teacher = _models()
    task = distill.make_task(student, teacher, GDN.name, KL_CFG, ONE)
    before = _loss(task, STUDENT)
    trained = _run(task, STUDENT, 8).params
    after = _loss(task, trained)
    assert after < 0.8 * before, (before, after)
    # bf16 compute (remat on) over float32 params: float32 gradients for the float32 masters
    s16 = student.clone(dtype=jnp.bfloat16, remat=True)
    t16 = teacher.clone(dtype=jnp.bfloat16)
    task16 = distill.make_task(s16, t16, GDN.name, KL_CFG, ONE)
    loss16, grads16 = _loss_and_grad(task16)(STUDENT)
    assert {a.dtype for a in jax.tree.leaves(grads16)} == {np.dtype(np.float32)}
    np.testing.assert_allclose(float(loss16), before, rtol=0.1)


def test_stage2_groups_take_their_own_learning_rates():
    """Adam's first update is -lr g / (|g| + eps), i.e. -lr per element for a gradient of ones
    (to 1e-5: eps = 1e-8 and float32 bias corrections, 1 - 0.999 losing ~7e-6), so each leaf
    moves by its group's rate, tolerance 1e-4 (the other group's is 10x off). KL_CFG has
    no warm-up (a constant schedule: the full rate at step 0), no weight decay, and rates 10x
    apart (1e-2 mixer, 1e-3 rest); a clip norm far above the gradient's global norm
    (sqrt(#params)) leaves the gradient as it is."""
    student, teacher = _models()
    cfg = dataclasses.replace(KL_CFG, clip_norm=1e9)
    assert cfg.warmup_steps == 0 and cfg.weight_decay == 0.0
    assert cfg.lr_mixer != cfg.lr_rest
    opt = distill.make_task(student, teacher, GDN.name, cfg, ONE).optimizer
    ones = jax.tree.map(jnp.ones_like, STUDENT)
    updates, _ = opt.update(ones, opt.init(STUDENT), STUDENT)
    seen = set()
    for path, u in jax.tree_util.tree_leaves_with_path(updates):
        name = jax.tree_util.keystr(path)
        mixer = "'gdn'" in name  # the converted layers' mixers, as the test above states
        seen.add(mixer)
        lr = cfg.lr_mixer if mixer else cfg.lr_rest
        np.testing.assert_allclose(u, -lr, rtol=1e-4, err_msg=name)
    assert seen == {True, False}  # leaves of both groups


@pytest.mark.parametrize(
    "axes", [{"layers": 1, "data": 8, "fsdp": 1}, {"layers": 1, "data": 2, "fsdp": 4}]
)
def test_stage2_on_eight_devices_equals_one_device(axes):
    """Data parallel, and FSDP: params and Adam moments stored split over "fsdp"."""
    student, teacher = _models()
    mesh = sharding.make_mesh(axes)
    spec = sharding.param_spec(mesh)
    one = _run(distill.make_task(student, teacher, GDN.name, KL_CFG, ONE), STUDENT, 3)
    task = distill.make_task(student, teacher, GDN.name, KL_CFG, mesh, spec)
    opts = loop.LoopOptions(
        steps=3, steps_per_call=1, log_every=1, eval_every=0, checkpoint_every=0, desc="t"
    )
    state = loop.init_state(task, STUDENT, rng=jax.random.PRNGKey(0))
    split = loop.run(task, state, BATCHES, opts, mesh=mesh, constants=TEACHER).state
    assert _max_rel_err(jax.device_get(split.params), one.params) < 1e-5
    embed = split.params["embed_tokens"]["embedding"]
    stored = max(s.data.size for s in embed.addressable_shards)
    assert stored * axes["fsdp"] == embed.size  # each device holds 1/fsdp of the table
    mu = [x for x in jax.tree.leaves(split.opt_state) if np.shape(x) == embed.shape]
    assert mu and all(
        max(s.data.size for s in m.addressable_shards) * axes["fsdp"] == m.size for m in mu
    )


def test_stage2_resume_after_interrupt_is_bit_identical(tmp_path):
    student, teacher = _models()
    task = distill.make_task(student, teacher, GDN.name, KL_CFG, ONE)
    full = _run(task, STUDENT, 7, ckpt=str(tmp_path / "a"))
    assert _run(task, STUDENT, 7, ckpt=str(tmp_path / "b"), stop=4) is None
    resumed = _run(task, STUDENT, 7, ckpt=str(tmp_path / "b"))
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(full), strict=True):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------- options and stages


def test_weight_decay_shrinks_the_weight_matrices_only():
    """Both stages decayed every leaf: the norm scales and GDN's A_log and dt_bias (the decay
    rates) shrank towards 0 along with the matrices. One update from a zero gradient moves
    exactly the leaves with two axes (past stage 1's layer axis)."""
    student, teacher = _models()
    stage1 = distill_layers.make_task(
        MC, GDN, LAYERS, dataclasses.replace(LAYER_CFG, weight_decay=0.5, warmup_steps=0), ONE
    )
    stage2 = distill.make_task(
        student, teacher, GDN.name, dataclasses.replace(KL_CFG, weight_decay=0.5), ONE
    )
    for task, params, lead in [(stage1, _stacked(ONE), 1), (stage2, STUDENT, 0)]:
        opt = task.optimizer
        zeros = jax.tree.map(jnp.zeros_like, params)
        updates, _ = opt.update(zeros, opt.init(params), params)
        moved = jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates)
        flat_p = jax.tree_util.tree_leaves_with_path(params)
        flat_m = jax.tree_util.tree_leaves(moved)
        for (path, p), m in zip(flat_p, flat_m, strict=True):
            name = jax.tree_util.keystr(path)
            if p.ndim - lead >= 2 and np.any(np.asarray(p) != 0):
                assert m, name
            elif p.ndim - lead < 2:
                assert not m, name
        assert any("A_log" in jax.tree_util.keystr(k) for k, _ in flat_p)


def test_token_budgets_round_up_to_whole_steps_and_constant_lr_needs_no_warmup():
    b = Budget(
        4,
        32,
        train_tokens=1000,
        eval_every_tokens=300,
        checkpoint_every_tokens=0,
        warmup_fraction=0.1,
    )
    assert (b.tokens_per_step, b.steps, b.steps_for(300), b.steps_for(0)) == (128, 8, 3, 0)
    assert b.warmup_steps == 1
    # rounded up, but a float's last bit is not a step: 0.07 x 100 is 7.000000000000001
    assert dataclasses.replace(b, train_tokens=100 * 128, warmup_fraction=0.07).warmup_steps == 7
    assert dataclasses.replace(b, train_tokens=100 * 128, warmup_fraction=0.071).warmup_steps == 8
    # a one-step run is not warmed up over its step (lr 0: it trained nothing)
    assert dataclasses.replace(b, train_tokens=100, warmup_fraction=0.01).warmup_steps == 0
    assert dataclasses.replace(b, train_tokens=2 * 128, warmup_fraction=1.0).warmup_steps == 2
    const = optim.make_schedule("constant", 2.0, steps=10, warmup_steps=0, min_lr_ratio=1.0)
    assert float(const(0)) == 2.0 and float(const(5)) == 2.0


def test_both_stages_take_the_fused_attention_when_asked():
    # jax.nn.dot_product_attention's XLA form stands in for cuDNN's on the CPU: the losses
    # are the same, and the programs differ (the fused call is made)
    def same_loss_other_program(fused_task, blocked_task, params):
        args = (params, FIXED, None, TEACHER)
        got, want = fused_task.loss_fn, blocked_task.loss_fn
        np.testing.assert_allclose(jax.jit(got)(*args)[0], jax.jit(want)(*args)[0], rtol=1e-5)
        assert str(jax.make_jaxpr(got)(*args)) != str(jax.make_jaxpr(want)(*args))

    fused = dataclasses.replace(LAYER_CFG, attention_impl="xla")
    same_loss_other_program(
        distill_layers.make_task(MC, GDN, LAYERS, fused, ONE),
        distill_layers.make_task(MC, GDN, LAYERS, LAYER_CFG, ONE),
        _stacked(ONE),
    )
    runtime = AttentionRuntime(sequence_impl="xla")
    student = SC.model(runtime=GDN.runtime, attention_runtime=runtime)
    teacher = Transformer(MC, attention_runtime=runtime)
    same_loss_other_program(
        distill.make_task(student, teacher, GDN.name, KL_CFG, ONE),
        distill.make_task(*_models(), GDN.name, KL_CFG, ONE),
        STUDENT,
    )
