"""Distillation stage 2: the whole student trained on KL(teacher || student), end to end.

Letters: B batch, T time, D hidden, V vocab.

    loss(theta) = mean_{b,t} KL( softmax(teacher(x)_bt) || softmax(student_theta(x)_bt) )

over every position of each sequence (train/kl.py: chunked over T, so [B, T, V] logits never
exist for both models at once), the teacher's logits computed on the fly from its params, a
constant of the loop (train/loop.py). The batch of step s is `packing.train_batch(stream, B,
T, seed, s)`, a pure function of s.

Every parameter trains, in two AdamW groups with constant learning rates after a linear
warm-up (docs/method.md §6: the release's 1e-4 and 7e-6): "mixer", every parameter of the
student mixers (the converted layers), and "rest", everything else (embeddings, norms, MLPs,
kept attention, head); one global-norm clip over all of them first.

Precision: params (and the optimiser state) are float32 masters; the models compute in the
`dtype` they are built with (Flax `dtype`, bf16 for training) and their `remat` recomputes each
block in the backward pass. The student mixer's op (GDN's `impl`: `auto` is the Pallas kernel
on a GPU) is part of the student model's runtime options, and so is both models' softmax
attention (layers.AttentionRuntime.sequence_impl, `distill.kl.attention_impl`: the batches are
unpadded, so cuDNN's fused attention may take it on a GPU).

Placement: the batch is split over every device of the mesh. With more than one device the
loss runs under `shard_map` (each device its rows, which keeps custom kernels out of the SPMD
partitioner; the per-device KL sums and counts are added after it). Params, optimiser state
and the teacher's params are stored by the task's `param_spec`: the stage passes
utils/sharding.param_spec, which splits each leaf over the mesh's "fsdp" axis (FSDP) and
replicates it without one. Inside the shard_map both models gather their params one layer at
a time (`Transformer.param_layout`; the LM heads just before the KL), so a device never holds
either model whole; the transpose of each gather reduce-scatters that layer's gradients back
to shards, and with remat the backward pass gathers each layer again rather than keeping it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from taylorcal_jax.models.layers import AttentionRuntime
from taylorcal_jax.models.paths import layer_index, mixer_key
from taylorcal_jax.models.teacher import Transformer
from taylorcal_jax.train import kl, loop, optim
from taylorcal_jax.utils import sharding

MIXER_GROUP = "mixer"
REST_GROUP = "rest"


@dataclasses.dataclass(frozen=True)
class KLDistillConfig:
    """What the stage-2 task needs (configs/common.py, section `distill.kl`; warmup_steps
    counted from its token figures)."""

    lr_mixer: float
    lr_rest: float
    warmup_steps: int
    weight_decay: float
    clip_norm: float
    chunk_size: int  # positions per KL chunk


def stage2_models(sc, mixer_runtime, dtype, *, remat: bool, attention_impl: str):
    """(student, teacher) Transformer modules of stage 2 for student config `sc`: both compute
    in `dtype` with softmax attention by `attention_impl` (AttentionRuntime.sequence_impl);
    the student's mixers run by `mixer_runtime` and its blocks are rematerialised if `remat`."""
    attention = AttentionRuntime(sequence_impl=attention_impl)
    student = sc.model(dtype=dtype, runtime=mixer_runtime, attention_runtime=attention)
    teacher = Transformer(sc.teacher, dtype=dtype, attention_runtime=attention)
    return student.clone(remat=remat), teacher


def final_hidden(model, params, tokens_bt):
    """The final-norm hidden states [B, T, D] of a Transformer (its LM head's input).

    Captured from the top-level "norm" module; the logits the model also returns are unused,
    so the compiler drops the LM head.
    """

    def is_final_norm(module, method_name):
        return module.path == ("norm",) and method_name == "__call__"

    _, state = model.apply(
        {"params": params},
        tokens_bt,
        capture_intermediates=is_final_norm,
        mutable=["intermediates"],
    )
    return state["intermediates"]["norm"]["__call__"][0]


