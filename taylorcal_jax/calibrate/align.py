"""Taylor-Calibrate phase 2: short per-layer alignment of GDN mixers (docs/method.md §5).

Letters: L converted layers, N sequences, T time, D hidden.

Each converted layer is fitted on its own, teacher-forced: with x the teacher's mixer input
and y the teacher's attention output (post-o_proj), minimise

    loss(theta) = sum_{n,t valid} ||GDN_theta(x)_nt - y_nt||^2 / (#valid * D)

with AdamW (weight decay, global-norm clipping) in two learning-rate groups
(q/k/v projections and their convs: `lr_qkv`; a/b projections, A_log, dt_bias and g
projection: `lr_gates`); o_proj and o_norm are frozen. The parameters of the best step are
kept (the loss is evaluated before every update and once after the last).

The L layers run together on the training loop (train/loop.py), stacked on a leading axis:
the loss is sum_l loss_l (the copies that pad L to the mesh's "layers" axis weighted 0), whose
gradient is each layer's own; AdamW is elementwise and the
clipping is per layer (optim.clip_slices_by_global_norm), so this is exactly L separate
optimisers. The loop's `extra` keeps each layer's best params, best loss and loss curve; the
steps run in jitted calls of `checkpoint_every` steps on the fixed calibration batch, each
followed by an orbax checkpoint of the whole loop state (extra included) when a checkpoint
directory is given, from which a rerun resumes bit-for-bit (calls end at the same steps).
Stacking, placement over the mesh (layers on "layers", sequences on "data") and padding to a
multiple of the "layers" axis are train/layerwise.py's, shared with distillation stage 1; the
padding is dropped from the result.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from taylorcal_jax.calibrate.stacking import stack_mixers, unstack_mixers
from taylorcal_jax.models.mixers import StudentMixer
from taylorcal_jax.train import layerwise, loop, optim
from taylorcal_jax.utils import sharding
from taylorcal_jax.utils.sharding import P


@dataclasses.dataclass(frozen=True)
class AlignConfig:
    """Phase-2 options (configs/common.py, section `calibration.align`)."""

    steps: int
    lr_qkv: float
    lr_gates: float
    weight_decay: float
    clip_norm: float
    checkpoint_every: int  # steps between checkpoints (0 = none; needs a checkpoint directory)

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"calibration.align.steps must be >= 0, got {self.steps}")
        if self.checkpoint_every < 0:
            raise ValueError(
                f"calibration.align.checkpoint_every must be >= 0 (0 = off), got "
                f"{self.checkpoint_every}"
            )
        # a negative clip norm scales the update by a negative factor: gradient ascent
        for name in ("lr_qkv", "lr_gates", "clip_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"calibration.align.{name} must be > 0, got {getattr(self, name)}")
        if not self.weight_decay >= 0:
            raise ValueError(
                f"calibration.align.weight_decay must be >= 0, got {self.weight_decay}"
            )

    @classmethod
    def from_config(cls, cfg) -> AlignConfig:
        return cls(**{f.name: cfg[f.name] for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class AlignSetup:
    """What phase 2 fits and where; hashable, it keys make_task's cache of compiled tasks.

    model_config: the teacher's ModelConfig; mixer: the StudentMixer of the converted layers;
    cfg: the phase-2 options; mesh: a jax.sharding.Mesh with axes "layers" and "data".
    """

    model_config: object
    mixer: StudentMixer
    cfg: AlignConfig
    mesh: object


def layer_loss(mixer_params, x_ntd, y_ntd, valid_nt, *, model_config, mixer: StudentMixer):
    """Mean squared error of the mixer output over valid tokens and hidden units."""
    out, _, _ = mixer.module(model_config).apply({"params": mixer_params}, x_ntd, valid_bt=valid_nt)
    w = valid_nt[..., None].astype(jnp.float32)
    err = jnp.square(out.astype(jnp.float32) - y_ntd.astype(jnp.float32)) * w
    return jnp.sum(err) / jnp.maximum(jnp.sum(w) * y_ntd.shape[-1], 1.0)


def _keep_best(extra, params, loss_l):
    """extra with each layer's best params / loss replaced where loss_l is lower."""
    better_l = loss_l < extra["best_loss"]

    def pick(new, old):
        return jnp.where(better_l.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)

    return {
        **extra,
        "best": jax.tree.map(pick, params, extra["best"]),
        "best_loss": jnp.where(better_l, loss_l, extra["best_loss"]),
    }


@functools.lru_cache(maxsize=8)
def make_task(setup: AlignSetup) -> loop.Task:
    """The loop task of phase 2 on L stacked layers: loss = sum_l w_l loss_l (independent
    layers, so its gradient is each layer's own; w_l = batch["weight"], 0 for the copies that
    pad L to the "layers" axis, so the logged loss does not depend on the mesh), AdamW per
    group, clipping per layer.

    extra = {"best", "best_loss", "curve"}: per layer the params of the lowest loss seen so
    far, that loss, and curve[l, s] = loss of layer l at step s (before update s).
    """
    mixer, cfg, mesh = setup.mixer, setup.cfg, setup.mesh
    losses = layerwise.stacked_losses(
        functools.partial(layer_loss, model_config=setup.model_config, mixer=mixer), mesh
    )

    def loss_fn(params, batch, rng):
        del rng
        loss_l = losses(params, batch["x"], batch["y"], batch["valid"])
        return jnp.sum(batch["weight"] * loss_l), {"layer_loss": loss_l}

    def update_extra(extra, step, params, loss, aux):
        del loss
        loss_l = aux["layer_loss"]
        extra = _keep_best(extra, params, loss_l)
        return {**extra, "curve": extra["curve"].at[:, step].set(loss_l)}

    act = layerwise.activation_spec(mesh)
    return loop.Task(
        loss_fn=loss_fn,
        labels=mixer.spec.param_groups,  # "slow", "fast" or "frozen" per leaf
        groups={
            "slow": optax.adamw(cfg.lr_qkv, weight_decay=cfg.weight_decay),
            "fast": optax.adamw(cfg.lr_gates, weight_decay=cfg.weight_decay),
        },
        clip=optim.clip_slices_by_global_norm(cfg.clip_norm),
        update_extra=update_extra,
        param_spec=loop.leading_axis("layers"),
        batch_spec={"x": act, "y": act, "valid": P("data"), "weight": P("layers")},
    )


