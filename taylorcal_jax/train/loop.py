"""The one training loop: a train state, a task (loss + partition), a batch source and hooks.

Letters: K steps fused into one jitted call.

Step s of a `Task` on batch source `batches`, with `labels` its parameter partition:

    (loss, aux), g = value_and_grad(loss_fn)(freeze(params_s), batches(position_s),
                                             fold_in(rng, s))
    u, opt_state   = optimizer.update(g, opt_state, params_s)      (optim.make_optimizer)
    params_{s+1}   = params_s + u
    extra          = update_extra(extra, s, params_s, loss, aux)   (optional)

`freeze` puts FROZEN leaves behind stop_gradient, so no gradient is formed for them and they
stay bit-for-bit unchanged. `extra` is any pytree the task keeps next to the params (phase-2
alignment keeps each layer's best params, best loss and loss curve there; an EMA would fit).

Constants: read-only arrays every step reads (a teacher's params in distillation) are given
to `run` as `constants`. They are jit arguments, placed once by `Task.constant_spec` (closed
over instead, they would be baked into the program as literals), passed to `loss_fn` as its
fourth argument, never updated and never checkpointed: a resumed run is given them again.

Cut: the loop knows nothing of models. Mixed precision (bf16 compute over fp32 master
params) and rematerialisation belong to the model the loss calls (Flax `dtype` vs
`param_dtype`, `nn.remat`); the loop keeps params and optimiser state as given. A task that
must keep custom kernels out of the SPMD partitioner wraps its loss in `jax.shard_map`
(calibrate/align.py does); the loop only places arrays on the mesh.

Execution: `run` places the state on one mesh (`Task.param_spec` for every leaf of params,
optimiser state and extra; counters and RNG replicated; batches by `Task.batch_spec`) and
runs up to K = `steps_per_call` steps per jitted call (a `lax.scan`), so tiny steps do not
pay Python dispatch each. Calls end at multiples of K, `eval_every` and `checkpoint_every`
counted from step 0, so a resumed run makes the same calls as an uninterrupted one. Hooks
run between calls: log (per-step loss, gradient norm and the scalar entries of `aux` come
back stacked, so any step can be logged), evaluate, checkpoint (orbax, utils/checkpoint.py),
progress bar. The batch is a pure function of the position and the RNG of the step, so a
run resumed from a checkpoint ends bit-for-bit where an uninterrupted run ends (tested on
the CPU). Ctrl-C saves the state of the last finished call before stopping, after writing
any of that call's loss rows not yet written; when its evaluation had not finished, the
checkpoint says so and the resumed run evaluates first, so no row and no evaluation (nor
what its hook saves) is lost to the interrupt.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from taylorcal_jax.train import optim
from taylorcal_jax.utils import hosts, interrupts, sharding
from taylorcal_jax.utils.checkpoint import TrainCheckpointer
from taylorcal_jax.utils.progress import progress
from taylorcal_jax.utils.sharding import P


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Everything a run needs to continue: params, optimiser state, counters, RNG, extra.

    step: updates applied (int32; schedules and the step RNG follow it); position: batches
    consumed from the batch source (int32; equal to step within one run, but a later phase
    may start its steps at 0 and keep reading the stream where the last one stopped); rng:
    the base key, step s uses fold_in(rng, s).
    """

    params: Any
    opt_state: Any
    step: jax.Array
    position: jax.Array
    rng: jax.Array
    extra: Any


def replicated(leaf) -> P:
    """param_spec: every leaf whole on every device."""
    del leaf
    return P()


