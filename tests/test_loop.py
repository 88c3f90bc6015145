"""The training loop: exact resume, partitions (frozen parts, per-group lrs), per-slice clipping,
fused steps, sharding and schedules, each against a reference computed here."""

import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from taylorcal_jax.train import loop, optim
from taylorcal_jax.utils import sharding
from taylorcal_jax.utils.sharding import P

D_IN, D_HID, D_OUT, BATCH = 4, 8, 2, 8


def _params():
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    return {
        "w1": jax.random.normal(k1, (D_IN, D_HID)) / 2,
        "w2": jax.random.normal(k2, (D_HID, D_OUT)) / 3,
        "b2": jnp.full((D_OUT,), 0.5),
    }


def _batch(position: int):
    r = np.random.default_rng(position)
    x = r.normal(size=(BATCH, D_IN)).astype(np.float32)
    return {"x": x, "y": np.sin(x[:, :D_OUT]).astype(np.float32)}


def _loss_fn(params, batch, rng):
    # input noise from the step's RNG, so the RNG path matters for exact resume
    x = batch["x"] + 0.1 * jax.random.normal(rng, batch["x"].shape)
    pred = jnp.tanh(x @ params["w1"]) @ params["w2"] + params["b2"]
    err = jnp.mean(jnp.square(pred - batch["y"]))
    return err, {"mean_pred": jnp.mean(pred), "pred": pred}


def _ema(extra, step, params, loss, aux):
    del step, loss, aux
    return jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, extra, params)


def _task(**kw):
    args = {
        "loss_fn": _loss_fn,
        "labels": optim.labels_by_key({"w1": "body", "w2": "head", "b2": "head"}),
        "groups": {"body": optax.adamw(1e-2), "head": optax.adam(3e-2)},
        "clip": optax.clip_by_global_norm(0.5),
        "update_extra": _ema,
        "batch_spec": {"x": P("data"), "y": P("data")},
        **kw,
    }
    return loop.Task(**args)


TASK = _task()
ONE = sharding.single_device_mesh(("data",))


def _opts(**kw):
    args = {
        "steps": 10,
        "steps_per_call": 4,
        "log_every": 1,
        "eval_every": 0,
        "checkpoint_every": 3,
        "desc": "test",
        **kw,
    }
    return loop.LoopOptions(**args)


def _run(task=TASK, mesh=ONE, opts=None, **kw):
    state = loop.init_state(task, _params(), rng=jax.random.PRNGKey(7), extra=_params())
    return loop.run(task, state, loop.StreamBatches(_batch), opts or _opts(), mesh=mesh, **kw)


def _assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b) and len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_after_crash_or_ctrl_c_is_bit_identical(tmp_path):
    logs = {}
    full = _run(checkpoint_dir=str(tmp_path / "full"), log_fn=lambda s, v: logs.setdefault(s, v))
    assert int(full.state.step) == 10 and int(full.state.position) == 10
    assert sorted(logs) == list(range(1, 11))
    assert set(logs[1]) == {"loss", "grad_norm", "mean_pred", "train_seconds"}  # scalar aux
    assert logs[10]["loss"] < logs[1]["loss"]

    # A crash after 5 steps: the last checkpoint is step 3; steps 4-5 are redone.
    crashed = str(tmp_path / "crashed")
    assert _run(checkpoint_dir=crashed, stop_after_steps=5) is None
    assert sorted(os.listdir(crashed)) == ["3"]
    events = []
    resumed = _run(checkpoint_dir=crashed, log_fn=lambda s, v: events.append((s, v)))
    assert events[0] == (3, {"resumed_from_step": 3})
    _assert_trees_equal(resumed.state, full.state)

    # Ctrl-C in the hook logging step 4 (mid-interval): the row is written again before that
    # step is saved, and nothing is redone.
    written = []

    def interrupt_once(step, values):
        if step == 4 and step not in written:
            written.append(step)
            raise KeyboardInterrupt
        written.append(step)

    stopped = str(tmp_path / "stopped")
    with pytest.raises(KeyboardInterrupt):
        _run(checkpoint_dir=stopped, log_fn=interrupt_once)
    assert sorted(os.listdir(stopped)) == ["3", "4"]
    events = []
    resumed = _run(checkpoint_dir=stopped, log_fn=lambda s, v: events.append(s))
    assert written == [1, 2, 3, 4, 4] and events == [4, 5, 6, 7, 8, 9, 10]
    _assert_trees_equal(resumed.state, full.state)

    # A finished run started again does nothing and returns the saved state.
    again = _run(checkpoint_dir=str(tmp_path / "full"))
    _assert_trees_equal(again.state, full.state)
    assert again.train_seconds == pytest.approx(full.train_seconds, abs=1e-3)


