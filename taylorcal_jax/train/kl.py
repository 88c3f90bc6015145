"""KL(teacher || student) of next-token distributions, computed in chunks of the sequence.

Letters: B batch, T time, C chunk length, D hidden, V vocab.

With h^t, h^s the final hidden states [B, T, D] (after the last RMSNorm: the LM head's input)
and W^t, W^s the LM heads [D, V] (the embedding transposed when tied), at every valid
position (b, t):

    log p = log_softmax(h^t_bt W^t),   log q = log_softmax(h^s_bt W^s)
    KL_bt = sum_v p_v (log p_v - log q_v)
    loss  = sum_{b,t} m_bt KL_bt / sum_{b,t} m_bt                    (m: valid positions)

The T axis is cut into chunks of C positions (the last one padded with invalid positions),
so at most [B, C, V] logits per model are alive at a time, never [B, T, V]. The result equals
the unchunked sum up to float32 summation order.

The gradient is formed in the forward pass (`jax.custom_vjp`): with z^s = h^s W^s the student's
logits and q = softmax(z^s), p = softmax(z^t),

    d loss_sum / d z^s_btv = m_bt (q_btv - p_btv)          (because sum_v p_v = 1)

so each chunk computes both heads' logits, the KL and G = m (q - p) in one pass (the
elementwise part by ops/kl_logits: on a GPU one Pallas kernel that reads each logit array
twice, XLA's ops elsewhere), then dh^s = G (W^s)^T and dW^s += (h^s)^T G; the backward pass
only scales the kept dh^s [B, T, D] and dW^s [D, V] by the incoming cotangent. Against
differentiating through the chunks (which must recompute both heads' logits and softmaxes in
the backward pass), that is 4 head-sized products per chunk instead of 6 and one elementwise
pass over the logits instead of two. The teacher's inputs get zero gradients (the caller stops
them). Logits are float32: the head products run in h's dtype (bf16 in mixed precision) with
float32 accumulation, and G is rounded to that dtype before its two products, as for every
other product of the model (left float32, XLA would run them in float32: TF32 on a GPU, 4 ms of
a 288 ms SmolLM2 stage-2 step on an H200, launch/results/profile_steps_h200.md). dW^s is summed
over chunks in float32 and kept from the forward to the backward pass: D V float32 values (113
MB for SmolLM2's 576 x 49,152 head; 2.2 GB for a 3584 x 152,064 one), besides dh^s [B, T, D].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from taylorcal_jax.ops.kl_logits import api as kl_logits


def _logits(h_bcd, w_dv):
    """float32 logits h W, operands in h's dtype (W cast to it), float32 accumulation."""
    return jnp.einsum("bcd,dv->bcv", h_bcd, w_dv.astype(h_bcd.dtype),
                      preferred_element_type=jnp.float32)  # fmt: skip


def _chunk_logits(h_t_bcd, w_t_dv, h_s_bcd, w_s_dv, valid_bc):
    """Both heads' float32 logits of one chunk as rows [B C, V], and the rows' validity [B C]."""
    rows = valid_bc.size
    z_t, z_s = (_logits(h, w).reshape(rows, -1) for h, w in ((h_t_bcd, w_t_dv), (h_s_bcd, w_s_dv)))
    return z_t, z_s, valid_bc.reshape(rows)


