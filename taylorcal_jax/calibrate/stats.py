"""Teacher statistics for Taylor-Calibrate: attention distance and entropy, without T x T memory.

Letters: N sequences, T time, H query heads, G = H / Hkv query heads per key/value head,
d head dim, D hidden, L converted layers, Q query block, K key block (Q = K = block size).

For one head, logits s_ij = scale * q_i . k_j over the keys j that query i may see (j <= i,
key valid, and i - j < window for sliding-window layers; indices, as in the HF masks), and
P_ij = exp(s_ij) / Z_i with Z_i = sum_j exp(s_ij):

    distance  D_i = sum_j P_ij dist(i, j),    dist(i, j) = i - j (j < i), 0.5 (j = i)
    entropy   E_i = -sum_j P_ij log P_ij = log Z_i - sum_j P_ij s_ij

Both sums are accumulated over key blocks with the flash-attention rescaling. With running
max m, z = sum exp(s - m), u = sum exp(s - m) (s - m), b = sum exp(s - m) dist, a new block
with max m' (alpha = exp(m - m')) updates

    z <- alpha z + sum_blk p,   u <- alpha (u + (m - m') z) + sum_blk p (s - m'),
    b <- alpha b + sum_blk p dist,                      p = exp(s - m')

and at the end E_i = log z - u / z, D_i = b / z. Only a [Hkv, G, Q, K] tile of logits is
alive at a time, so memory is linear in T; key blocks entirely above the diagonal (or
entirely outside the window) are skipped. Per (layer, head) the statistics are averaged
over all valid query positions of all sequences.

`collect` runs the teacher once per sequence (`jax.vmap` over sequences, in groups) with
`return_intermediates=True` and also returns, per converted layer, the teacher-forced
mixer input x = rmsnorm(h) ("attn_in"), the teacher context C (pre-o_proj, per query head)
and the attention output (post-o_proj), which calibration and alignment consume.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from taylorcal_jax.utils import hosts, sharding

# ----------------------------------------------------------------------------- blockwise core


def _pad_time(x, total, value=0):
    pad = total - x.shape[0]
    if pad == 0:
        return x
    widths = [(0, pad)] + [(0, 0)] * (x.ndim - 1)
    return jnp.pad(x, widths, constant_values=value)


def attention_stats_sequence(
    q_thd,
    k_tkd,
    valid_t,
    *,
    scale: float,
    window: int | None = None,
    block_size: int = 128,
    v_tkd=None,
):
    """Per-head sums of D_i and E_i over the valid queries of one sequence.

    Args:
      q_thd: [T, H, d] post-RoPE queries.  k_tkd: [T, Hkv, d] post-RoPE keys.
      valid_t: [T] bool, False for padding (never attended to, never counted as a query).
      scale: softmax scale (d^-1/2 for the supported families).
      window: sliding window (query i sees keys with i - j < window) or None.
      block_size: query and key block length; memory is O(T * block_size).
      v_tkd: optional [T, Hkv, d] values; then the attention context sum_j P_ij v_j is
        accumulated in the same pass (flash attention), 0 for queries that see no key.
    Returns:
      (distance_sum_h [H], entropy_sum_h [H], count []) in float32, plus context [T, H, d]
      (float32) when v_tkd is given.
    """
    t, h, d = q_thd.shape
    hkv = k_tkd.shape[1]
    if h % hkv:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hkv})")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 or None, got {window}")
    g = h // hkv
    bs = int(min(block_size, t))
    nb = -(-t // bs)
    tp = nb * bs
    q = _pad_time(q_thd.astype(jnp.float32), tp).reshape(nb, bs, hkv, g, d)
    k = _pad_time(k_tkd.astype(jnp.float32), tp).reshape(nb, bs, hkv, d)
    valid = _pad_time(valid_t.astype(bool), tp, False).reshape(nb, bs)
    with_v = v_tkd is not None
    vv = _pad_time(v_tkd.astype(jnp.float32), tp).reshape(nb, bs, hkv, d) if with_v else None
    offs = jnp.arange(bs)

    def query_block(qi):
        q_blk = q[qi]  # [Q, Hkv, G, d]
        i_idx = qi * bs + offs  # [Q]
        init = (
            jnp.full((hkv, g, bs), -jnp.inf, jnp.float32),  # m
            jnp.zeros((hkv, g, bs), jnp.float32),  # z
            jnp.zeros((hkv, g, bs), jnp.float32),  # u
            jnp.zeros((hkv, g, bs), jnp.float32),  # b
            jnp.zeros((hkv, g, bs, d) if with_v else (), jnp.float32),  # o = sum p v
        )

        def key_block(kj, carry):
            m, z, u, b, o = carry
            k_blk = jax.lax.dynamic_index_in_dim(k, kj, keepdims=False)  # [K, Hkv, d]
            v_blk = jax.lax.dynamic_index_in_dim(valid, kj, keepdims=False)  # [K]
            j_idx = kj * bs + offs
            diff = (i_idx[:, None] - j_idx[None, :]).astype(jnp.float32)  # [Q, K]
            mask = (diff >= 0) & v_blk[None, :]
            if window is not None:
                mask &= diff < window
            dist = jnp.where(diff > 0, diff, 0.5)
            s = jnp.einsum("qhgd,khd->hgqk", q_blk, k_blk) * scale
            s = jnp.where(mask, s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            alpha = jnp.exp(m - m_safe)  # 0 where m = -inf
            shift = jnp.where(jnp.isfinite(m), m - m_safe, 0.0)
            sm = s - m_safe[..., None]
            p = jnp.where(mask, jnp.exp(sm), 0.0)
            z_new = alpha * z + jnp.sum(p, -1)
            u_new = alpha * (u + shift * z) + jnp.sum(jnp.where(mask, p * sm, 0.0), -1)
            b_new = alpha * b + jnp.sum(p * dist, -1)
            if with_v:
                val = jax.lax.dynamic_index_in_dim(vv, kj, keepdims=False)  # [K, Hkv, d]
                o = alpha[..., None] * o + jnp.einsum("hgqk,khd->hgqd", p, val)
            return m_new, z_new, u_new, b_new, o

        if window is None:
            lo = 0
        else:  # first key any query of this block can see: qi*bs - (window - 1)
            lo = jnp.maximum(0, (qi * bs - (window - 1)) // bs)
        _, z, u, b, o = jax.lax.fori_loop(lo, qi + 1, key_block, init)
        q_valid = jax.lax.dynamic_index_in_dim(valid, qi, keepdims=False)  # [Q]
        ok = q_valid  # a valid query always sees itself, so z > 0 there
        z_safe = jnp.where(z > 0, z, 1.0)
        ent = jnp.log(z_safe) - u / z_safe  # [Hkv, G, Q]
        dst = b / z_safe
        ent = jnp.sum(jnp.where(ok, ent, 0.0), -1).reshape(h)
        dst = jnp.sum(jnp.where(ok, dst, 0.0), -1).reshape(h)
        cnt = jnp.sum(ok.astype(jnp.float32))
        if not with_v:
            return dst, ent, cnt, o
        ctx = o / z_safe[..., None]  # [Hkv, G, Q, d]
        return dst, ent, cnt, jnp.moveaxis(ctx, 2, 0).reshape(bs, h, d)

    dst, ent, cnt, ctx = jax.lax.map(query_block, jnp.arange(nb))
    out = (jnp.sum(dst, 0), jnp.sum(ent, 0), jnp.sum(cnt))
    return out + (ctx.reshape(tp, h, d)[:t],) if with_v else out


def dense_attention_stats(q_thd, k_tkd, valid_t, *, scale, window=None):
    """Reference that materialises P [H, T, T]; for tests on small T only."""
    t, h, _ = q_thd.shape
    g = h // k_tkd.shape[1]
    k = jnp.repeat(k_tkd.astype(jnp.float32), g, axis=1)
    s = jnp.einsum("ihd,jhd->hij", q_thd.astype(jnp.float32), k) * scale
    i = jnp.arange(t)[:, None]
    j = jnp.arange(t)[None, :]
    mask = (j <= i) & valid_t[None, :]
    if window is not None:
        mask &= (i - j) < window
    s = jnp.where(mask, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    p = jnp.where(mask, p, 0.0)
    dist = jnp.where(i > j, (i - j).astype(jnp.float32), 0.5)
    d_ih = jnp.sum(p * dist, -1)
    e_ih = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), -1)
    w = valid_t.astype(jnp.float32)
    return d_ih @ w, e_ih @ w, jnp.sum(w)


# ----------------------------------------------------------------------------- teacher pass


@flax.struct.dataclass
class TeacherStats:
    """Statistics and teacher-forced activations of the layers in `layers` (leading axis L).

    distance_lh, entropy_lh: [L, H] mean attention distance / entropy.
    x_lntd: [L, N, T, D] mixer input rmsnorm(h).  context_lnthd: [L, N, T, H, d] pre-o_proj.
    attn_out_lntd: [L, N, T, D] post-o_proj.  valid_nt: [N, T].
    The activation fields are None when collected with keep_activations=False.
    """

    distance_lh: jax.Array
    entropy_lh: jax.Array
    x_lntd: jax.Array | None
    context_lnthd: jax.Array | None
    attn_out_lntd: jax.Array | None
    valid_nt: jax.Array
    layers: tuple[int, ...] = flax.struct.field(pytree_node=False, default=())

    def index(self, layer: int) -> int:
        """Position of model layer `layer` on the leading axis."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} has no statistics (collected: {self.layers})")
        return self.layers.index(layer)