def test_ctrl_c_while_a_step_computes_loses_no_row_and_no_evaluation(tmp_path, monkeypatch):
    """The interrupt lands in the wait for step 4's metrics (device_get), after its call
    returned: its loss row is written and its evaluation runs first in the resumed run, so
    the rows of the two runs are those of an uninterrupted one."""
    opts = _opts(steps=8, steps_per_call=1, eval_every=2, checkpoint_every=5)

    def run_into(out, workdir):
        _run(
            opts=opts,
            checkpoint_dir=str(tmp_path / workdir),
            log_fn=lambda s, v: out.append((s, "eval" if "eval" in v else sorted(v)[0])),
            eval_fn=lambda params: {"eval": 1.0},
        )

    full = []
    run_into(full, "full")
    device_get, waits = loop.jax.device_get, []

    def interrupted_wait(x):
        out = device_get(x)
        waits.append(1)
        if len(waits) == 4:  # step 4's metrics have arrived
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(loop.jax, "device_get", interrupted_wait)
    cut = []
    with pytest.raises(KeyboardInterrupt):
        run_into(cut, "cut")
    monkeypatch.setattr(loop.jax, "device_get", device_get)
    assert sorted(os.listdir(tmp_path / "cut")) == ["4"]
    resumed = []
    run_into(resumed, "cut")
    # the evaluation the interrupt cut short comes first
    assert resumed[:2] == [(4, "resumed_from_step"), (4, "eval")]
    assert (4, "grad_norm") in cut  # the interrupted step's loss row (keys sorted: grad_norm)
    assert sorted(cut + resumed[1:]) == sorted(full)


def test_a_signal_during_a_call_stops_the_loop_after_its_hooks_with_its_step_saved(tmp_path):
    """With the command line's handlers (utils/interrupts), SIGTERM or Ctrl-C inside the loop
    only records the request; the loop stops after that call's hooks and saves its step. As a
    KeyboardInterrupt raised where the signal lands, it most often hit the donated call
    (state gone, nothing saved). Here the signal comes in the call's hooks (the first row of
    two), which the loop finishes; test_main's SIGTERM test sends it from outside, at any
    point. The resumed run ends where an uninterrupted one does."""
    import signal

    from taylorcal_jax.utils import interrupts

    opts = _opts(steps=10, steps_per_call=2, checkpoint_every=0)
    full = _run(opts=opts, checkpoint_dir=str(tmp_path / "full")).state
    before = {n: signal.getsignal(n) for n in interrupts.SIGNALS}
    interrupts.install()
    stepped = []

    def signal_mid_call(step, values):
        stepped.append(step)
        if step == 3:  # step 3's row: the call of steps 3-4 is half logged
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        with pytest.raises(KeyboardInterrupt):
            _run(opts=opts, checkpoint_dir=str(tmp_path / "cut"), log_fn=signal_mid_call)
        assert stepped == [1, 2, 3, 4]  # the call's hooks finished
        assert sorted(os.listdir(tmp_path / "cut")) == ["4"]
        assert interrupts.exit_status() == 128 + signal.SIGTERM
    finally:
        interrupts.reset()
        for n, handler in before.items():
            signal.signal(n, handler)
    resumed = _run(opts=opts, checkpoint_dir=str(tmp_path / "cut")).state
    _assert_trees_equal(resumed, full)


def test_with_several_processes_only_an_agreed_stop_saves(tmp_path, monkeypatch):
    """The interrupt save is a collective: with several processes a KeyboardInterrupt that
    reached this process alone (Ctrl-C, which each process takes where it is) must not start
    it, or it waits for processes that stopped elsewhere. Only `interrupts.Stop`, raised where
    every process stops, saves. (`one_process` is set false in this one process: the rule is
    the loop's; the agreement itself is tests/test_multihost.py's.)"""

    raised = []

    def interrupt_at_4(step, values):  # once: the save writes the step's row again
        if step == 4 and not raised:
            raised.append(step)
            raise KeyboardInterrupt

    from taylorcal_jax.utils import interrupts

    monkeypatch.setattr(interrupts, "one_process", lambda: False)
    opts = _opts(steps=10, steps_per_call=2, checkpoint_every=0)
    with pytest.raises(KeyboardInterrupt):
        _run(opts=opts, checkpoint_dir=str(tmp_path / "alone"), log_fn=interrupt_at_4)
    assert not [n for n in os.listdir(tmp_path / "alone") if n.isdigit()]  # nothing saved
    monkeypatch.setattr(interrupts, "one_process", lambda: True)
    raised.clear()
    with pytest.raises(KeyboardInterrupt):
        _run(opts=opts, checkpoint_dir=str(tmp_path / "one"), log_fn=interrupt_at_4)
    assert sorted(os.listdir(tmp_path / "one")) == ["4"]