def leading_axis(name: str) -> Callable:
    """param_spec: the leading axis of every non-scalar leaf split over mesh axis `name`."""
    return lambda leaf: P(name) if np.ndim(leaf) else P()


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """What a run optimises. Compared and hashed by identity: jitted steps are cached per task.

    loss_fn(params, batch, rng) -> (scalar loss, aux dict), or loss_fn(params, batch, rng,
    constants) when the run is given constants; labels(params) -> the partition
    (a group name of `groups` or optim.FROZEN per leaf); clip: one transform on the whole
    gradient before the groups (optax.clip_by_global_norm or optim.clip_slices_by_global_norm);
    update_extra(extra, step, params, loss, aux) -> extra, with the params the loss was taken
    at; param_spec(leaf) -> PartitionSpec of a params/optimiser/extra leaf; constant_spec(leaf)
    -> that of a leaf of the run's constants; batch_spec: a PartitionSpec prefix of a batch.
    """

    loss_fn: Callable
    labels: Callable
    groups: Mapping[str, optax.GradientTransformation]
    clip: optax.GradientTransformation
    update_extra: Callable | None = None
    param_spec: Callable = replicated
    constant_spec: Callable = replicated
    batch_spec: Any = P()

    @functools.cached_property
    def optimizer(self) -> optax.GradientTransformation:
        return optim.make_optimizer(self.labels, self.groups, self.clip)


@dataclasses.dataclass(frozen=True)
class StreamBatches:
    """Batch number p is fn(p) (host arrays), a pure function of p.

    A source made by `from_rows` also builds part of a batch: rows(p, start, stop) is fn(p)
    with every leaf cut to rows [start, stop) of its leading (batch) axis, of num_rows. The
    loop then asks each process for only the rows its devices hold.
    """

    fn: Callable[[int], Any]
    rows: Callable[[int, int, int], Any] | None = None
    num_rows: int = 0

    @classmethod
    def from_rows(cls, rows: Callable[[int, int, int], Any], num_rows: int) -> StreamBatches:
        """The source whose batch p is rows(p, 0, num_rows)."""
        return cls(fn=lambda p: rows(p, 0, num_rows), rows=rows, num_rows=num_rows)

    def take(self, position: int, count: int, row_range: tuple[int, int] | None = None):
        """Batches position .. position + count - 1 stacked on a new leading axis; with
        `row_range` (start, stop), only those rows of each (a source with `rows`)."""
        if row_range is None:
            batches = [self.fn(p) for p in range(position, position + count)]
        else:
            batches = [self.rows(p, *row_range) for p in range(position, position + count)]
        return jax.tree.map(lambda *b: np.stack(b), *batches)


@dataclasses.dataclass(frozen=True)
class FixedBatch:
    """The same batch at every position (passed once per call, not stacked)."""

    batch: Any


