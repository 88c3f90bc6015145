"""Perplexity of a causal LM on packed sequences, and a unigram baseline.

Letters: N sequences, B batch, T time, V vocab.

For each sequence x_1..x_T, the model predicts x_{t+1} from x_{<=t}. A prediction counts
when both x_t and x_{t+1} are valid (valid_nt, default all True):

    nll = - sum_{n,t} m_{n,t} log softmax(logits_{n,t})[x_{n,t+1}] / sum m,   ppl = exp(nll)

Sequences are processed in batches of B; the last partial batch is padded with invalid
rows (mask 0), so every batch has one shape and one compiled program. Sums are accumulated
in float64 on the host. With a `mesh`, evaluation is data parallel: B is rounded up to a
multiple of the mesh's devices, each device scores its rows (`shard_map`, which keeps custom
kernels out of the SPMD partitioner) and the per-device sums are added with `psum`; the
result equals the single-device one up to float32 summation order. Params are placed by
`sharding.param_spec` (split over a "fsdp" axis, if any) and each device's program gathers
them one layer at a time (`Transformer.param_layout`).

Unigram baseline: p(v) = (c_v + 1) / (C + V) from train-split token counts (add-one
smoothing), scored on the same predicted tokens (x_2..x_T of each sequence).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from taylorcal_jax.utils import hosts, sharding
from taylorcal_jax.utils.progress import progress


def token_nll_sum(logits_btv, tokens_bt, valid_bt):
    """(sum of next-token NLL over counted predictions, number counted), float32 scalars."""
    logp = jax.nn.log_softmax(logits_btv[:, :-1].astype(jnp.float32), axis=-1)
    target = tokens_bt[:, 1:]
    nll_bt = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
    mask = (valid_bt[:, :-1] & valid_bt[:, 1:]).astype(jnp.float32)
    return jnp.sum(nll_bt * mask), jnp.sum(mask)


@functools.lru_cache(maxsize=16)
def _batch_fn(model, mesh):
    def fn(model, params, tokens_bt, valid_bt):
        logits, _, _ = model.apply({"params": params}, tokens_bt, valid_bt=valid_bt)
        return token_nll_sum(logits, tokens_bt, valid_bt)

    if mesh is None:
        return jax.jit(functools.partial(fn, model))
    axes = tuple(mesh.axis_names)
    rows = sharding.batch_spec(mesh)

    def sharded(params, tokens_bt, valid_bt):
        specs = sharding.param_specs(params, mesh)
        sharded_model = model.clone(param_layout=sharding.ParamLayout.of(specs))

        def per_device(params, tokens_bt, valid_bt):
            total, count = fn(sharded_model, params, tokens_bt, valid_bt)
            return jax.lax.psum(total, axes), jax.lax.psum(count, axes)

        return jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(specs, rows, rows),
            out_specs=(sharding.P(), sharding.P()),
            check_vma=False,
        )(params, tokens_bt, valid_bt)

    return jax.jit(sharded)


def perplexity(
    model, params, sequences_nt, *, batch_size: int, valid_nt=None, desc="ppl", mesh=None
):
    """{"ppl", "nll", "tokens"} of `model` (a Transformer module) on [N, T] token ids;
    data parallel over every device of `mesh` if given."""
    seq = np.asarray(sequences_nt)
    if seq.ndim != 2:
        raise ValueError(f"sequences_nt must be [N, T], got shape {seq.shape}")
    n, t = seq.shape
    if n == 0 or t < 2:
        raise ValueError(f"need at least one sequence of length >= 2, got shape {seq.shape}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    valid = np.ones((n, t), bool) if valid_nt is None else np.asarray(valid_nt, bool)
    if valid.shape != seq.shape:
        raise ValueError(f"valid_nt shape {valid.shape} != sequences shape {seq.shape}")
    vocab = model.config.vocab_size
    if seq.min() < 0 or seq.max() >= vocab:
        raise ValueError(f"token ids must be in [0, {vocab}), got [{seq.min()}, {seq.max()}]")
    b = sharding.pad_to_multiple(min(batch_size, n), mesh)
    fn = _batch_fn(model, mesh)
    if mesh is not None:  # placed once, not per batch
        params = sharding.place_params(params, mesh)
    total_nll, total_count = 0.0, 0.0
    for start in progress(range(0, n, b), desc=desc, total=-(-n // b), unit="batch"):
        tok = seq[start : start + b].astype(np.int32)
        val = valid[start : start + b]
        if tok.shape[0] < b:  # pad the last batch with masked rows
            pad = b - tok.shape[0]
            tok = np.concatenate([tok, np.zeros((pad, t), np.int32)])
            val = np.concatenate([val, np.zeros((pad, t), bool)])
        if mesh is not None:
            tok, val = hosts.put_slices((tok, val), sharding.batch_sharding(mesh))
        s, c = fn(params, tok, val)
        total_nll += float(s)
        total_count += float(c)
    if total_count == 0:
        raise ValueError("no predicted tokens to score (every position is masked)")
    nll = total_nll / total_count
    return {"ppl": math.exp(nll), "nll": nll, "tokens": int(total_count)}


def unigram_counts(train_stream: np.ndarray, vocab_size: int) -> np.ndarray:
    stream = np.asarray(train_stream)
    if stream.size and (stream.min() < 0 or stream.max() >= vocab_size):
        raise ValueError(f"train tokens outside [0, {vocab_size})")
    return np.bincount(stream, minlength=vocab_size).astype(np.float64)


def unigram_perplexity(counts_v: np.ndarray, sequences_nt, valid_nt=None) -> dict:
    """Add-one-smoothed unigram {"ppl","nll","tokens"} on the same predictions as `perplexity`."""
    counts = np.asarray(counts_v, np.float64)
    logp_v = np.log(counts + 1.0) - np.log(counts.sum() + counts.size)
    seq = np.asarray(sequences_nt)
    valid = np.ones(seq.shape, bool) if valid_nt is None else np.asarray(valid_nt, bool)
    mask = valid[:, :-1] & valid[:, 1:]
    if not mask.any():
        raise ValueError("no predicted tokens to score (every position is masked)")
    nll = float(-logp_v[seq[:, 1:]][mask].mean())
    return {"ppl": math.exp(nll), "nll": nll, "tokens": int(mask.sum())}
