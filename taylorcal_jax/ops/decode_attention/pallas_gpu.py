"""Flash decoding as a Pallas kernel (Triton lowering on GPUs; interpret mode on CPUs).

Letters: B batch, S cache slots, H query heads, Hkv key/value heads, G = H / Hkv (Gp: G padded
to a power of two >= 16, the least row count of a Triton dot), d head dim, BS slots per block,
NS splits of S.

The cache [B, S, Hkv, d] and q [B, H, d] are read as they lie. Grid (B, Hkv, NS): program
(b, j, n) takes the G query heads of KV head j, query rows jG .. jG + G - 1, as one masked load
of Gp rows from row jG on (rows g >= G, which belong to the next KV head or lie past H, read as
0 and are never touched: no padded copy of q), and the slots of split n, `blocks` blocks of BS
slots, and keeps, per query row g, the running max m, sum l and unnormalised context a of online
softmax (fp32):

    x_s   = q_g . K[b, s, j] / sqrt(d)  where mask[b, s], else -1e30     (fp32 dot result)
    m'    = max(m, max_s x_s);  p_s = exp(x_s - m')
    l'    = exp(m - m') l + sum_s p_s;   a' = exp(m - m') a + sum_s p_s V[b, s, j]

Slots past S (the last block of the last split) get p_s = 0 and are never read (masked loads).
Only the G real rows of the partials are stored. The combine, a second kernel over the NS small
partials (grid (B, Hkv, G, parts): a slice of one query head's d per program, `combine_plan`),
is exact softmax algebra:

    M = max_n m_n,   context = sum_n exp(m_n - M) a_n / sum_n exp(m_n - M) l_n

Every split holds at least one slot, so the denominator is >= 1. One kernel where XLA's form of
the same sums took four (the max kept apart by an optimisation barrier, two reductions and the
division: 6.4 us per attention layer at batch 1 on an H100,
launch/results/profile_steps_h100_decode_norms_folded.md; the kernel 2.93 us,
profile_steps_h100_decode_launches.md), and it writes the context in the layout the output
projection reads. As in reference.py, masked slots get probability 0 unless a
row has no valid slot, which then averages V over all S slots.
Numerics: bf16 q, K, V give bf16 dot operands (p rounded to bf16 before the V product, as the
reference rounds P) with fp32 accumulation; other dtypes run fp32 dots at HIGHEST precision.
Differentiable: the backward is that of reference.attend_one_query (a decoding step is never
differentiated for speed; this keeps a differentiated T == 1 forward correct under impl "auto").
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from taylorcal_jax.ops.decode_attention.reference import NEG, attend_one_query
from taylorcal_jax.ops.pallas_dot import mm

F32 = jnp.float32
_MIN_DOT = 16  # least size of a Triton dot dimension


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Launch options (static, part of the jit cache key).

    block_s: cache slots per block (one K and one V tile of [block_s, d] per loop step).
    programs: the split count NS is chosen so that B * Hkv * NS reaches about this many programs
      (several per SM on an H100/H200, 132 SMs), each at least one block long.
    warps, stages: Triton warps and pipelining depth of the block loop.
    """

    block_s: int = 64
    programs: int = 512
    warps: int = 4
    stages: int = 2

    def __post_init__(self):
        if self.block_s < _MIN_DOT or self.block_s & (self.block_s - 1):
            raise ValueError(f"block_s must be a power of two >= {_MIN_DOT}, got {self.block_s}")
        for name in ("programs", "warps", "stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def split_plan(config: DecodeConfig, b: int, hkv: int, s: int) -> tuple[int, int]:
    """(NS splits, blocks per split) of S slots: about config.programs programs in all, every
    split non-empty (the last one may be shorter)."""
    blocks = pl.cdiv(s, config.block_s)
    want = min(max(pl.cdiv(config.programs, b * hkv), 1), blocks)
    per_split = pl.cdiv(blocks, want)
    return pl.cdiv(blocks, per_split), per_split


def unsupported_reason(q_b1hd, k_bshd) -> str | None:
    """Why the kernel cannot take these inputs (api.py's "auto" asks), or None."""
    d = q_b1hd.shape[-1]
    if d < _MIN_DOT or d & (d - 1):
        return f"head dim {d} must be a power of two >= {_MIN_DOT} for the Pallas kernel"
    if any(x.dtype == jnp.float64 for x in (q_b1hd, k_bshd)):
        return "float64 inputs (the kernel computes in float32)"
    return None


def _load_rows(ref, rows, ok):
    """ref[rows] with the rows outside the cache (ok False) read as 0 and never touched."""
    block = ref.at[rows]
    mask = jnp.broadcast_to(ok.reshape(ok.shape + (1,) * (len(block.shape) - 1)), block.shape)
    fill = 0.0 if jnp.issubdtype(ref.dtype, jnp.floating) else 0  # cast to the ref's dtype
    return plgpu.load(block, mask=mask, other=fill)


def _kernel(q_ref, k_ref, v_ref, mask_ref, m_ref, l_ref, a_ref, *, s_len, per_split, g, cfg, dt):
    bs = cfg.block_s
    gp = m_ref.shape[-1]
    # q [B, H, d] whole: rows jG .. jG + Gp - 1 of row b. Rows G..Gp-1 pad the dot: masked
    # (in the last KV head's tile they lie past H; g < G keeps jG + g < H), never stored
    real = lax.broadcasted_iota(jnp.int32, (gp,), 0) < g
    rows_q = q_ref.at[pl.program_id(0), pl.ds(pl.program_id(1) * g, gp)]  # [Gp, d]
    q = plgpu.load(rows_q, mask=jnp.broadcast_to(real[:, None], rows_q.shape), other=0.0)
    d = q.shape[1]
    first = pl.program_id(2) * per_split

    def step(i, carry):
        m, l, a = carry
        start = (first + i) * bs
        slots = start + lax.broadcasted_iota(jnp.int32, (bs,), 0)
        ok = slots < s_len
        rows = pl.ds(pl.multiple_of(start, bs), bs)
        k = _load_rows(k_ref, rows, ok)  # [BS, d]
        v = _load_rows(v_ref, rows, ok)
        valid = (_load_rows(mask_ref, rows, ok) != 0) & ok  # [BS]
        x = mm(q, k, 1, 1, dt) * (d**-0.5)  # [Gp, BS]
        x = jnp.where(valid[None, :], x, NEG)
        m_new = jnp.maximum(m, jnp.max(x, axis=1))
        p = jnp.where(ok[None, :], jnp.exp(x - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        return m_new, alpha * l + jnp.sum(p, axis=1), alpha[:, None] * a + mm(p, v, 1, 0, dt)

    init = (jnp.full((gp,), NEG, F32), jnp.zeros((gp,), F32), jnp.zeros((gp, d), F32))
    m, l, a = lax.fori_loop(0, per_split, step, init)
    plgpu.store(m_ref, m, mask=real)
    plgpu.store(l_ref, l, mask=real)
    plgpu.store(a_ref, a, mask=jnp.broadcast_to(real[:, None], a.shape))


def _launch(interpret: bool, warps: int, stages: int) -> dict:
    if interpret:
        return {}
    return dict(compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=stages))


def partials(q_bhd, k_bshd, v_bshd, mask_bs, config: DecodeConfig, interpret: bool, dt):
    """The kernel on q [B, H, d]: (m [B, Hkv, NS, Gp], l [B, Hkv, NS, Gp], a [B, Hkv, NS, Gp,
    d]) in fp32, of which rows 0..G-1 of the Gp are written (the others are never read)."""
    b, h, d = q_bhd.shape
    s, hkv = k_bshd.shape[1:3]
    g = h // hkv
    gp = max(_MIN_DOT, pl.next_power_of_2(g))
    ns, per_split = split_plan(config, b, hkv, s)
    kern = functools.partial(_kernel, s_len=s, per_split=per_split, g=g, cfg=config, dt=dt)
    cache = pl.BlockSpec((None, s, None, d), lambda bb, j, n: (bb, 0, j, 0))
    stats = pl.BlockSpec((None, None, None, gp), lambda bb, j, n: (bb, j, n, 0))
    return pl.pallas_call(
        kern,
        grid=(b, hkv, ns),
        in_specs=[
            pl.BlockSpec(memory_space=pl.ANY),  # q whole: each program loads its rows
            cache,
            cache,
            pl.BlockSpec((None, s), lambda bb, j, n: (bb, 0)),
        ],
        out_specs=[
            stats,
            stats,
            pl.BlockSpec((None, None, None, gp, d), lambda bb, j, n: (bb, j, n, 0, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, hkv, ns, gp), F32),
            jax.ShapeDtypeStruct((b, hkv, ns, gp), F32),
            jax.ShapeDtypeStruct((b, hkv, ns, gp, d), F32),
        ],
        interpret=interpret,
        name="decode_attention",
        **_launch(interpret, config.warps, config.stages),
    )(q_bhd, k_bshd, v_bshd, mask_bs)


# The combine's launch: programs split the head dim into parts until there are about
# COMBINE_PROGRAMS (a batch-1 step has only Hkv G query heads: 12 at Qwen2.5-1.5B's shape), and
# each load holds at most COMBINE_LOAD float32 elements of the partials ([splits, d / parts]).
COMBINE_PROGRAMS = 132
COMBINE_LOAD = 4096


def combine_plan(b: int, heads: int, ns: int, d: int) -> tuple[int, int]:
    """(head-dim parts, splits per load) of the combine for B batch rows, `heads` = Hkv G query
    heads, NS splits and head dim d (all powers of two but B, heads and NS)."""
    parts = 1
    while b * heads * parts < COMBINE_PROGRAMS and d // parts > _MIN_DOT:
        parts *= 2
    return parts, min(pl.next_power_of_2(ns), max(COMBINE_LOAD * parts // d, 1))


def _combine_kernel(m_ref, l_ref, a_ref, o_ref, *, ns, chunk):
    b, j, r, part = (pl.program_id(i) for i in range(4))
    nsp, bd = pl.next_power_of_2(ns), o_ref.shape[-1]

    def stats(ref, rows, ok, fill):
        return plgpu.load(ref.at[b, j, rows, r], mask=ok, other=fill)

    every = lax.broadcasted_iota(jnp.int32, (nsp,), 0) < ns
    top = jnp.max(stats(m_ref, pl.ds(0, nsp), every, NEG))

    def step(i, carry):
        num, den = carry
        rows = pl.ds(i * chunk, chunk)
        ok = i * chunk + lax.broadcasted_iota(jnp.int32, (chunk,), 0) < ns
        # splits past NS weigh 0 even where every logit of the row is masked (top = NEG)
        w = jnp.where(ok, jnp.exp(stats(m_ref, rows, ok, NEG) - top), 0.0)  # [chunk]
        block = a_ref.at[b, j, rows, r, pl.ds(part * bd, bd)]  # [chunk, d / parts]
        a = plgpu.load(block, mask=jnp.broadcast_to(ok[:, None], block.shape), other=0.0)
        return num + jnp.sum(w[:, None] * a, axis=0), den + jnp.sum(w * stats(l_ref, rows, ok, 0.0))

    num, den = lax.fori_loop(0, nsp // chunk, step, (jnp.zeros((bd,), F32), jnp.zeros((), F32)))
    o_ref[...] = (num / den).astype(o_ref.dtype)


def combine(m_bkng, l_bkng, a_bkngd, g, dtype, interpret: bool):
    """context [B, Hkv G, d] in `dtype` from the splits' partials, rows 0..g-1 of each Gp
    (module docstring): the combine kernel, grid (B, Hkv, G, head-dim parts)."""
    b, hkv, ns, _, d = a_bkngd.shape
    parts, chunk = combine_plan(b, hkv * g, ns, d)
    whole = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
        functools.partial(_combine_kernel, ns=ns, chunk=chunk),
        grid=(b, hkv, g, parts),
        in_specs=[whole, whole, whole],
        out_specs=pl.BlockSpec((None, None, d // parts), lambda bb, j, r, p: (bb, j * g + r, p)),
        out_shape=jax.ShapeDtypeStruct((b, hkv * g, d), dtype),
        interpret=interpret,
        name="decode_attention_combine",
        **_launch(interpret, warps=4, stages=2),
    )(m_bkng, l_bkng, a_bkngd)


def decode_attention_pallas(
    q_b1hd, k_bshd, v_bshd, mask_bs, dtype, *, interpret: bool | None = None, config=None
):
    """context [B, 1, H, d] in `dtype` by the kernel (module docstring); the arguments as
    reference.attend_one_query's. interpret=None: interpret mode on CPU backends."""
    reason = unsupported_reason(q_b1hd, k_bshd)
    if reason:
        raise ValueError(f"{reason}; use impl='xla' for such inputs")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    config = DecodeConfig() if config is None else config
    static = (jnp.dtype(dtype), bool(interpret), config)
    return _decode_attention(q_b1hd, k_bshd, v_bshd, mask_bs, static)


def _forward(q_b1hd, k_bshd, v_bshd, mask_bs, static):
    dtype, interpret, config = static
    b, _, h, d = q_b1hd.shape
    hkv = k_bshd.shape[2]
    bf16 = all(x.dtype == jnp.bfloat16 for x in (q_b1hd, k_bshd, v_bshd))
    dt = jnp.bfloat16 if bf16 else F32
    q_bhd = q_b1hd.reshape(b, h, d)  # free: query head h = j G + g
    parts = partials(q_bhd, k_bshd, v_bshd, mask_bs.astype(jnp.int8), config, interpret, dt)
    return combine(*parts, h // hkv, dtype, interpret).reshape(b, 1, h, d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _decode_attention(q_b1hd, k_bshd, v_bshd, mask_bs, static):
    return _forward(q_b1hd, k_bshd, v_bshd, mask_bs, static)


def _decode_attention_fwd(q_b1hd, k_bshd, v_bshd, mask_bs, static):
    return _forward(q_b1hd, k_bshd, v_bshd, mask_bs, static), (q_b1hd, k_bshd, v_bshd, mask_bs)


def _decode_attention_bwd(static, residuals, ct_b1hd):
    q_b1hd, k_bshd, v_bshd, mask_bs = residuals
    _, vjp = jax.vjp(
        lambda q, k, v: attend_one_query(q, k, v, mask_bs, static[0]), q_b1hd, k_bshd, v_bshd
    )
    return (*vjp(ct_b1hd), None)  # the mask (bool) has no cotangent


_decode_attention.defvjp(_decode_attention_fwd, _decode_attention_bwd)
