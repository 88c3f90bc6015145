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

From projections (`decode_step_from_projections_pallas`): the same programs take a GDN
layer's joined products of the token as they come out of them, x [Wq | Wk | Wv | Wg] [B, C]
and x [Wa | Wb] [B, 2H], with A_log, dt_bias [H] and the validity [B], and form their operands
themselves (step_inputs.py: silu of q, k, v; g and beta; zero where not valid): program
(b, h, j) reads q and k of head h and its BV columns of v from row b by index. Outside the
kernel those are small XLA programs of their own (three silus, the gates and the stacking of
g and beta at batch 16: about 6 us per layer on an H100,
launch/results/profile_steps_h100_decode_defaults.md), and slices of the joined product passed
to a kernel would be copies. With this entry the Qwen2.5-1.5B-shaped student's 32k batch-16
decoding step took 2.713 ms against 2.777 (0.977x) on one H200
(launch/results/probe_decode_h200_ab_{048c6f3,af222f5}.json). The gate inputs a, b, A_log and
dt_bias enter in their dtype, widened inside: cast outside, bf16-stored params cost two
launches per layer and step, and dropping them took that student's 32k steps to 0.976x-0.982x
(batch 1) and 0.985x-0.991x (batch 16) on one H100 (launch/results/probe_decode_h100_gdn_casts_
{base,uncast}*.json).

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

from taylorcal_jax.ops.gdn import decode_step, step_inputs
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


def unsupported_reason_from_projections(qkv_bc, state_bhkv) -> str | None:
    """`unsupported_reason` for the step from projections (decode_api.py's "auto" asks): the
    head dims are the state's, the dtype the projections'."""
    _, h, kd, vd = state_bhkv.shape
    like = lambda d: jax.ShapeDtypeStruct((1, h, d), qkv_bc.dtype)  # noqa: E731
    return unsupported_reason(like(kd), like(vd), state_bhkv)


def _step(q, k, v, decay, beta, s_ref, o_ref, new_s_ref, *, scale, l2norm):
    """The step of one program (module docstring) on float32 q, k [K], v [BV], scalars decay
    and beta, the state's columns `s_ref` [K, BV]."""
    if l2norm:
        q = q * lax.rsqrt(jnp.sum(q * q) + L2_EPS)
        k = k * lax.rsqrt(jnp.sum(k * k) + L2_EPS)
    state = s_ref[...]  # [K, BV]
    read_k = jnp.sum(state * k[:, None], axis=0)  # [BV]
    read_q = jnp.sum(state * q[:, None], axis=0)
    correction = beta * (v - decay * read_k)
    o_ref[...] = (scale * (decay * read_q + jnp.sum(k * q) * correction)).astype(o_ref.dtype)
    new_s_ref[...] = decay * state + k[:, None] * correction[None, :]


def _kernel(q_ref, k_ref, v_ref, gb_ref, s_ref, o_ref, new_s_ref, **static):
    gb = gb_ref[...]  # [2]: g, beta
    first = lax.broadcasted_iota(jnp.int32, gb.shape, 0) == 0
    decay = jnp.exp(jnp.sum(jnp.where(first, gb, 0.0)))
    beta = jnp.sum(jnp.where(first, 0.0, gb))
    q, k, v = (ref[...].astype(F32) for ref in (q_ref, k_ref, v_ref))
    _step(q, k, v, decay, beta, s_ref, o_ref, new_s_ref, **static)


def _kernel_from_projections(qkv_ref, ab_ref, alog_ref, dtb_ref, valid_ref, s_ref, o_ref,
                             new_s_ref, *, heads, k_dim, v_dim, block_v, ab_column, dtype,
                             **static):  # fmt: skip
    # qkv_ref, ab_ref, alog_ref, dtb_ref and valid_ref are whole (memory_space ANY): this
    # program's row b, head h and columns j are read from them by index; ab, A_log and dt_bias
    # in their dtype (step_inputs.gates widens them), since a cast outside would be a kernel of
    # its own per layer where params are stored in bf16 (1.3 us each on an H100)
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    ok = valid_ref[b] != 0
    hk = heads * k_dim

    def act(start, size):  # rounded to the compute dtype, step_inputs.activation, float32
        y = qkv_ref[b, pl.ds(start, size)]
        y = step_inputs.activation(y if dtype is None else y.astype(dtype)).astype(F32)
        return jnp.where(ok, y, 0.0)

    q, k = act(h * k_dim, k_dim), act(hk + h * k_dim, k_dim)
    v = act(2 * hk + h * v_dim + j * block_v, block_v)
    a, b_logit = ab_ref[b, ab_column + h], ab_ref[b, ab_column + heads + h]
    g, beta = step_inputs.gates(a, b_logit, alog_ref[h], dtb_ref[h], ok)
    _step(q, k, v, jnp.exp(g), beta, s_ref, o_ref, new_s_ref, **static)


def _launch(interpret, config):
    if interpret:
        return {}
    return dict(compiler_params=plgpu.CompilerParams(num_warps=config.warps, num_stages=1))


def _state_spec(kd, bv):
    return pl.BlockSpec((None, None, kd, bv), lambda bb, hh, j: (bb, hh, 0, j))