def mixer_labels(mixer_name: str) -> Callable:
    """Partition of a student's params: MIXER_GROUP under a block's mixer `mixer_name`,
    REST_GROUP elsewhere."""
    key = mixer_key(mixer_name)

    def labels(params):
        def block(name, sub):
            if layer_index(name) is None:
                return jax.tree.map(lambda _: REST_GROUP, sub)
            return {
                k: jax.tree.map(lambda _, g=MIXER_GROUP if k == key else REST_GROUP: g, v)
                for k, v in sub.items()
            }

        return {name: block(name, sub) for name, sub in params.items()}

    return labels


def kl_loss(student, teacher, params, teacher_params, tokens_bt, *, chunk: int):
    """(KL sum over the positions of `tokens_bt`, their number) of student vs teacher."""
    h_t = jax.lax.stop_gradient(final_hidden(teacher, teacher_params, tokens_bt))
    h_s = final_hidden(student, params, tokens_bt)
    # With params in shards, both heads are gathered once both models have run (the KL needs
    # them together): neither is alive through the other model's forward pass.
    hidden = (h_t, h_s)
    w_t = kl.head_matrix(teacher_params, teacher.config, layout=teacher.param_layout, after=hidden)
    w_t = jax.lax.stop_gradient(w_t)
    w_s = kl.head_matrix(params, student.config, layout=student.param_layout, after=hidden)
    valid_bt = jnp.ones(tokens_bt.shape, bool)
    return kl.kl_sum(h_t, w_t, h_s, w_s, valid_bt, chunk=chunk)


@functools.lru_cache(maxsize=8)
def make_task(
    student,
    teacher,
    mixer_name: str,
    cfg: KLDistillConfig,
    mesh,
    param_spec: Callable = loop.replicated,
) -> loop.Task:
    """The loop task of stage 2 (module docstring). `student`, `teacher`: Transformer modules
    (dtype and remat as trained); `param_spec` places params, optimiser state and the
    teacher's params (e.g. sharded over an FSDP axis)."""
    sums = functools.partial(kl_loss, student, teacher, chunk=cfg.chunk_size)
    if mesh.size > 1:
        batch = sharding.batch_spec(mesh)

        def sums(params, teacher_params, tokens_bt):
            # Each device scores its rows: the leaves come in with their `param_spec` shards and
            # each model gathers them one layer at a time (the gradient of a gather is a
            # reduce-scatter, so gradients and optimiser state stay sharded).
            specs = jax.tree.map(param_spec, params)
            teacher_specs = jax.tree.map(param_spec, teacher_params)
            local = functools.partial(
                kl_loss,
                student.clone(param_layout=sharding.ParamLayout.of(specs)),
                teacher.clone(param_layout=sharding.ParamLayout.of(teacher_specs)),
                chunk=cfg.chunk_size,
            )

            def per_device(p, tp, tok):
                total, count = local(p, tp, tok)
                return total[None], count[None]

            total, count = jax.shard_map(
                per_device,
                mesh=mesh,
                in_specs=(specs, teacher_specs, batch),
                out_specs=(batch, batch),
                check_vma=False,
            )(params, teacher_params, tokens_bt)
            return jnp.sum(total), jnp.sum(count)

    def loss_fn(params, tokens_bt, rng, teacher_params):
        del rng
        total, count = sums(params, teacher_params, tokens_bt)
        return total / count, {}

    def adamw(lr):
        schedule = optim.make_schedule(
            "constant", lr, steps=0, warmup_steps=cfg.warmup_steps, min_lr_ratio=1.0
        )
        return optax.adamw(schedule, weight_decay=cfg.weight_decay, mask=optim.matrices_only())

    return loop.Task(
        loss_fn=loss_fn,
        labels=mixer_labels(mixer_name),
        groups={MIXER_GROUP: adamw(cfg.lr_mixer), REST_GROUP: adamw(cfg.lr_rest)},
        clip=optax.clip_by_global_norm(cfg.clip_norm),
        param_spec=param_spec,
        constant_spec=param_spec,
        batch_spec=sharding.batch_spec(mesh),
    )
