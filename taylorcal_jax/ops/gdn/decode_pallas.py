"""One decoding step of the gated delta rule as one Pallas kernel (Triton lowering on GPUs;
interpret mode on CPUs).

Letters: B batch, H heads, K key dim, V value dim, BV value columns per program.

The step of decode_step.py (its docstring has the algebra), with a = exp(g) and s the scale:

    q, k <- q / sqrt(|q|^2 + eps), k / sqrt(|k|^2 + eps)      (when use_qk_l2norm)
    r_k = S^T k,  r_q = S^T q,  c = beta (v - a r_k)
    o   = s (a r_q + (k . q) c),   S' = a S + k c^T

Grid (B, H, V / BV): program (b, h, j) holds the state's columns j*BV .. j*BV + BV - 1 of head
h, [K, BV] float32, all of K. Every quantity above is column-local except the two K-long
reductions per column (r_k, r_q) and the two scalars |q|, |k| and k . q, which each program
recomputes from the whole q and k rows it loads, so the programs never talk to each other: the
state is read once and written once (in place: the output aliases the state input), with no
other pass over it. XLA's form of the same step (decode_step.py) runs as several fused
programs, two of them over the state; at batch 1 those are small reductions that leave most
of the GPU idle (launch/results/profile_steps_h200.md).

All arithmetic is float32 (q, k, v are read in their dtype and widened; the output is in v's
dtype). The reductions are sums of K products in float32, as the XLA form's HIGHEST-precision
contraction, so the two agree to float32 rounding (tests/test_gdn_decode_pallas.py).
Differentiable: the backward is that of the XLA form (a decoding step is not differentiated for
speed; this keeps a differentiated single-token cached call correct whatever the impl).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from taylorcal_jax.ops.gdn.reference import L2_EPS

F32 = jnp.float32
_MIN_BLOCK = 16  # least value columns per program (64-byte rows of the state)


@dataclasses.dataclass(frozen=True)
class DecodeStepConfig:
    """Launch options (static, part of the jit cache key).

    programs: BV is halved from V (down to 16) until B * H * V / BV reaches this many programs,
      so that batch 1 still spreads over the GPU's SMs (132 on an H100/H200).
    warps: Triton warps per program.
    """

    programs: int = 264
    warps: int = 4

    def __post_init__(self):
        for name in ("programs", "warps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def block_v(self, b: int, h: int, v: int) -> int:
        """BV for a state [b, h, K, v] (module docstring)."""
        bv = v
        while bv > _MIN_BLOCK and b * h * (v // bv) < self.programs:
            bv //= 2
        return bv


def _power_of_two(n: int) -> bool:
    return n >= _MIN_BLOCK and not n & (n - 1)


def unsupported_reason(q_bhk, v_bhv, state_bhkv) -> str | None:
    """Why the kernel cannot take these inputs (decode_api.py's "auto" asks), or None."""
    for name, d in (("K", q_bhk.shape[-1]), ("V", v_bhv.shape[-1])):
        if not _power_of_two(d):
            return f"{name}={d} must be a power of two >= {_MIN_BLOCK} for the Pallas step"
    if any(x.dtype == jnp.float64 for x in (q_bhk, v_bhv, state_bhkv)):
        return "float64 inputs (the kernel computes in float32)"
    if state_bhkv.dtype != F32:
        return f"a {state_bhkv.dtype} state (the kernel reads and writes a float32 state)"
    return None


def _kernel(q_ref, k_ref, v_ref, gb_ref, s_ref, o_ref, new_s_ref, *, scale, l2norm):
    q = q_ref[...].astype(F32)  # [K]
    k = k_ref[...].astype(F32)
    if l2norm:
        q = q * lax.rsqrt(jnp.sum(q * q) + L2_EPS)
        k = k * lax.rsqrt(jnp.sum(k * k) + L2_EPS)
    gb = gb_ref[...]  # [2]: g, beta
    first = lax.broadcasted_iota(jnp.int32, gb.shape, 0) == 0
    decay = jnp.exp(jnp.sum(jnp.where(first, gb, 0.0)))
    beta = jnp.sum(jnp.where(first, 0.0, gb))
    state = s_ref[...]  # [K, BV]
    read_k = jnp.sum(state * k[:, None], axis=0)  # [BV]
    read_q = jnp.sum(state * q[:, None], axis=0)
    correction = beta * (v_ref[...].astype(F32) - decay * read_k)
    o_ref[...] = (scale * (decay * read_q + jnp.sum(k * q) * correction)).astype(o_ref.dtype)
    new_s_ref[...] = decay * state + k[:, None] * correction[None, :]


def _forward(q_bhk, k_bhk, v_bhv, g_bh, beta_bh, state_bhkv, static):
    scale, l2norm, interpret, config = static
    b, h, kd = q_bhk.shape
    vd = v_bhv.shape[-1]
    bv = config.block_v(b, h, vd)
    gb_bh2 = jnp.stack([g_bh.astype(F32), beta_bh.astype(F32)], axis=-1)
    row = pl.BlockSpec((None, None, kd), lambda bb, hh, j: (bb, hh, 0))
    cols = pl.BlockSpec((None, None, bv), lambda bb, hh, j: (bb, hh, j))
    state = pl.BlockSpec((None, None, kd, bv), lambda bb, hh, j: (bb, hh, 0, j))
    launch = {}
    if not interpret:
        launch = dict(compiler_params=plgpu.CompilerParams(num_warps=config.warps, num_stages=1))
    return pl.pallas_call(
        functools.partial(_kernel, scale=scale, l2norm=l2norm),
        grid=(b, h, vd // bv),
        in_specs=[row, row, cols, pl.BlockSpec((None, None, 2), lambda bb, hh, j: (bb, hh, 0)),
                  state],
        out_specs=[cols, state],
        out_shape=[
            jax.ShapeDtypeStruct((b, h, vd), v_bhv.dtype),
            jax.ShapeDtypeStruct((b, h, kd, vd), F32),
        ],
        input_output_aliases={4: 1},  # the new state overwrites the old one
        interpret=interpret,
        name="gdn_decode_step",
        **launch,
    )(q_bhk, k_bhk, v_bhv, gb_bh2, state_bhkv)  # fmt: skip


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _decode_step(q_bhk, k_bhk, v_bhv, g_bh, beta_bh, state_bhkv, static):
    return _forward(q_bhk, k_bhk, v_bhv, g_bh, beta_bh, state_bhkv, static)


def _decode_step_fwd(q_bhk, k_bhk, v_bhv, g_bh, beta_bh, state_bhkv, static):
    inputs = (q_bhk, k_bhk, v_bhv, g_bh, beta_bh, state_bhkv)
    return _forward(*inputs, static), inputs


def _decode_step_bwd(static, inputs, cotangents):
    from taylorcal_jax.ops.gdn.decode_step import decode_step_xla

    scale, l2norm = static[:2]
    _, vjp = jax.vjp(lambda *x: decode_step_xla(*x, scale=scale, use_qk_l2norm=l2norm), *inputs)
    return vjp(cotangents)


_decode_step.defvjp(_decode_step_fwd, _decode_step_bwd)


def decode_step_pallas(
    q_bhk,
    k_bhk,
    v_bhv,
    g_bh,
    beta_bh,
    state_bhkv,
    *,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    interpret: bool | None = None,
    config: DecodeStepConfig | None = None,
):
    """The step by the kernel (module docstring); arguments and results as
    decode_step.decode_step_xla's: (o_bhv in v's dtype, new state [B, H, K, V] float32).
    interpret=None: interpret mode on CPU backends."""
    reason = unsupported_reason(q_bhk, v_bhv, state_bhkv)
    if reason:
        raise ValueError(f"{reason}; use impl='xla' for such inputs")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    scale = q_bhk.shape[-1] ** -0.5 if scale is None else float(scale)
    config = DecodeStepConfig() if config is None else config
    static = (scale, bool(use_qk_l2norm), bool(interpret), config)
    return _decode_step(q_bhk, k_bhk, v_bhv, g_bh, beta_bh, state_bhkv, static)
