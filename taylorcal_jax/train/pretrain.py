"""Pretraining a small Llama-architecture teacher: next-token cross-entropy, AdamW.

Letters: B batch, T time, V vocab.

    loss(theta) = mean_{b,t} -log softmax(f_theta(x_b)_t)[x_{b,t+1}]
    lr(s)       = warmup linearly 0 -> lr_peak over `warmup_steps`, then cosine to
                  lr_peak * min_lr_ratio at `steps`
    update      = AdamW(b1, b2, weight_decay on matrices only) after global-norm clipping

The batch of step s is `packing.train_batch(train_stream, B, T, seed, s)`, a pure function
of (seed, s); the training state {params, opt_state, step, tokens, train_seconds} is saved
with orbax every `checkpoint_every` steps. A run interrupted at any point and started
again resumes from the last checkpoint and ends with the same parameters as an
uninterrupted run (steps after the checkpoint are recomputed identically).
`train_seconds` is wall time of the step loop (first-step compilation and the periodic
evals included, checkpoint writing excluded), summed over resumed runs.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from taylorcal_jax.data import packing
from taylorcal_jax.eval.perplexity import token_nll_sum
from taylorcal_jax.utils.checkpoint import TrainCheckpointer
from taylorcal_jax.utils.progress import progress


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
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(
                f"pretrain.warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}"
            )
        if self.learning_rate <= 0:
            raise ValueError(f"pretrain.learning_rate must be positive, got {self.learning_rate}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"pretrain.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip <= 0:
            raise ValueError(f"pretrain.grad_clip must be positive, got {self.grad_clip}")


def make_optimizer(opts: PretrainOptions) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=opts.learning_rate,
        warmup_steps=opts.warmup_steps,
        decay_steps=opts.steps,
        end_value=opts.learning_rate * opts.min_lr_ratio,
    )
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(opts.grad_clip),
        optax.adamw(
            schedule, b1=opts.b1, b2=opts.b2, weight_decay=opts.weight_decay, mask=decay_mask
        ),
    )


def _global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree_util.tree_leaves(tree)))


@functools.lru_cache(maxsize=8)
def make_train_step(model, opts: PretrainOptions) -> Callable:
    """Jitted (params, opt_state, tokens_bt) -> (params, opt_state, loss, grad_norm); cached."""
    optimizer = make_optimizer(opts)

    def loss_fn(params, tokens_bt):
        logits, _, _ = model.apply({"params": params}, tokens_bt)
        total, count = token_nll_sum(logits, tokens_bt, jnp.ones(tokens_bt.shape, bool))
        return total / count

    @jax.jit
    def train_step(params, opt_state, tokens_bt):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens_bt)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, loss, _global_norm(grads)

    return train_step


def count_params(params) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))


def _state(params, opt_state, step: int, tokens: int, seconds: float) -> dict:
    """The checkpointed training state (0-d numpy arrays for the counters, as orbax wants)."""
    return {
        "params": params,
        "opt_state": opt_state,
        "step": np.asarray(step, np.int64),
        "tokens": np.asarray(tokens, np.int64),
        "train_seconds": np.asarray(seconds, np.float64),
    }


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
):
    """Trains (resuming from `checkpoint_dir` if it holds a checkpoint); returns the state.

    eval_fn(params) -> dict is called every `eval_every` steps before the last (the caller
    evaluates the final params); log_fn(step, dict) receives training and eval metrics.
    `stop_after_steps` ends this call after that many steps of work without a final
    checkpoint, as a crash would (used by tests).
    """
    packing.train_batch(train_stream, 1, opts.seq_len, opts.seed, 0)  # validates sizes
    state = _state(init_params, make_optimizer(opts).init(init_params), 0, 0, 0.0)
    log_fn = log_fn or (lambda step, values: None)
    train_step = make_train_step(model, opts)
    with TrainCheckpointer(checkpoint_dir, save_every=opts.checkpoint_every) as ckpt:
        state = ckpt.restore_or(state)
        start = int(state["step"])
        params, opt_state = state["params"], state["opt_state"]
        tokens, seconds = int(state["tokens"]), float(state["train_seconds"])
        if start:
            log_fn(start, {"resumed_from_step": start})
        bar = progress(range(start, opts.steps), desc="pretrain", initial=start, total=opts.steps)
        done = 0
        t0 = time.perf_counter()
        for step in bar:
            batch = packing.train_batch(
                train_stream, opts.batch_size, opts.seq_len, opts.seed, step
            )
            params, opt_state, loss, gnorm = train_step(params, opt_state, jnp.asarray(batch))
            tokens += batch.size
            done += 1
            n = step + 1
            if n % opts.log_every == 0 or n == opts.steps:
                loss = float(loss)
                bar.set_postfix(loss=f"{loss:.3f}")
                log_fn(
                    n,
                    {
                        "loss": loss,
                        "grad_norm": float(gnorm),
                        "tokens": tokens,
                        "train_seconds": seconds + time.perf_counter() - t0,
                    },
                )
            if (
                eval_fn is not None
                and opts.eval_every
                and n % opts.eval_every == 0
                and n < opts.steps
            ):
                log_fn(n, eval_fn(params))
            if stop_after_steps is not None and done >= stop_after_steps:
                return None
            if n % opts.checkpoint_every == 0 or n == opts.steps:
                jax.block_until_ready(params)
                now = time.perf_counter()
                seconds, t0 = seconds + now - t0, now
                state = _state(params, opt_state, n, tokens, seconds)
                ckpt.maybe_save(n, state, force=True)
                t0 = time.perf_counter()  # checkpoint writing is not training time
    return state  # restored as is when the checkpoint was already at `steps`
