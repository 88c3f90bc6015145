"""Pretraining a small Llama-architecture teacher: next-token cross-entropy, AdamW.

Letters: B batch, T time, V vocab.

    loss(theta) = mean_{b,t} -log softmax(f_theta(x_b)_t)[x_{b,t+1}]
    lr(s)       = warmup linearly 0 -> lr_peak over `warmup_steps`, then cosine to
                  lr_peak * min_lr_ratio at `steps`
    update      = AdamW(b1, b2, weight_decay on matrices only) after global-norm clipping

It runs on the training loop (train/loop.py): `make_task` supplies the loss and one AdamW
group over every parameter; the batch of step s is `packing.train_batch(train_stream, B, T,
seed, s)`, a pure function of (seed, s), of which each process builds only the rows its
devices hold. The loop saves its state with orbax every `checkpoint_every` steps; a run
interrupted at any point and started again resumes from the last checkpoint and ends with
the same parameters as an uninterrupted run (steps after the checkpoint are recomputed
identically). On a mesh, each batch splits over the "data" and "fsdp" axes and the params
with their AdamW moments over "fsdp" (utils/sharding.py `train_batch_spec`, `param_spec`;
"layers", if larger than 1, replicates). `train_seconds` is wall time of the step loop
(first-step compilation and the periodic evals included, checkpoint writing excluded),
summed over resumed runs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from taylorcal_jax.data import packing
from taylorcal_jax.eval.perplexity import token_nll_sum
from taylorcal_jax.train import loop, optim
from taylorcal_jax.utils import sharding


@dataclasses.dataclass(frozen=True)
class PretrainOptions:
    steps: int
    batch_size: int
    seq_len: int
    learning_rate: float
    warmup_steps: int
    min_lr_ratio: float
    weight_decay: float
    b1: float
    b2: float
    grad_clip: float
    checkpoint_every: int
    eval_every: int
    log_every: int
    seed: int

    @classmethod
    def from_config(cls, pcfg) -> PretrainOptions:
        opts = cls(**{f.name: pcfg[f.name] for f in dataclasses.fields(cls)})
        opts.check()
        return opts

    def check(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "checkpoint_every", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"pretrain.{name} must be positive, got {getattr(self, name)}")
        if self.eval_every < 0:
            raise ValueError(f"pretrain.eval_every must be >= 0 (0 = off), got {self.eval_every}")
        # (the warm-up's first step has lr 0: with warmup_steps = steps = 1 nothing trains)
        if not 0 <= self.warmup_steps <= self.steps or self.warmup_steps == self.steps == 1:
            raise ValueError(
                f"pretrain.warmup_steps must be in [0, steps={self.steps}] and not the one step "
                f"of a one-step run, got {self.warmup_steps}"
            )
        if self.learning_rate <= 0:
            raise ValueError(f"pretrain.learning_rate must be positive, got {self.learning_rate}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"pretrain.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip <= 0:
            raise ValueError(f"pretrain.grad_clip must be positive, got {self.grad_clip}")
        for name in ("b1", "b2"):  # Adam's bias correction divides by 1 - b**t
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"pretrain.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise ValueError(f"pretrain.weight_decay must be >= 0, got {self.weight_decay}")


@functools.lru_cache(maxsize=8)
def make_task(model, opts: PretrainOptions, mesh) -> loop.Task:
    """Next-token cross-entropy, one AdamW group (decay on matrices), global-norm clipping;
    batches over ("data", "fsdp") of `mesh`, params and optimiser state over "fsdp"."""

    def loss_fn(params, tokens_bt, rng):
        del rng
        logits, _, _ = model.apply({"params": params}, tokens_bt)
        total, count = token_nll_sum(logits, tokens_bt, jnp.ones(tokens_bt.shape, bool))
        return total / count, {}

    schedule = optim.cosine_schedule(opts)
    adamw = optax.adamw(
        schedule,
        b1=opts.b1,
        b2=opts.b2,
        weight_decay=opts.weight_decay,
        mask=optim.matrices_only(),
    )
    return loop.Task(
        loss_fn=loss_fn,
        labels=lambda params: jax.tree.map(lambda _: "all", params),
        groups={"all": adamw},
        clip=optax.clip_by_global_norm(opts.grad_clip),
        param_spec=sharding.param_spec(mesh),
        batch_spec=sharding.train_batch_spec(mesh),
    )


def count_params(params) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))


def pretrain(
    model,
    init_params,
    train_stream: np.ndarray,
    opts: PretrainOptions,
    checkpoint_dir: str,
    *,
    eval_fn: Callable | None = None,
    log_fn: Callable | None = None,
    stop_after_steps: int | None = None,
    mesh=None,
):
    """Trains (resuming from `checkpoint_dir` if it holds a checkpoint); returns the state
    {params, opt_state, step, tokens, train_seconds}.

    eval_fn(params) -> dict is called every `eval_every` steps before the last (the caller
    evaluates the final params); log_fn(step, dict) receives training and eval metrics.
    `stop_after_steps` ends this call after that many steps of work without a final
    checkpoint, as a crash would, and returns None (used by tests). `mesh` (default: one
    device) splits each batch over its "data" and "fsdp" axes and the params over "fsdp".
    """
    mesh = mesh if mesh is not None else sharding.single_device_mesh(sharding.TRAIN_DATA_AXES)
    split = sharding.train_batch_devices(mesh)
    if opts.batch_size % split:
        raise ValueError(
            f"pretrain.batch_size {opts.batch_size} does not split over the {split} devices "
            "of mesh axes 'data' x 'fsdp'"
        )
    packing.train_batch(train_stream, 1, opts.seq_len, opts.seed, 0)  # validates sizes
    tokens_per_batch = opts.batch_size * opts.seq_len
    task = make_task(model, opts, mesh)
    # Each process builds only the rows of each batch that its devices hold.
    batches = loop.StreamBatches.from_rows(
        functools.partial(
            packing.train_batch, train_stream, opts.batch_size, opts.seq_len, opts.seed
        ),
        opts.batch_size,
    )
    loop_opts = loop.LoopOptions(
        steps=opts.steps,
        steps_per_call=1,
        log_every=opts.log_every,
        eval_every=opts.eval_every,
        checkpoint_every=opts.checkpoint_every,
        desc="pretrain",
    )

    def log_with_tokens(step, values):
        if log_fn is not None:
            log_fn(step, {**values, "tokens": step * tokens_per_batch})

    result = loop.run(
        task,
        loop.init_state(task, init_params, rng=jax.random.PRNGKey(opts.seed)),
        batches,
        loop_opts,
        mesh=mesh,
        checkpoint_dir=checkpoint_dir,
        log_fn=log_with_tokens,
        eval_fn=eval_fn,
        stop_after_steps=stop_after_steps,
    )
    if result is None:
        return None
    st = result.state
    return {
        "params": st.params,
        "opt_state": st.opt_state,
        "step": np.asarray(st.step, np.int64),
        "tokens": np.asarray(int(st.position) * tokens_per_batch, np.int64),
        "train_seconds": np.asarray(result.train_seconds, np.float64),
    }