def _chunked(a_bt, c):
    """[B, T, ...] -> [n, B, C, ...] with T padded up to n C."""
    b, t = a_bt.shape[:2]
    n = -(-t // c)
    a_bt = jnp.pad(a_bt, [(0, 0), (0, n * c - t)] + [(0, 0)] * (a_bt.ndim - 2))
    return jnp.moveaxis(a_bt.reshape(b, n, c, *a_bt.shape[2:]), 1, 0)


def _unchunked(a_nbc, t):
    """Inverse of `_chunked`: [n, B, C, ...] -> [B, T, ...]."""
    n, b, c = a_nbc.shape[:3]
    return jnp.moveaxis(a_nbc, 0, 1).reshape(b, n * c, *a_nbc.shape[3:])[:, :t]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _kl_total(c, impl, h_t_btd, w_t_dv, h_s_btd, w_s_dv, valid_bt):
    del impl  # the forward without a gradient is XLA's

    def body(xs):  # the gradient XLA's form also makes is unused here, and compiled away
        z_t, z_s, valid = _chunk_logits(xs[0], w_t_dv, xs[1], w_s_dv, xs[2])
        return kl_logits.kl_and_grad_xla(z_t, z_s, valid, jnp.float32)[0]

    sums = jax.lax.map(body, tuple(_chunked(a, c) for a in (h_t_btd, h_s_btd, valid_bt)))
    return jnp.sum(sums)


def _kl_total_fwd(c, impl, h_t_btd, w_t_dv, h_s_btd, w_s_dv, valid_bt):
    w_s = w_s_dv.astype(h_s_btd.dtype)

    def body(dw_dv, xs):
        h_t, h_s, valid = xs
        z_t, z_s, valid_n = _chunk_logits(h_t, w_t_dv, h_s, w_s_dv, valid)
        total, g = kl_logits.kl_and_grad(z_t, z_s, valid_n, h_s.dtype, impl=impl)
        g_bcv = g.reshape(*valid.shape, -1)
        dh_bcd = jnp.einsum("bcv,dv->bcd", g_bcv, w_s, preferred_element_type=jnp.float32)
        dw_dv = dw_dv + jnp.einsum("bcd,bcv->dv", h_s, g_bcv, preferred_element_type=jnp.float32)
        return dw_dv, (total, dh_bcd)

    xs = tuple(_chunked(a, c) for a in (h_t_btd, h_s_btd, valid_bt))
    dw_dv, (sums, dh_nbcd) = jax.lax.scan(body, jnp.zeros(w_s_dv.shape, jnp.float32), xs)
    dh_btd = _unchunked(dh_nbcd, h_s_btd.shape[1])
    # empty arrays carry the dtypes of the gradients to the backward pass
    dtypes = (jnp.zeros((0,), h_s_btd.dtype), jnp.zeros((0,), w_s_dv.dtype))
    return jnp.sum(sums), (dh_btd, dw_dv, dtypes)


def _kl_total_bwd(c, impl, residuals, g):
    """None: zero cotangents for the teacher's inputs and the mask."""
    del c, impl
    dh_btd, dw_dv, (h_dtype, w_dtype) = residuals
    return None, None, (g * dh_btd).astype(h_dtype.dtype), (g * dw_dv).astype(w_dtype.dtype), None


_kl_total.defvjp(_kl_total_fwd, _kl_total_bwd)


def kl_sum(h_t_btd, w_t_dv, h_s_btd, w_s_dv, valid_bt, *, chunk: int, impl: str = "auto"):
    """(sum over valid positions of KL(teacher || student), number of valid positions).

    h_t_btd, h_s_btd: final hidden states [B, T, D]; w_t_dv, w_s_dv: LM heads [D, V];
    valid_bt: bool [B, T]; chunk: positions per chunk (module docstring); impl: of the KL and
    gradient from the logits under differentiation (ops/kl_logits/api.py).
    """
    if chunk <= 0:
        raise ValueError(f"KL chunk length must be positive, got {chunk}")
    c = min(chunk, h_s_btd.shape[1])
    total = _kl_total(c, impl, h_t_btd, w_t_dv, h_s_btd, w_s_dv, valid_bt)
    return total, jnp.sum(valid_bt.astype(jnp.float32))


def head_matrix(params, config, *, layout=None, after=None):
    """The LM head [D, V] of a Transformer's params: the embedding transposed when tied.

    layout: None, or the `sharding.ParamLayout` of `params` when they are one device's shards
    inside shard_map; the head's are then gathered whole, after the arrays `after`."""
    name = "embed_tokens" if config.tie_word_embeddings else "lm_head"
    head = params[name] if layout is None else layout.gather((name,), params[name], after=after)
    return head["embedding"].T if config.tie_word_embeddings else head["kernel"]