def _forward(q_bhk, k_bhk, v_bhv, g_bh, beta_bh, state_bhkv, static):
    scale, l2norm, interpret, config, _ = static
    b, h, kd = q_bhk.shape
    vd = v_bhv.shape[-1]
    bv = config.block_v(b, h, vd)
    gb_bh2 = jnp.stack([g_bh.astype(F32), beta_bh.astype(F32)], axis=-1)
    row = pl.BlockSpec((None, None, kd), lambda bb, hh, j: (bb, hh, 0))
    cols = pl.BlockSpec((None, None, bv), lambda bb, hh, j: (bb, hh, j))
    state = _state_spec(kd, bv)
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
        **_launch(interpret, config),
    )(q_bhk, k_bhk, v_bhv, gb_bh2, state_bhkv)  # fmt: skip


def _forward_from_projections(qkv_bc, ab_bc, A_log_h, dt_bias_h, valid_b, state_bhkv, static):
    scale, l2norm, interpret, config, layout = static
    layout = dict(layout)  # ab_column, dtype
    b, h, kd, vd = state_bhkv.shape
    bv = config.block_v(b, h, vd)
    whole = pl.BlockSpec(memory_space=pl.ANY)
    state = _state_spec(kd, bv)
    kernel = functools.partial(
        _kernel_from_projections, heads=h, k_dim=kd, v_dim=vd, block_v=bv, scale=scale,
        l2norm=l2norm, **layout,
    )  # fmt: skip
    out_dtype = qkv_bc.dtype if layout["dtype"] is None else layout["dtype"]
    return pl.pallas_call(
        kernel,
        grid=(b, h, vd // bv),
        in_specs=[whole] * 5 + [state],
        out_specs=[pl.BlockSpec((None, None, bv), lambda bb, hh, j: (bb, hh, j)), state],
        out_shape=[
            jax.ShapeDtypeStruct((b, h, vd), out_dtype),
            jax.ShapeDtypeStruct((b, h, kd, vd), F32),
        ],
        input_output_aliases={5: 1},  # the new state overwrites the old one
        interpret=interpret,
        name="gdn_decode_step_from_projections",
        **_launch(interpret, config),
    )(qkv_bc, ab_bc, A_log_h, dt_bias_h, valid_b.astype(jnp.int32), state_bhkv)  # fmt: skip


def _with_xla_backward(forward, xla_form):
    """forward(*inputs, static), differentiable by the backward of the XLA form of the same
    step, xla_form(*inputs, scale=, use_qk_l2norm=) (module docstring)."""

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def step(static, *inputs):
        return forward(*inputs, static)

    def step_fwd(static, *inputs):
        return forward(*inputs, static), inputs

    def step_bwd(static, inputs, cotangents):
        scale, l2norm, _, _, layout = static
        _, vjp = jax.vjp(
            lambda *x: xla_form(*x, scale=scale, use_qk_l2norm=l2norm, **dict(layout)), *inputs
        )
        return vjp(cotangents)

    step.defvjp(step_fwd, step_bwd)
    return step


_decode_step = _with_xla_backward(_forward, decode_step.decode_step_xla)
_decode_step_from_projections = _with_xla_backward(
    _forward_from_projections, decode_step.decode_step_from_projections_xla
)


def _static(head_dim, scale, use_qk_l2norm, interpret, config, **layout):
    """The kernels' static arguments; `layout` (the step from projections': ab_column, dtype)
    as sorted pairs, for the XLA form's backward too."""
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    scale = head_dim**-0.5 if scale is None else float(scale)
    config = DecodeStepConfig() if config is None else config
    return (scale, bool(use_qk_l2norm), bool(interpret), config, tuple(sorted(layout.items())))


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
    static = _static(q_bhk.shape[-1], scale, use_qk_l2norm, interpret, config)
    return _decode_step(static, q_bhk, k_bhk, v_bhv, g_bh, beta_bh, state_bhkv)


def decode_step_from_projections_pallas(
    qkv_bc,
    ab_bc,
    A_log_h,
    dt_bias_h,
    valid_b,
    state_bhkv,
    *,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    ab_column: int = 0,
    dtype=None,
    interpret: bool | None = None,
    config: DecodeStepConfig | None = None,
):
    """The step of a GDN layer from its joined projections by the kernel; arguments and
    results as decode_step.decode_step_from_projections_xla's: (o [B, H, V] in `dtype` or
    qkv_bc's, new state [B, H, K, V] float32). interpret=None: interpret mode on CPU backends."""
    reason = unsupported_reason_from_projections(qkv_bc, state_bhkv)
    if reason:
        raise ValueError(f"{reason}; use impl='xla' for such inputs")
    dtype = None if dtype is None else jnp.dtype(dtype)
    static = _static(state_bhkv.shape[2], scale, use_qk_l2norm, interpret, config,
                     ab_column=int(ab_column), dtype=dtype)  # fmt: skip
    return _decode_step_from_projections(static, qkv_bc, ab_bc, A_log_h, dt_bias_h, valid_b,
                                         state_bhkv)  # fmt: skip