def test_fused_steps_equal_single_steps_and_a_plain_optax_loop():
    fused = _run(opts=_opts(steps_per_call=10, checkpoint_every=0)).state
    single = _run(opts=_opts(steps_per_call=1, checkpoint_every=0)).state

    # Reference: the same optimiser by hand, one step at a time.
    labels = {"w1": "body", "w2": "head", "b2": "head"}
    tx = optax.chain(
        optax.clip_by_global_norm(0.5),
        optax.multi_transform({"body": optax.adamw(1e-2), "head": optax.adam(3e-2)}, labels),
    )

    @jax.jit
    def reference_step(params, ema, opt_state, batch, rng):
        grads = jax.grad(lambda p: _loss_fn(p, batch, rng)[0])(params)
        ema = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, ema, params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), ema, opt_state

    params, ema = _params(), _params()
    opt_state = tx.init(params)
    for s in range(10):
        rng = jax.random.fold_in(jax.random.PRNGKey(7), s)
        params, ema, opt_state = reference_step(params, ema, opt_state, _batch(s), rng)
    for state in (fused, single):
        for got, want in ((state.params, params), (state.extra, ema)):
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_frozen_parts_stay_bit_identical_and_groups_get_their_lr():
    params = _params()
    task = _task(
        labels=optim.labels_by_key({"w1": "slow", "w2": "fast", "b2": optim.FROZEN}),
        groups={"slow": optax.sgd(1e-3), "fast": optax.sgd(1e-1)},
        clip=optax.clip_by_global_norm(1e6),
        update_extra=None,
    )
    state = loop.init_state(task, params, rng=jax.random.PRNGKey(7))
    # the frozen leaf keeps no optimiser state: Adam's mu and nu of w1 and w2, two counts
    adam = _task(labels=task.labels, groups={"slow": optax.adam(1.0), "fast": optax.adam(1.0)})
    sizes = [x.size for x in jax.tree.leaves(adam.optimizer.init(params))]
    assert sum(sizes) == 2 * (params["w1"].size + params["w2"].size) + 2
    out = loop.run(
        task, state, loop.FixedBatch(_batch(0)), _opts(steps=1, checkpoint_every=0), mesh=ONE
    )
    batch, rng = jax.tree.map(jnp.asarray, _batch(0)), jax.random.fold_in(jax.random.PRNGKey(7), 0)
    grads = jax.grad(lambda p: _loss_fn(p, batch, rng)[0])(params)
    new = out.state.params
    np.testing.assert_array_equal(new["b2"], params["b2"])
    np.testing.assert_allclose(new["w1"], params["w1"] - 1e-3 * grads["w1"], rtol=1e-6)
    np.testing.assert_allclose(new["w2"], params["w2"] - 1e-1 * grads["w2"], rtol=1e-6)
    assert np.max(np.abs(grads["b2"])) > 0  # the frozen leaf would have moved
    # a FixedBatch does not move the stream, but the position still counts batches used
    assert int(out.state.position) == 1


def test_clip_slices_equals_clipping_each_slice_alone():
    k = jax.random.split(jax.random.PRNGKey(0), 2)
    g = {"a": jax.random.normal(k[0], (3, 4, 5)), "b": jax.random.normal(k[1], (3, 2))}
    g = jax.tree.map(lambda x: x.at[1].multiply(0.1), g)  # slice 1 under the threshold
    clipped, _ = jax.jit(optim.clip_slices_by_global_norm(1.0).update)(g, optax.EmptyState())
    reference = jax.jit(optax.clip_by_global_norm(1.0).update)
    for i in range(3):
        want, _ = reference(jax.tree.map(lambda x, i=i: x[i], g), optax.EmptyState())
        for a, b in zip(jax.tree.leaves(clipped), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a[i], b, rtol=1e-6)
    norms = [float(optax.tree.norm(jax.tree.map(lambda x, i=i: x[i], clipped))) for i in range(3)]
    np.testing.assert_allclose([norms[0], norms[2]], 1.0, rtol=1e-6)
    assert norms[1] < 1.0
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[1], b[1]), clipped, g)