TEACHER_PASSES = ("blockwise", "model")


def _per_sequence_fn(model, config, layers, block_size, keep_activations, teacher_pass, layout):
    """fn(params, tokens_t, valid_t) -> per-layer sums (and activations) of one sequence.

    teacher_pass "blockwise": the teacher's blocks are run here with the attention context
    from the blockwise pass (memory O(T); layers after the last requested one are skipped);
    "model": the `Transformer` with return_intermediates (dense T x T attention inside).
    layout: None (params whole), or a `sharding.ParamLayout` (inside shard_map, params in
    shards): each module's params are gathered just before it runs, never the whole tree.
    """
    from taylorcal_jax.models.layers import MLP, RMSNorm, attention_qkv
    from taylorcal_jax.models.paths import ATTENTION_KEY, layer_key

    scale = config.head_dim**-0.5
    last = max(layers)
    model = model.clone(param_layout=layout)

    def whole(params, *path, after):
        """The params at `path`, gathered whole (after `after`) when they come in shards."""
        sub = functools.reduce(lambda tree, key: tree[key], path, params)
        return sub if layout is None else layout.gather(path, sub, after=after)

    def layer_stats(out, layer, q, k, valid_t, v=None):
        res = attention_stats_sequence(
            q,
            k,
            valid_t,
            scale=scale,
            window=config.sliding_windows[layer],
            block_size=block_size,
            v_tkd=v,
        )
        out["dist"].append(res[0])
        out["ent"].append(res[1])
        out["cnt"].append(res[2])
        return res[3] if v is not None else None

    def per_sequence(params, tokens_t, valid_t):
        tokens_bt, valid_bt = tokens_t[None], valid_t[None]
        positions_bt = jnp.maximum(jnp.cumsum(valid_bt.astype(jnp.int32), axis=-1) - 1, 0)
        out = {"dist": [], "ent": [], "cnt": [], "x": [], "ctx": [], "y": []}
        if teacher_pass == "model":
            _, _, inter = model.apply(
                {"params": params},
                tokens_bt,
                positions_bt=positions_bt,
                valid_bt=valid_bt,
                return_intermediates=True,
            )
            for layer in layers:
                li = inter[layer_key(layer)]
                x_btd = li["attn_in"]
                attn = whole(params, layer_key(layer), ATTENTION_KEY, after=x_btd)
                q, k, _ = attention_qkv(attn, config, x_btd, positions_bt)
                layer_stats(out, layer, q[0], k[0], valid_t)
                if keep_activations:
                    out["x"].append(x_btd[0])
                    out["ctx"].append(li["attn_context"][0])
                    out["y"].append(li["attn_out"][0])
        else:
            norm = RMSNorm(config.rms_norm_eps)
            table = whole(params, "embed_tokens", after=tokens_bt)["embedding"]
            h = jnp.take(table, tokens_bt, axis=0)
            h = h.astype(jnp.float32)
            for layer in range(last + 1):
                lp = whole(params, layer_key(layer), after=h)
                x_btd = norm.apply({"params": lp["input_layernorm"]}, h)
                q, k, v = attention_qkv(lp[ATTENTION_KEY], config, x_btd, positions_bt)
                if layer in layers:
                    ctx = layer_stats(out, layer, q[0], k[0], valid_t, v[0])
                else:  # context only (the statistics are discarded)
                    ctx = attention_stats_sequence(
                        q[0],
                        k[0],
                        valid_t,
                        scale=scale,
                        block_size=block_size,
                        window=config.sliding_windows[layer],
                        v_tkd=v[0],
                    )[3]
                t = ctx.shape[0]
                kernel = lp[ATTENTION_KEY]["o_proj"]["kernel"]
                y = (ctx.reshape(t, -1) @ kernel.astype(jnp.float32))[None]
                if keep_activations and layer in layers:
                    out["x"].append(x_btd[0])
                    out["ctx"].append(ctx)
                    out["y"].append(y[0])
                h = h + y
                m = norm.apply({"params": lp["post_attention_layernorm"]}, h)
                h = h + MLP(config).apply({"params": lp["mlp"]}, m)
        order = sorted(range(len(layers)), key=lambda r: layers[r])  # blockwise runs ascending
        rank = {layers[r]: n for n, r in enumerate(order)}
        if teacher_pass != "model":  # re-order to the requested layer order
            for key in out:
                if out[key]:
                    out[key] = [out[key][rank[lay]] for lay in layers]
        return {key: jnp.stack(val) for key, val in out.items() if val}

    return per_sequence