@dataclasses.dataclass(frozen=True)
class LoopOptions:
    """steps: the run ends when state.step reaches it; steps_per_call: K; log_every,
    eval_every, checkpoint_every: hook intervals in steps (0 = off; the last step is always
    logged and, with a checkpoint directory, saved; eval stops before the last step, which
    the caller evaluates); desc: progress bar label."""

    steps: int
    steps_per_call: int
    log_every: int
    eval_every: int
    checkpoint_every: int
    desc: str

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"{self.desc}: steps must be >= 0, got {self.steps}")
        if self.steps_per_call <= 0:
            raise ValueError(f"{self.desc}: steps_per_call must be positive")
        for name in ("log_every", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{self.desc}: {name} must be >= 0 (0 = off)")

    def logs_at(self, n: int) -> bool:
        return bool(self.log_every and n % self.log_every == 0) or n == self.steps

    def evaluates_at(self, n: int) -> bool:
        return bool(self.eval_every and n % self.eval_every == 0) and n < self.steps

    def saves_at(self, n: int) -> bool:
        return bool(self.checkpoint_every and n % self.checkpoint_every == 0) or n == self.steps

    def call_end(self, n: int, stop_at: int) -> int:
        """Last step (exclusive) of the call starting at step n."""
        ends = [self.steps, stop_at]
        for every in (self.steps_per_call, self.eval_every, self.checkpoint_every):
            if every:
                ends.append((n // every + 1) * every)
        return min(ends)


@dataclasses.dataclass(frozen=True)
class RunResult:
    """The final state; train_seconds: wall time of the step loops (compilation and evals
    included, checkpoint writing excluded), summed over resumed runs."""

    state: TrainState
    train_seconds: float


def init_state(task: Task, params, *, rng, extra=None) -> TrainState:
    """Step 0: fresh optimiser state, counters at 0."""
    return TrainState(
        params=params,
        opt_state=task.optimizer.init(params),
        step=jnp.zeros((), jnp.int32),
        position=jnp.zeros((), jnp.int32),
        rng=jnp.asarray(rng),
        extra=extra,
    )


def state_shardings(task: Task, state: TrainState, mesh):
    """NamedSharding of every leaf of `state` (a pytree like it)."""

    def spec_tree(tree, spec_fn):
        return jax.tree.map(lambda x: sharding.named(mesh, *spec_fn(x)), tree)

    return TrainState(
        params=spec_tree(state.params, task.param_spec),
        opt_state=spec_tree(state.opt_state, task.param_spec),
        step=sharding.named(mesh),
        position=sharding.named(mesh),
        rng=sharding.named(mesh),
        extra=spec_tree(state.extra, task.param_spec),
    )


def _put(tree, shardings):
    # The state is donated to the step, so it must never alias the caller's arrays (which may
    # also be the run's constants). device_put(may_alias=False) alone is not enough: from one
    # device to several, the first device's shard stays the source buffer (JAX 0.10).
    return jax.tree.map(
        lambda x, s: jax.device_put(jnp.copy(x), s, may_alias=False), tree, shardings
    )


def place_batch(task: Task, mesh, batch, *, stacked: bool = False, held=None):
    """`batch` on `mesh` by task.batch_spec (after a leading unsplit axis when stacked).

    held = (start, stop, num_rows): `batch` holds only rows [start, stop) of the num_rows of
    its batch axis (axis 0, or 1 when stacked), as `process_rows` gives them; default: all.
    Each process sends its devices only their rows; on one process this is device_put.
    """
    axis = 1 if stacked else 0

    def put(spec, sub):
        spec = P(None, *spec) if stacked else spec
        where = sharding.named(mesh, *spec)
        return jax.tree.map(lambda x: hosts.put_held_rows(x, where, axis, held), sub)

    return jax.tree.map(put, task.batch_spec, batch, is_leaf=lambda x: isinstance(x, P))


def process_rows(task: Task, mesh, num_rows: int) -> tuple[int, int]:
    """The rows [start, stop) of a num_rows batch that this process's devices hold under
    task.batch_spec (the span over its leaves' specs); (0, num_rows) on one process."""
    specs = jax.tree.leaves(task.batch_spec, is_leaf=lambda x: isinstance(x, P))
    spans = [hosts.local_rows(sharding.named(mesh, *spec[:1]), num_rows) for spec in specs]
    return min(a for a, _ in spans), max(b for _, b in spans)


def _train_step(task: Task, state: TrainState, batch, constants=None):
    """One update; returns (new state, {"loss", "grad_norm", scalar aux entries})."""
    labels = task.labels(state.params)
    rng = jax.random.fold_in(state.rng, state.step)
    const_args = () if constants is None else (constants,)

    def loss_of(params):
        return task.loss_fn(optim.freeze(params, labels), batch, rng, *const_args)

    (loss, aux), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    updates, opt_state = task.optimizer.update(grads, state.opt_state, state.params)
    extra = state.extra
    if task.update_extra is not None:
        extra = task.update_extra(extra, state.step, state.params, loss, aux)
    new = TrainState(
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
        step=state.step + 1,
        position=state.position + 1,
        rng=state.rng,
        extra=extra,
    )
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    metrics.update({k: v for k, v in aux.items() if jnp.ndim(v) == 0})
    return new, metrics


@functools.lru_cache(maxsize=32)
def _multi_step(task: Task, mesh, num_steps: int, fixed: bool) -> Callable:
    """Jitted (state, batches, constants) -> (state after num_steps, per-step metrics
    [num_steps]).

    `batches` is one batch (fixed) or num_steps batches stacked on axis 0; `constants` the
    run's constants (None: none). The state is donated; its output keeps the shardings of
    `state_shardings`.
    """

    def run(state, batches, constants):
        if fixed:
            body = lambda s, _: _train_step(task, s, batches, constants)  # noqa: E731
            state, metrics = jax.lax.scan(body, state, None, length=num_steps)
        else:
            body = lambda s, b: _train_step(task, s, b, constants)  # noqa: E731
            state, metrics = jax.lax.scan(body, state, batches)
        state = jax.lax.with_sharding_constraint(state, state_shardings(task, state, mesh))
        return state, metrics

    return jax.jit(run, donate_argnums=0)


def compiled_step(task: Task, state: TrainState, batch, *, mesh, constants=None):
    """The compiled program of one training step as `run` calls it (one batch of a stream per
    call, the state donated), to inspect, e.g. `.memory_analysis()`. `state`, `batch` (one
    batch, not stacked) and `constants` may be arrays or jax.ShapeDtypeStruct: only their
    shapes and dtypes are read, placed as `run` places them."""

    def like(x, where):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where)

    def stacked(spec, sub):
        where = sharding.named(mesh, None, *spec)
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct((1, *x.shape), x.dtype, sharding=where), sub
        )

    state_in = jax.tree.map(like, state, state_shardings(task, state, mesh))
    batch_in = jax.tree.map(stacked, task.batch_spec, batch, is_leaf=lambda x: isinstance(x, P))
    const_in = jax.tree.map(
        lambda x: like(x, sharding.named(mesh, *task.constant_spec(x))), constants
    )
    return _multi_step(task, mesh, 1, False).lower(state_in, batch_in, const_in).compile()


def run(
    task: Task,
    state: TrainState,
    batches: StreamBatches | FixedBatch,
    opts: LoopOptions,
    *,
    mesh,
    checkpoint_dir: str | None = None,
    log_fn: Callable | None = None,
    eval_fn: Callable | None = None,
    stop_after_steps: int | None = None,
    constants=None,
) -> RunResult | None:
    """Trains `state` to step opts.steps (resuming from `checkpoint_dir` if it holds one).

    log_fn(step, dict) receives {"resumed_from_step"} on resume, the step metrics (plus
    train_seconds) every log_every steps and at the end, and eval_fn(params) -> dict every
    eval_every steps before the last. `stop_after_steps` ends this call after that many
    steps of work without a final checkpoint, as a crash would, and returns None (tests).
    `constants`: read-only arrays passed to every step's loss (module docstring).
    """
    log_fn = log_fn or (lambda step, values: None)
    state = _put(state, state_shardings(task, state, mesh))
    if constants is not None:
        constants = jax.tree.map(
            lambda x: jax.device_put(x, sharding.named(mesh, *task.constant_spec(x))), constants
        )
    fixed = isinstance(batches, FixedBatch)
    fixed_batch = place_batch(task, mesh, batches.batch) if fixed else None
    ckpt = None if checkpoint_dir is None else TrainCheckpointer(checkpoint_dir)
    try:
        saved = {"state": state, **_counters(0.0, eval_pending=False)}
        if ckpt is not None:
            saved = ckpt.restore_or(saved)
        state, seconds = saved["state"], float(saved["train_seconds"])
        start, position = int(state.step), int(state.position)
        if ckpt is not None and ckpt.latest_step() is not None:
            log_fn(start, {"resumed_from_step": start})
        if eval_fn is not None and bool(saved["eval_pending"]):
            log_fn(start, eval_fn(state.params))  # the one an interrupt cut short
        stop_at = opts.steps if stop_after_steps is None else start + stop_after_steps
        bar = progress(desc=opts.desc, initial=start, total=opts.steps)
        n, t0 = start, time.perf_counter()
        # The hooks of the last finished call: its loss rows written up to step `logged_to`,
        # its evaluation run at step `evaluated_at`. An interrupt between the call's return
        # and the end of its hooks (most of the wait is in device_get) would otherwise save
        # its step with rows or an evaluation missing, which no resumed run redoes.
        logged_to = evaluated_at = start
        first, metrics = start, {}

        def log_rows(upto: int) -> None:
            nonlocal logged_to
            rows = [s for s in range(max(first, logged_to) + 1, upto + 1) if opts.logs_at(s)]
            if not rows:
                logged_to = upto
                return
            host = jax.device_get(metrics)
            elapsed = seconds + time.perf_counter() - t0
            for s in rows:
                values = {k: float(v[s - first - 1]) for k, v in host.items()}
                bar.set_postfix(loss=f"{values['loss']:.3f}")
                log_fn(s, {**values, "train_seconds": elapsed})
                logged_to = s
            logged_to = upto

        try:
            # Ctrl-C or SIGTERM (utils/interrupts) stops the loop at the end of a call, where
            # `state` is whole, instead of inside the donated call
            with interrupts.deferred():
                while n < min(opts.steps, stop_at):
                    first, n = n, opts.call_end(n, stop_at)
                    step_fn = _multi_step(task, mesh, n - first, fixed)
                    if not fixed:
                        stacked = _place_stream(task, mesh, batches, position, n - first)
                    state, metrics = step_fn(state, fixed_batch if fixed else stacked, constants)
                    position += n - first
                    bar.update(n - first)
                    log_rows(n)
                    if eval_fn is not None and opts.evaluates_at(n):
                        log_fn(n, eval_fn(state.params))
                    evaluated_at = n
                    if n == stop_at and n < opts.steps:
                        return None
                    if ckpt is not None and opts.saves_at(n):
                        seconds, t0 = _save(ckpt, state, seconds, t0)
                    if n < opts.steps and interrupts.requested():
                        raise interrupts.Stop
        except KeyboardInterrupt as e:
            # The last finished call's state, unless the interrupted call consumed it; its
            # loss rows are written first, its evaluation left to the resumed run. With several
            # processes only where all of them stopped (Stop): the save is a collective.
            agreed = isinstance(e, interrupts.Stop) or interrupts.one_process()
            if agreed and ckpt is not None and not _deleted(state) and int(state.step) > start:
                done = int(state.step)
                if done > logged_to:
                    log_rows(done)
                pending = eval_fn is not None and evaluated_at < done and opts.evaluates_at(done)
                _save(ckpt, state, seconds, t0, eval_pending=pending)
            raise
        finally:
            bar.close()
        if n > start and not (ckpt is not None and opts.saves_at(n)):
            # (a save at the last step already counted the time up to it, as it is restored)
            seconds += time.perf_counter() - t0
        return RunResult(state=state, train_seconds=seconds)
    finally:
        if ckpt is not None:
            ckpt.close()


def _place_stream(task: Task, mesh, batches: StreamBatches, position: int, count: int):
    """Batches position .. position + count - 1 stacked and placed; a source with `rows`
    builds only this process's rows of each."""
    if batches.rows is None:
        return place_batch(task, mesh, batches.take(position, count), stacked=True)
    start, stop = process_rows(task, mesh, batches.num_rows)
    host = batches.take(position, count, (start, stop))
    return place_batch(task, mesh, host, stacked=True, held=(start, stop, batches.num_rows))


def _counters(seconds: float, *, eval_pending: bool) -> dict:
    """The checkpoint's entries besides the state: the training time so far, and whether the
    evaluation due at the saved step was interrupted (the resumed run then runs it first)."""
    return {
        "train_seconds": np.asarray(seconds, np.float64),
        "eval_pending": np.asarray(eval_pending),
    }


def _save(ckpt: TrainCheckpointer, state, seconds: float, t0: float, *, eval_pending=False):
    """Saves {state, _counters} as its step; returns the new (seconds, t0), the writing time
    excluded."""
    jax.block_until_ready(state)
    seconds += time.perf_counter() - t0
    tree = {"state": state, **_counters(seconds, eval_pending=eval_pending)}
    ckpt.save(int(state.step), tree)
    return seconds, time.perf_counter()


def _deleted(state) -> bool:
    """Whether a donated call consumed `state` (an interrupt during dispatch)."""
    return any(x.is_deleted() for x in jax.tree.leaves(state) if isinstance(x, jax.Array))