def fit_layers(
    stacked_mixers,
    x_lntd,
    y_lntd,
    valid_nt,
    setup: AlignSetup,
    *,
    checkpoint_dir: str | None = None,
    log_fn=None,
    stop_after_steps: int | None = None,
):
    """Phase 2 for L layers stacked on axis 0, sharded over the axes "layers" and "data" of
    setup.mesh.

    N must be divisible by the "data" axis size. Returns (stacked best params, metrics
    {"loss_before", "loss_after", "curve"} with leading axis L): curve[l, s] is the loss
    before update s (curve[:, 0] = loss of the input params; one column of the input loss
    when steps = 0); loss_after is the loss of the returned (best) params, the best of the
    losses before every update and after the last.

    With `checkpoint_dir` and setup.cfg.checkpoint_every > 0 the loop state is saved there every
    checkpoint_every steps and at the end, and a call finding a checkpoint there resumes
    from it (the mesh must be the one it was saved under). log_fn(step, dict) gets the
    loop's events ({"resumed_from_step"} on resume, the summed loss at the end);
    `stop_after_steps` ends the call after that many steps without saving, as a crash
    would, and returns None (tests).
    """
    cfg, mesh = setup.cfg, setup.mesh
    setup.mixer.spec.param_groups(stacked_mixers)  # a one-line error for params of no group
    n_layers = x_lntd.shape[0]
    n_seq = x_lntd.shape[1]
    n_dat_dev = sharding.axis_size(mesh, "data")
    if n_seq % n_dat_dev:
        raise ValueError(
            f"{n_seq} calibration sequences do not split over mesh axis 'data' of size "
            f"{n_dat_dev}; use a multiple of it (calibration.num_sequences) or a smaller axis"
        )
    pad = layerwise.layer_padding(n_layers, mesh)
    params, x_lntd, y_lntd = layerwise.pad_layers((stacked_mixers, x_lntd, y_lntd), pad)
    batch = {
        "x": x_lntd,
        "y": y_lntd,
        "valid": jnp.asarray(valid_nt, bool),
        "weight": layerwise.layer_weights(n_layers, pad),
    }
    task = make_task(setup)
    extra = {
        "best": params,
        "best_loss": jnp.full((n_layers + pad,), jnp.inf, jnp.float32),
        "curve": jnp.zeros((n_layers + pad, cfg.steps + 1), jnp.float32),
    }
    # Loop step `steps` only scores the final params (its update is never used): one extra
    # gradient evaluation instead of a second compiled program. Checkpoints cut the calls
    # (loop.LoopOptions.call_end); without them all steps run in one call.
    every = cfg.checkpoint_every if checkpoint_dir is not None else 0
    opts = loop.LoopOptions(
        steps=cfg.steps + 1,
        steps_per_call=cfg.steps + 1,
        log_every=0,
        eval_every=0,
        checkpoint_every=every,
        desc="align",
    )
    state = loop.init_state(task, params, rng=jax.random.PRNGKey(0), extra=extra)
    result = loop.run(
        task,
        state,
        loop.FixedBatch(batch),
        opts,
        mesh=mesh,
        checkpoint_dir=checkpoint_dir if every else None,
        log_fn=log_fn,
        stop_after_steps=stop_after_steps,
    )
    if result is None:
        return None
    extra = result.state.extra
    curve = extra["curve"][:, : max(cfg.steps, 1)]
    metrics = {"loss_before": curve[:, 0], "loss_after": extra["best_loss"], "curve": curve}
    return jax.tree.map(lambda a: a[:n_layers], (extra["best"], metrics))


def align_student(
    student_params,
    stats,
    layers: Sequence[int],
    setup: AlignSetup,
    *,
    checkpoint_dir: str | None = None,
    log_fn=None,
):
    """Phase 2 on the student mixers of `layers` of a student; returns (new params, metrics).
    checkpoint_dir, log_fn: as in `fit_layers`."""
    layers = tuple(layers)
    if not layers:
        return student_params, {}
    if stats.x_lntd is None:
        raise ValueError("statistics were collected with keep_activations=False")
    rows = jnp.asarray([stats.index(i) for i in layers])
    name = setup.mixer.name
    stacked = stack_mixers(student_params, layers, name)
    new, metrics = fit_layers(
        stacked,
        stats.x_lntd[rows],
        stats.attn_out_lntd[rows],
        stats.valid_nt,
        setup,
        checkpoint_dir=checkpoint_dir,
        log_fn=log_fn,
    )
    return unstack_mixers(student_params, layers, new, name), metrics
