"""A decoding step's token appended to the KV cache and attended, in one partials kernel.

Letters: B batch, S cache slots, H query heads, Hkv key/value heads, G = H / Hkv, Gp the rows of
a query tile (pallas_gpu.tile_rows), d head dim, P = d / 2, BS slots per block.

The step of reference.append_and_attend_xla: from the token's joined product qkv [B, (H + 2 Hkv)
d], read as it lies ([B, H + 2 Hkv, d], a free reshape: row h < H is query head h, row H + j the
key and row H + Hkv + j the value of KV head j), rotate q and k, write k and v at slot `start`
of the caches, attend. Apart, the rotations and the two cache updates are three XLA kernels per
attention layer (2.48, 2.19 and 1.54 us in the teacher's 32k batch-1 steps on an H100,
launch/results/profile_steps_h100_decode_launches.md); here the partials kernel of
pallas_gpu.py does them, over the same grid (B, Hkv, NS) and online softmax:

- RoPE (rotate half, ops/rope.py) in float32: rope(x) = x cos + rotate_half(x) sin, where
  rotate_half(x) = [-x[P:], x[:P]] = x R with R the signed permutation [[0, I], [-I, 0]]
  ([d, d], built in the kernel). Program (b, j, n) rotates its Gp query rows (masked as in
  pallas_gpu) and the key of KV head j by exact float32 dots with R (one nonzero term per sum),
  rounded to qkv's dtype as the XLA form rounds them. q, the keys and the values keep their
  whole rows of d, so the cache is read in the same [BS, d] loads as pallas_gpu's kernel.
  (Rotating by halves of d instead, q . K as two half-d dots over half-row loads, took the
  kernel from 16.3 to 23.9 us per layer in the teacher's 32k batch-1 steps on an H100, and
  from 181 to 223 us at batch 16: launch/results/profile_steps_h100_append_halves.md.)
- The block holding slot `start` gets the new key and value in place of that slot's row, so
  the attention sees them whatever the cache held there.
- The caches are outputs aliased to the inputs (input_output_aliases): the program of KV head
  j and the split holding slot `start` writes K[b, start, j] and V[b, start, j] once, after
  its loop, and nothing else of the cache is written or copied. No other program reads that
  row (splits hold disjoint slots, KV heads disjoint columns), and its owner uses the new
  values from registers, so the write races with no read.

`start` is clamped to [0, S - 1] as dynamic_update_slice clamps it. The combine is pallas_gpu's.
The caches must be in qkv's dtype (the models' compute dtype); bf16 gives bf16 dot operands,
other dtypes fp32 dots at HIGHEST precision, as in pallas_gpu.py. Differentiable: the backward
is that of the XLA form.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from taylorcal_jax.ops.decode_attention import pallas_gpu
from taylorcal_jax.ops.decode_attention.pallas_gpu import F32, DecodeConfig, load_rows
from taylorcal_jax.ops.decode_attention.reference import append_and_attend_xla
from taylorcal_jax.ops.pallas_dot import mm

_MIN_DOT = 16  # a Triton dot's least dimension: d of the rotation's dots


def unsupported_reason(k_bshd, v_bshd, dtype) -> str | None:
    """Why the kernel cannot take caches k, v [B, S, Hkv, d] and a joined product in `dtype`
    (api.py's "auto" and the models ask), or None."""
    d = k_bshd.shape[-1]
    if d < _MIN_DOT or d & (d - 1):
        return f"head dim {d} must be a power of two >= {_MIN_DOT} for the appending kernel"
    if jnp.dtype(dtype) == jnp.float64:
        return "float64 inputs (the kernel computes in float32)"
    if k_bshd.dtype != dtype or v_bshd.dtype != dtype:
        return (
            f"caches {k_bshd.dtype}/{v_bshd.dtype} for a {jnp.dtype(dtype)} product (the kernel "
            "writes the new key and value as the product's dtype)"
        )
    return None


def _rotate_half_matrix(d):
    """R [d, d] float32 with x R = rotate_half(x) = [-x[P:], x[:P]]: R[i, j] = -1 where
    i = j + P, 1 where j = i + P, else 0."""
    i = lax.broadcasted_iota(jnp.int32, (d, d), 0)
    j = lax.broadcasted_iota(jnp.int32, (d, d), 1)
    return jnp.where(i == j + d // 2, -1.0, jnp.where(j == i + d // 2, 1.0, 0.0)).astype(F32)


def _kernel(qkv_ref, cos_ref, sin_ref, start_ref, k_ref, v_ref, mask_ref, m_ref, l_ref, a_ref,
            k_out_ref, v_out_ref, *, s_len, per_split, heads, cfg, dt):  # fmt: skip
    h, hkv = heads
    g = h // hkv
    b, j = pl.program_id(0), pl.program_id(1)
    gp, d = a_ref.shape
    whole = pl.ds(0, d)
    cos, sin = (ref[b, whole].astype(F32) for ref in (cos_ref, sin_ref))  # [d]
    r = _rotate_half_matrix(d)

    def rope(x):  # float32 rows [n >= 16, d], rounded back to the product's dtype
        return (x * cos + mm(x, r, 1, 0, F32) * sin).astype(qkv_ref.dtype)

    # query rows jG .. jG + Gp - 1 of row b; rows G..Gp-1 pad the dots, masked (g < G keeps
    # jG + g < H) and never stored
    real = lax.broadcasted_iota(jnp.int32, (gp,), 0) < g
    q = rope(load_rows(qkv_ref, pl.ds(j * g, gp), real, whole, batch=b).astype(F32))
    # the key row, as 16 equal rows for the dot; their max is that row exactly
    k_row = qkv_ref[b, h + j, whole].astype(F32)
    k_new = jnp.max(rope(jnp.broadcast_to(k_row[None, :], (_MIN_DOT, d))), axis=0)
    v_new = qkv_ref[b, h + hkv + j, whole]
    at = jnp.clip(start_ref[0], 0, s_len - 1)

    def load_kv(rows, slots, ok):
        new = (slots == at)[:, None]  # the token's slot, in the block that holds it
        k = jnp.where(new, k_new[None, :], load_rows(k_ref, rows, ok))
        return k, jnp.where(new, v_new[None, :], load_rows(v_ref, rows, ok))

    m, l, a = pallas_gpu.online_softmax(
        load_kv, lambda k: mm(q, k, 1, 1, dt), mask_ref, s_len=s_len, per_split=per_split,
        block_s=cfg.block_s, gp=gp, d=d, dt=dt,
    )  # fmt: skip
    pallas_gpu.store_partials(m_ref, l_ref, a_ref, m, l, a, real)

    @pl.when(pl.program_id(2) == at // (per_split * cfg.block_s))
    def _():  # the split holding slot `start` writes it, once
        k_out_ref[at, whole] = k_new
        v_out_ref[at, whole] = v_new


def _forward(qkv_bw, cos_bd, sin_bd, k_bshd, v_bshd, start, mask_bs, static):
    dtype, heads, interpret, config = static
    h, hkv = heads
    b, s, _, d = k_bshd.shape
    ns, per_split = pallas_gpu.split_plan(config, b, hkv, s)
    dt = jnp.bfloat16 if qkv_bw.dtype == jnp.bfloat16 else F32  # the caches' dtype too
    kernel = functools.partial(
        _kernel, s_len=s, per_split=per_split, heads=heads, cfg=config, dt=dt
    )
    out_specs, out_shape = pallas_gpu.partials_out(b, hkv, ns, pallas_gpu.tile_rows(h // hkv), d)
    whole, cache = pl.BlockSpec(memory_space=pl.ANY), pallas_gpu.cache_spec(s, d)
    *parts, k_all, v_all = pl.pallas_call(
        kernel,
        grid=(b, hkv, ns),
        in_specs=[whole] * 4 + [cache, cache, pallas_gpu.mask_spec(s)],
        out_specs=[*out_specs, cache, cache],
        out_shape=[*out_shape, *(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (k_bshd, v_bshd))],
        input_output_aliases={4: 3, 5: 4},  # the caches, written at slot `start` only
        interpret=interpret,
        name="decode_append_attention",
        **pallas_gpu.launch(interpret, config.warps, config.stages),
    )(
        qkv_bw.reshape(b, h + 2 * hkv, d),  # free: row h + j is KV head j's key
        cos_bd,
        sin_bd,
        jnp.reshape(start, (1,)).astype(jnp.int32),
        k_bshd,
        v_bshd,
        mask_bs.astype(jnp.int8),
    )
    ctx = pallas_gpu.combine(*parts, h // hkv, dtype, interpret)
    return ctx.reshape(b, 1, h, d), k_all, v_all


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _append_and_attend(qkv_bw, cos_bd, sin_bd, k_bshd, v_bshd, start, mask_bs, static):
    return _forward(qkv_bw, cos_bd, sin_bd, k_bshd, v_bshd, start, mask_bs, static)


def _append_and_attend_fwd(*args):
    return _forward(*args), args[:-1]


def _append_and_attend_bwd(static, residuals, cts):
    *floats, start, mask_bs = residuals

    def xla(*x):
        return append_and_attend_xla(*x, start, mask_bs, static[0], heads=static[1])

    _, vjp = jax.vjp(xla, *floats)
    return (*vjp(cts), None, None)  # start (int) and the mask (bool) have no cotangent


_append_and_attend.defvjp(_append_and_attend_fwd, _append_and_attend_bwd)


def append_and_attend_pallas(qkv_bw, cos_bd, sin_bd, k_bshd, v_bshd, start, mask_bs, dtype, *,
                             heads, interpret: bool | None = None, config=None):  # fmt: skip
    """(context [B, 1, H, d] in `dtype`, new K cache, new V cache) by the kernel (module
    docstring); the arguments as reference.append_and_attend_xla's. interpret=None:
    interpret mode on CPU backends."""
    reason = unsupported_reason(k_bshd, v_bshd, qkv_bw.dtype)
    if reason:
        raise ValueError(f"{reason}; use impl='xla' for such inputs")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    config = DecodeConfig() if config is None else config
    static = (jnp.dtype(dtype), tuple(heads), bool(interpret), config)
    return _append_and_attend(qkv_bw, cos_bd, sin_bd, k_bshd, v_bshd, start, mask_bs, static)
