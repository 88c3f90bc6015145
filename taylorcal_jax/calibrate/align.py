"""Taylor-Calibrate phase 2: short per-layer alignment of GDN mixers (METHOD.md §5).

Letters: L converted layers, N sequences, T time, D hidden.

Each converted layer is fitted on its own, teacher-forced: with x the teacher's mixer input
and y the teacher's attention output (post-o_proj), minimise

    loss(theta) = sum_{n,t valid} ||GDN_theta(x)_nt - y_nt||^2 / (#valid * D)

with AdamW (weight decay, global-norm clipping) in the mixer's parameter groups (its registry
entry's `param_groups`): "slow" at `lr_qkv` (for GDN: q/k/v projections and their convs),
"fast" at `lr_gates` (a/b projections, A_log, dt_bias and g projection), "frozen" not trained
(o_proj and o_norm). The parameters of the best step are kept (the loss is evaluated before
every update and once after the last).

`fit_layer` is pure; `fit_layers` vmaps it over layers stacked on a leading axis and runs it
under `jit` with NamedSharding over a mesh: the layer axis on mesh axis "layers" and the
sequence axis on "data" (either may have size 1). With a data axis of size 1 the layers are
split by `shard_map` (no collectives at all); otherwise the SPMD partitioner splits both.
Layers are padded to a multiple of the "layers" axis by repeating the last one; the padding
is dropped from the result.
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

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"calibration.align.steps must be >= 0, got {self.steps}")

    @classmethod
    def from_config(cls, cfg) -> AlignConfig:
        return cls(**{f.name: cfg[f.name] for f in dataclasses.fields(cls)})


def split_params(mixer_params, labels):
    """(trainable, frozen) top-level parts of one layer's mixer params, by their group labels
    (a part is frozen when all its leaves are "frozen")."""
    frozen_keys = set()
    for k in mixer_params:
        groups = set(jax.tree.leaves(labels[k]))
        if "frozen" in groups and groups != {"frozen"}:
            raise ValueError(f"mixer param {k!r} mixes frozen and trained leaves: {groups}")
        if groups == {"frozen"}:
            frozen_keys.add(k)
    train = {k: v for k, v in mixer_params.items() if k not in frozen_keys}
    frozen = {k: v for k, v in mixer_params.items() if k in frozen_keys}
    return train, frozen


def make_optimizer(cfg: AlignConfig, train_params, labels):
    labels = {k: labels[k] for k in train_params}
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.multi_transform(
            {
                "slow": optax.adamw(cfg.lr_qkv, weight_decay=cfg.weight_decay),
                "fast": optax.adamw(cfg.lr_gates, weight_decay=cfg.weight_decay),
            },
            labels,
        ),
    )


def layer_loss(mixer_params, x_ntd, y_ntd, valid_nt, *, model_config, mixer: StudentMixer):
    """Mean squared error of the mixer output over valid tokens and hidden units."""
    out, _, _ = mixer.module(model_config).apply({"params": mixer_params}, x_ntd, valid_bt=valid_nt)
    w = valid_nt[..., None].astype(jnp.float32)
    err = jnp.square(out.astype(jnp.float32) - y_ntd.astype(jnp.float32)) * w
    return jnp.sum(err) / jnp.maximum(jnp.sum(w) * y_ntd.shape[-1], 1.0)


def fit_layer(mixer_params, x_ntd, y_ntd, valid_nt, *, model_config, mixer, cfg: AlignConfig):
    """Phase 2 for one layer. Returns (best params, {"loss_before", "loss_after", "curve"}).

    curve[s] is the loss before update s (curve[0] = loss of the input params); loss_after
    is the loss of the returned (best) params.
    """
    labels = mixer.spec.param_groups(mixer_params)
    train, frozen = split_params(mixer_params, labels)
    opt = make_optimizer(cfg, train, labels)
    loss_fn = functools.partial(
        layer_loss,
        x_ntd=x_ntd,
        y_ntd=y_ntd,
        valid_nt=valid_nt,
        model_config=model_config,
        mixer=mixer,
    )

    def loss_of(tr):
        return loss_fn({**tr, **frozen})

    def step(s, carry):
        tr, state, best, best_loss, curve = carry
        loss, grads = jax.value_and_grad(loss_of)(tr)
        better = loss < best_loss
        best = jax.tree.map(lambda a, b: jnp.where(better, a, b), tr, best)
        best_loss = jnp.where(better, loss, best_loss)
        updates, state = opt.update(grads, state, tr)
        tr = optax.apply_updates(tr, updates)
        return tr, state, best, best_loss, curve.at[s].set(loss)

    carry = (
        train,
        opt.init(train),
        train,
        jnp.asarray(jnp.inf, jnp.float32),
        jnp.zeros((max(cfg.steps, 1),), jnp.float32),
    )
    tr, _, best, best_loss, curve = jax.lax.fori_loop(0, cfg.steps, step, carry)
    final = loss_of(tr)
    better = final < best_loss
    best = jax.tree.map(lambda a, b: jnp.where(better, a, b), tr, best)
    best_loss = jnp.minimum(final, best_loss)
    before = curve[0] if cfg.steps > 0 else final
    curve = curve if cfg.steps > 0 else curve.at[0].set(final)
    return {**best, **frozen}, {"loss_before": before, "loss_after": best_loss, "curve": curve}


@functools.lru_cache(maxsize=8)
def _fit_layers_jit(model_config, mixer, cfg, mesh):
    fn = jax.vmap(
        functools.partial(fit_layer, model_config=model_config, mixer=mixer, cfg=cfg),
        in_axes=(0, 0, 0, None),
    )
    lay = sharding.named(mesh, "layers")
    act = sharding.named(mesh, "layers", "data")
    dat = sharding.named(mesh, "data")
    if mesh.size == 1:  # one device: nothing to partition
        return jax.jit(fn)
    if sharding.axis_size(mesh, "data") == 1:
        # Layers are independent: each device fits its own slice, no collectives. shard_map
        # keeps custom kernels (Pallas) out of the SPMD partitioner.
        fn = jax.shard_map(
            fn,
            mesh=mesh,
            in_specs=(P("layers"), P("layers"), P("layers"), P()),
            out_specs=P("layers"),
            check_vma=False,
        )
        return jax.jit(fn, in_shardings=(lay, lay, lay, dat), out_shardings=lay)
    return jax.jit(fn, in_shardings=(lay, act, act, dat), out_shardings=lay)


def fit_layers(stacked_mixers, x_lntd, y_lntd, valid_nt, *, model_config, mixer, cfg, mesh):
    """`fit_layer` for L layers stacked on axis 0, sharded over mesh axes "layers" and "data".

    N must be divisible by the "data" axis size. Returns (stacked best params, metrics with
    leading axis L).
    """
    n_layers = x_lntd.shape[0]
    n_seq = x_lntd.shape[1]
    n_lay_dev = sharding.axis_size(mesh, "layers")
    n_dat_dev = sharding.axis_size(mesh, "data")
    if n_seq % n_dat_dev:
        raise ValueError(
            f"{n_seq} calibration sequences do not split over mesh axis 'data' of size "
            f"{n_dat_dev}; use a multiple of it (calibration.num_sequences) or a smaller axis"
        )
    pad = -n_layers % n_lay_dev

    def pad_leading(a):
        if pad == 0:
            return a
        return jnp.concatenate([a, jnp.repeat(a[-1:], pad, axis=0)], axis=0)

    args = jax.tree.map(pad_leading, (stacked_mixers, x_lntd, y_lntd))
    fn = _fit_layers_jit(model_config, mixer, cfg, mesh)
    params, metrics = fn(*args, jnp.asarray(valid_nt, bool))
    return jax.tree.map(lambda a: a[:n_layers], (params, metrics))


def align_student(student_params, stats, layers: Sequence[int], *, model_config, mixer, cfg, mesh):
    """Phase 2 on the student mixers of `layers` of a student; returns (new params, metrics)."""
    layers = tuple(layers)
    if not layers:
        return student_params, {}
    if stats.x_lntd is None:
        raise ValueError("statistics were collected with keep_activations=False")
    rows = jnp.asarray([stats.index(i) for i in layers])
    stacked = stack_mixers(student_params, layers, mixer.name)
    new, metrics = fit_layers(
        stacked,
        stats.x_lntd[rows],
        stats.attn_out_lntd[rows],
        stats.valid_nt,
        model_config=model_config,
        mixer=mixer,
        cfg=cfg,
        mesh=mesh,
    )
    return unstack_mixers(student_params, layers, new, mixer.name), metrics