def test_split_over_eight_devices_equals_one_device():
    assert len(jax.devices()) == 8, "conftest fakes 8 CPU devices"
    opts = _opts(steps_per_call=10, checkpoint_every=0)
    split = _run(mesh=sharding.make_mesh({"data": 8}), opts=opts).state
    one = _run(opts=opts).state
    assert split.params["w1"].sharding.num_devices == 8
    for a, b in zip(jax.tree.leaves(split), jax.tree.leaves(one), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # leading-axis placement: stacked leaves split over the mesh, scalars replicated
    spec = loop.leading_axis("data")
    assert spec(jnp.zeros((8, 3))) == P("data") and spec(jnp.zeros(())) == P()


def test_ctrl_c_during_an_evaluation_evaluates_first_on_resume(tmp_path):
    # the interrupted call's state is saved, with the evaluation due at it pending: the resumed
    # run runs it before its first step, so both runs together evaluate where one run does
    opts = _opts(steps=10, steps_per_call=1, eval_every=2, checkpoint_every=5)
    evals = []

    def evaluate(params, interrupt_at=None):
        if len(evals) + 1 == interrupt_at:
            raise KeyboardInterrupt
        evals.append(jax.device_get(params))  # the step donates its state afterwards
        return {"ev": 1.0}

    steps = []
    log = lambda s, v: steps.append(s) if "ev" in v else None  # noqa: E731
    stopped = str(tmp_path / "stopped")
    with pytest.raises(KeyboardInterrupt):
        _run(opts=opts, checkpoint_dir=stopped, log_fn=log,
             eval_fn=lambda p: evaluate(p, interrupt_at=2))  # fmt: skip
    assert sorted(os.listdir(stopped)) == ["4"] and steps == [2]
    resumed = _run(opts=opts, checkpoint_dir=stopped, log_fn=log, eval_fn=evaluate)
    assert steps == [2, 4, 6, 8]
    full_evals = []
    full = _run(opts=opts, eval_fn=lambda p: full_evals.append(jax.device_get(p)) or {"ev": 1.0})
    _assert_trees_equal(evals[1], full_evals[1])  # step 4's params, evaluated after the resume
    _assert_trees_equal(resumed.state, full.state)


def test_eval_hook_and_call_boundaries():
    evals, logs = [], []
    _run(
        opts=_opts(eval_every=4, log_every=3, checkpoint_every=0, steps_per_call=100),
        eval_fn=lambda p: evals.append(p) or {"ev": 1.0},
        log_fn=lambda s, v: logs.append((s, sorted(v))),
    )
    assert len(evals) == 2  # steps 4 and 8; never at the last step
    assert [s for s, _ in logs] == [3, 4, 6, 8, 9, 10]
    opts = _opts(steps=10, steps_per_call=4, eval_every=0, checkpoint_every=3)
    ends, n = [], 0
    while n < 10:
        n = opts.call_end(n, stop_at=10)
        ends.append(n)
    assert ends == [3, 4, 6, 8, 9, 10]


def test_schedules():
    cos = optim.make_schedule("cosine", 1.0, steps=110, warmup_steps=10, min_lr_ratio=0.1)
    const = optim.make_schedule("constant", 2.0, steps=110, warmup_steps=10, min_lr_ratio=0.1)
    opts = types.SimpleNamespace(learning_rate=3.0, steps=110, warmup_steps=10, min_lr_ratio=0.1)
    cos_of_opts = optim.cosine_schedule(opts)
    for s in (0, 5, 10, 60, 110):
        warm = s / 10
        want = warm if s < 10 else 0.1 + 0.9 * (1 + np.cos(np.pi * (s - 10) / 100)) / 2
        np.testing.assert_allclose(cos(s), want, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(cos_of_opts(s), 3.0 * want, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(const(s), 2.0 * min(warm, 1.0), rtol=1e-6)
    # a warm-up as long as the run (accepted by the configs' checks) is the whole schedule
    whole = optim.make_schedule("cosine", 1.0, steps=10, warmup_steps=10, min_lr_ratio=0.1)
    np.testing.assert_allclose([whole(s) for s in (0, 5, 10)], [0.0, 0.5, 1.0], rtol=1e-6)
    with pytest.raises(ValueError, match="unknown schedule"):
        optim.make_schedule("linear", 1.0, steps=1, warmup_steps=0, min_lr_ratio=0.0)


def test_bad_input_is_rejected_before_work():
    with pytest.raises(ValueError, match="steps_per_call"):
        _opts(steps_per_call=0)
    with pytest.raises(ValueError, match="eval_every"):
        _opts(eval_every=-1)
    with pytest.raises(ValueError, match="reserved"):
        optim.make_optimizer(lambda p: p, {optim.FROZEN: optax.sgd(1.0)}, optax.identity())
    with pytest.raises(ValueError, match=r"\['w1'\] belong to no group"):
        optim.labels_by_key({"w2": "a", "b2": "a"})(_params())
