"""Distillation stage 1: every converted layer fitted to its teacher layer on a token stream.

Letters: L converted layers, B batch, T time, D hidden.

Per step, the teacher runs on a batch of tokens and gives, for each converted layer l, its
mixer input x_l = rmsnorm_l(h_l) and its attention output y_l (post-o_proj): the student
mixer of layer l is teacher-forced on x_l (docs/method.md §6), and

    loss_l = mean_{b,t} ||y_l,bt - GDN_l(x_l)_bt||_2 / sqrt(D)
    loss   = mean_l loss_l

Each token's term is the root-mean-square of its error over the D hidden units. Phase-2
alignment (calibrate/align.py) minimises the mean of its square, MSE_l = mean_{b,t} ||e||^2 / D,
on one fixed batch: loss_l <= sqrt(MSE_l) (Jensen), equal when every token's error has the
same size, and its gradient weighs token (b, t) by 1 / (2 rms_bt) relative to the MSE's, so a
few badly fitted tokens weigh less. Here the batch is new at every step: batch s is
`packing.train_batch(stream, B, T, seed, s)`, a pure function of s.

Only mixer params train (every one of them, o_proj and o_norm included), all layers in one
AdamW group with one learning rate (cosine schedule after a linear warm-up) after one
global-norm clip over all of them, as one model would be trained. The layers are stacked
and placed as alignment places them (train/layerwise.py: layers over mesh axis "layers",
the batch over "data"); padding layers have weight 0 in the mean, so they get no gradient.
The teacher's params are a constant of the loop (train/loop.py), replicated; each device
runs the teacher on its share of the batch, its softmax attention by `attention_impl`
(layers.AttentionRuntime.sequence_impl: the batches are unpadded). `remat` recomputes each
layer's mixer in the backward pass instead of keeping its activations.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from taylorcal_jax.models.layers import AttentionRuntime
from taylorcal_jax.models.mixers import StudentMixer
from taylorcal_jax.models.paths import layer_key
from taylorcal_jax.models.teacher import Transformer
from taylorcal_jax.train import layerwise, loop, optim
from taylorcal_jax.utils import sharding
from taylorcal_jax.utils.sharding import P

GROUP = "mixer"


@dataclasses.dataclass(frozen=True)
class LayerDistillConfig:
    """What the stage-1 task needs (configs/common.py, section `distill.layers`; steps and
    warmup_steps counted from its token figures)."""

    steps: int
    learning_rate: float
    warmup_steps: int
    min_lr_ratio: float
    weight_decay: float
    clip_norm: float
    dtype: str  # compute dtype of the teacher pass and the mixers; params stay float32
    remat: bool
    attention_impl: str = "blocked"  # the teacher pass's layers.AttentionRuntime.sequence_impl


def rms_error(out_ntd, y_ntd, valid_nt):
    """mean over valid tokens of ||y - out||_2 / sqrt(D), float32.

    The norm of a zero error is 0 with a zero gradient (where sqrt's would be infinite).
    """
    err = out_ntd.astype(jnp.float32) - y_ntd.astype(jnp.float32)
    sq_nt = jnp.sum(jnp.square(err), axis=-1)
    nonzero = sq_nt > 0
    norm_nt = jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq_nt, 1.0)), 0.0)
    w = valid_nt.astype(jnp.float32)
    return jnp.sum(norm_nt * w) / (jnp.maximum(jnp.sum(w), 1.0) * jnp.sqrt(y_ntd.shape[-1]))


def layer_loss(mixer_params, x_ntd, y_ntd, valid_nt, *, model_config, mixer, dtype):
    """loss_l of one layer (module docstring)."""
    module = mixer.module(model_config, dtype=dtype)
    out, _, _ = module.apply({"params": mixer_params}, x_ntd, valid_bt=valid_nt)
    return rms_error(out, y_ntd, valid_nt)


def teacher_activations(teacher: Transformer, teacher_params, tokens_bt, layers):
    """(x_lbtd, y_lbtd): the mixer inputs and attention outputs of `layers` in a teacher pass.

    The LM head runs on the last position only, and only what reaches the returned
    activations is computed (the compiler drops the blocks after the last of `layers`).
    """
    _, _, inters = teacher.apply(
        {"params": teacher_params},
        tokens_bt,
        return_intermediates=True,
        last_logits_only=True,
    )
    x = jnp.stack([inters[layer_key(i)]["attn_in"] for i in layers])
    y = jnp.stack([inters[layer_key(i)]["attn_out"] for i in layers])
    return jax.lax.stop_gradient(x), jax.lax.stop_gradient(y)


@functools.lru_cache(maxsize=8)
def make_task(
    model_config, mixer: StudentMixer, layers: tuple[int, ...], cfg: LayerDistillConfig, mesh
) -> loop.Task:
    """The loop task of stage 1 on the stacked mixers of `layers` (padded to a multiple of
    the "layers" axis); its loss_fn takes the teacher's params as the loop's constants."""
    dtype = jnp.dtype(cfg.dtype)
    pad = layerwise.layer_padding(len(layers), mesh)
    one_layer = functools.partial(layer_loss, model_config=model_config, mixer=mixer, dtype=dtype)
    if cfg.remat:
        one_layer = jax.checkpoint(one_layer)
    losses = layerwise.stacked_losses(one_layer, mesh)
    teacher = Transformer(
        model_config,
        dtype=dtype,
        attention_runtime=AttentionRuntime(sequence_impl=cfg.attention_impl),
    )
    weight_l = layerwise.layer_weights(len(layers), pad)
    act = sharding.named(mesh, *layerwise.activation_spec(mesh))

    def loss_fn(params, tokens_bt, rng, teacher_params):
        del rng
        x_lbtd, y_lbtd = layerwise.pad_layers(
            teacher_activations(teacher, teacher_params, tokens_bt, layers), pad
        )
        x_lbtd = jax.lax.with_sharding_constraint(x_lbtd, act)
        y_lbtd = jax.lax.with_sharding_constraint(y_lbtd, act)
        valid_bt = jnp.ones(tokens_bt.shape, bool)
        loss_l = losses(params, x_lbtd, y_lbtd, valid_bt)
        return jnp.sum(weight_l * loss_l) / len(layers), {"layer_loss": loss_l}

    return loop.Task(
        loss_fn=loss_fn,
        labels=lambda params: jax.tree.map(lambda _: GROUP, params),
        groups={
            GROUP: optax.adamw(
                optim.cosine_schedule(cfg),
                weight_decay=cfg.weight_decay,
                mask=optim.matrices_only(leading_axes=1),  # params stacked over layers
            )
        },
        clip=optax.clip_by_global_norm(cfg.clip_norm),
        param_spec=loop.leading_axis("layers"),
        batch_spec=P("data"),
    )