def collect(
    model,
    params,
    config,
    tokens_nt,
    *,
    valid_nt=None,
    layers: Sequence[int] | None = None,
    block_size: int = 128,
    sequences_per_batch: int = 8,
    keep_activations: bool = True,
    teacher_pass: str = "blockwise",
    mesh=None,
) -> TeacherStats:
    """Runs the teacher on N sequences and returns `TeacherStats` for `layers` (default all).

    Args:
      model: a `Transformer` (all attention) for `config`; params its parameters.
      tokens_nt: [N, T] int tokens; valid_nt: [N, T] bool (default all True).
      block_size: query/key block of the blockwise statistics.
      sequences_per_batch: sequences run together (vmap) per step; bounds peak memory.
      keep_activations: also return x, C and attention outputs (needed by calibration).
      teacher_pass: "blockwise" (O(T) memory, attention context from the blockwise pass) or
        "model" (the Transformer's own dense attention; for cross-checking).
      mesh: split the sequences over every device of this mesh (data parallel, `shard_map`:
        each device runs its own sequences; N must be a multiple of the mesh size). Params
        are placed by `sharding.param_spec` (split over a "fsdp" axis, if any) and each
        device's program gathers them one layer at a time, for every group of
        `sequences_per_batch` sequences. With several processes, every process gets all
        rows of the results (`hosts.gather_rows`).
    """
    tokens_nt = jnp.asarray(tokens_nt)
    if tokens_nt.ndim != 2:
        raise ValueError(f"tokens must be [N, T], got shape {tokens_nt.shape}")
    if valid_nt is None:
        valid_nt = jnp.ones(tokens_nt.shape, bool)
    valid_nt = jnp.asarray(valid_nt, bool)
    if valid_nt.shape != tokens_nt.shape:
        raise ValueError(f"valid_nt shape {valid_nt.shape} != tokens shape {tokens_nt.shape}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    concrete = not isinstance(tokens_nt, jax.core.Tracer) and tokens_nt.is_fully_addressable
    if tokens_nt.size and concrete:
        # ids outside the vocabulary embed as NaN: every statistic would be NaN (checked on the
        # host: under a trace min() is staged)
        ids = np.asarray(tokens_nt)
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= config.vocab_size:
            raise ValueError(f"token ids must be in [0, {config.vocab_size}), got [{low}, {high}]")
    layers = tuple(range(config.num_hidden_layers)) if layers is None else tuple(layers)
    if teacher_pass not in TEACHER_PASSES:
        raise ValueError(f"teacher_pass must be one of {TEACHER_PASSES}, got {teacher_pass!r}")
    if not layers or len(set(layers)) != len(layers):
        raise ValueError(f"layers must be non-empty and distinct, got {layers}")
    for layer in layers:
        if not 0 <= layer < config.num_hidden_layers:
            raise ValueError(f"layer {layer} out of range for {config.num_hidden_layers} layers")
    devices = 1 if mesh is None else mesh.size
    if tokens_nt.shape[0] % devices:
        raise ValueError(
            f"{tokens_nt.shape[0]} sequences do not split over the {devices} devices of the mesh"
        )
    fn = _collect_jit(
        model,
        config,
        layers,
        int(block_size),
        bool(keep_activations),
        int(max(1, min(sequences_per_batch, tokens_nt.shape[0] // devices))),
        teacher_pass,
        mesh,
    )
    if mesh is not None:
        params = sharding.place_params(params, mesh)
        rows = sharding.batch_sharding(mesh)
        tokens_nt, valid_nt = hosts.put_slices((np.asarray(tokens_nt), np.asarray(valid_nt)), rows)
    out = hosts.gather_rows(fn(params, tokens_nt, valid_nt))
    cnt = jnp.sum(out["cnt"], axis=0)  # [L]
    if bool(jnp.any(cnt == 0)):
        raise ValueError("no valid query positions: every token is padding")
    act = (lambda key: jnp.moveaxis(out[key], 0, 1)) if keep_activations else (lambda key: None)
    return TeacherStats(
        distance_lh=jnp.sum(out["dist"], 0) / cnt[:, None],
        entropy_lh=jnp.sum(out["ent"], 0) / cnt[:, None],
        x_lntd=act("x"),
        context_lnthd=act("ctx"),
        attn_out_lntd=act("y"),
        valid_nt=valid_nt,
        layers=layers,
    )


@functools.lru_cache(maxsize=16)
def _collect_jit(model, config, layers, block_size, keep_activations, group, teacher_pass, mesh):
    def run(params, tokens_nt, valid_nt, layout=None):
        per_sequence = _per_sequence_fn(
            model, config, layers, block_size, keep_activations, teacher_pass, layout
        )
        fn = functools.partial(per_sequence, params)
        return jax.lax.map(lambda a: fn(*a), (tokens_nt, valid_nt), batch_size=group)

    if mesh is None:
        return jax.jit(run)
    rows = sharding.batch_spec(mesh)

    def sharded(params, tokens_nt, valid_nt):
        # Every output has the sequence axis first, so each device's results are its own rows.
        specs = sharding.param_specs(params, mesh)
        layout = sharding.ParamLayout.of(specs)
        per_device = functools.partial(run, layout=layout)
        return jax.shard_map(
            per_device, mesh=mesh, in_specs=(specs, rows, rows), out_specs=rows, check_vma=False
        )(params, tokens_nt, valid_nt)

    seq = sharding.batch_sharding(mesh)
    return jax.jit(sharded, out_shardings=seq)


__all__ = ["TeacherStats", "attention_stats_sequence", "collect", "dense_attention_stats"]
