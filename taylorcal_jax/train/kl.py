"""KL(teacher || student) of next-token distributions, computed in chunks of the sequence.

Letters: B batch, T time, C chunk length, D hidden, V vocab.

With h^t, h^s the final hidden states [B, T, D] (after the last RMSNorm: the LM head's input)
and W^t, W^s the LM heads [D, V] (the embedding transposed when tied), at every valid
position (b, t):

    log p = log_softmax(h^t_bt W^t),   log q = log_softmax(h^s_bt W^s)
    KL_bt = sum_v p_v (log p_v - log q_v)
    loss  = sum_{b,t} m_bt KL_bt / sum_{b,t} m_bt                    (m: valid positions)

The T axis is cut into chunks of C positions (the last one padded with invalid positions)
and `lax.map` forms each chunk's logits for teacher and student, then its KL sum. The chunk
body is under `jax.checkpoint`, so the backward pass recomputes a chunk's logits rather than
keeping every chunk's: at most [B, C, V] logits per model are alive at a time, never
[B, T, V]. The result equals the unchunked sum up to float32 summation order. Logits are
float32: the head matmul runs in the inputs' dtype (bf16 in mixed precision) with float32
accumulation, and so do its two backward products (`head_logits`): the float32 cotangent of
the logits is rounded to the inputs' dtype first, as for every other product of the model,
where left float32 it would make XLA run both products in float32 (TF32 on a GPU: 4 ms of a
288 ms SmolLM2 stage-2 step on an H200, launch/results/profile_steps_h200.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def head_logits(h_bcd, w_dv):
    """float32 logits h W from operands in h's dtype (W cast to it), float32 accumulation.

    Backward: with G the float32 cotangent of the logits rounded to h's dtype,
    dh = G W^T and dW = h^T G, each in that dtype with float32 accumulation, returned in the
    dtypes of h and W. For float32 operands this is exactly the einsum's own derivative."""
    return _head_logits(h_bcd, w_dv)


def _head_logits(h_bcd, w_dv):
    return jnp.einsum("bcd,dv->bcv", h_bcd, w_dv.astype(h_bcd.dtype),
                      preferred_element_type=jnp.float32)  # fmt: skip


def _head_logits_fwd(h_bcd, w_dv):
    return _head_logits(h_bcd, w_dv), (h_bcd, w_dv)


def _head_logits_bwd(residuals, g_bcv):
    h_bcd, w_dv = residuals
    g = g_bcv.astype(h_bcd.dtype)
    w = w_dv.astype(h_bcd.dtype)
    dh = jnp.einsum("bcv,dv->bcd", g, w, preferred_element_type=jnp.float32)
    dw = jnp.einsum("bcd,bcv->dv", h_bcd, g, preferred_element_type=jnp.float32)
    return dh.astype(h_bcd.dtype), dw.astype(w_dv.dtype)


head_logits.defvjp(_head_logits_fwd, _head_logits_bwd)


def _chunk_kl_sum(h_t_bcd, w_t_dv, h_s_bcd, w_s_dv, valid_bc):
    """Sum over the valid positions of one chunk of KL(p || q), float32."""
    logp = jax.nn.log_softmax(_head_logits(h_t_bcd, w_t_dv), axis=-1)  # no gradient needed
    logq = jax.nn.log_softmax(head_logits(h_s_bcd, w_s_dv), axis=-1)
    kl_bc = jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)
    return jnp.sum(jnp.where(valid_bc, kl_bc, 0.0))


def kl_sum(h_t_btd, w_t_dv, h_s_btd, w_s_dv, valid_bt, *, chunk: int):
    """(sum over valid positions of KL(teacher || student), number of valid positions).

    h_t_btd, h_s_btd: final hidden states [B, T, D]; w_t_dv, w_s_dv: LM heads [D, V];
    valid_bt: bool [B, T]; chunk: positions per chunk (module docstring).
    """
    if chunk <= 0:
        raise ValueError(f"KL chunk length must be positive, got {chunk}")
    b, t, d = h_s_btd.shape
    c = min(chunk, t)
    n = -(-t // c)
    pad = n * c - t

    def chunks(a):
        a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        return jnp.moveaxis(a.reshape(b, n, c, *a.shape[2:]), 1, 0)  # [n, B, C, ...]

    body = jax.checkpoint(lambda xs: _chunk_kl_sum(xs[0], w_t_dv, xs[1], w_s_dv, xs[2]))
    sums = jax.lax.map(body, (chunks(h_t_btd), chunks(h_s_btd), chunks(valid_bt)))
    return jnp.sum(sums), jnp.sum(valid_bt.astype(jnp.float32))


def head_matrix(params, config, *, layout=None, after=None):
    """The LM head [D, V] of a Transformer's params: the embedding transposed when tied.

    layout: None, or the `sharding.ParamLayout` of `params` when they are one device's shards
    inside shard_map; the head's are then gathered whole, after the arrays `after`."""
    name = "embed_tokens" if config.tie_word_embeddings else "lm_head"
    head = params[name] if layout is None else layout.gather((name,), params[name], after=after)
    return head["embedding"].T if config.tie_word_embeddings else head["kernel"]
