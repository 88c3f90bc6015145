"""Naive teacher -> student conversions (METHOD.md §3), as pure functions on param dicts.

Letters: D hidden, H query heads, Hkv key/value heads, G = H / Hkv, d head dim, W conv width.

For every converted layer (not in `keep_full_attention_layers`) the attention params
`self_attn/*` become GDN params `gdn/*`:

    Wq -> q_proj                  [D, H*d]   copied
    Wk, Wv -> k_proj, v_proj      [D, Hkv*d] -> [D, H*d]: kv head j is repeated for the G
                                  query heads h = j*G .. j*G+G-1 (HF `repeat_kv` order)
    Wo -> o_proj                  [H*d, D]   copied
    a_proj, b_proj, g_proj        standard dense init U(-1/sqrt(D), 1/sqrt(D)) (PyTorch)
    A_log = log A, A ~ U(0, 16];  dt_bias = softplus^-1(dt), dt log-uniform [1e-3, 1e-1],
                                  floored at 1e-4;  o_norm/scale = 1
    {q,k,v}_conv/kernel           (short-conv option only) identity: 1 at the current-token
                                  tap, 0 elsewhere, so the conv variant starts equal to the
                                  conv-free one.

Dropped teacher parts, by necessity: GDN projections have no bias (as in flash-linear-
attention), and the GDN input is rmsnorm(h), which has no constant direction to fold a bias
into, so Qwen2's q/k/v biases are dropped. Qwen3's per-head q/k RMSNorm scales are dropped too
(GDN L2-normalises q and k itself; folding the scale into Wq/Wk would act before the SiLU and
change more than a rescale). RoPE is not applied in GDN layers. Everything else (kept layers,
embeddings, norms, MLPs, head) is copied unchanged (same arrays, same dtype).

    copy        the above
    zero_gate   copy, then g_proj = 0: silu(0) = 0, so every GDN layer outputs exactly 0 and the
                student equals the teacher with those attention sublayers removed
    small_gate  copy, then g_proj *= 0.02
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from taylorcal_jax.models.gdn import init_A_log, init_dt_bias, torch_linear_init
from taylorcal_jax.models.student import StudentConfig

Params = dict[str, Any]
SMALL_GATE_FACTOR = 0.02


def repeat_kv_heads(kernel_dx, num_kv_heads: int, groups: int):
    """[D, Hkv*d] -> [D, Hkv*G*d], each head block repeated G times in place."""
    d_in, width = kernel_dx.shape
    head_dim = width // num_kv_heads
    blocks = kernel_dx.reshape(d_in, num_kv_heads, head_dim)
    return jnp.repeat(blocks, groups, axis=1).reshape(d_in, num_kv_heads * groups * head_dim)


def _check(teacher_params: Params, config: StudentConfig) -> None:
    t, g = config.teacher, config.gdn
    if (g.num_heads, g.head_k_dim, g.head_v_dim) != (
        t.num_attention_heads,
        t.head_dim,
        t.head_dim,
    ):
        raise ValueError(
            "naive conversion needs GDN heads/dims equal to the teacher's "
            f"(H={t.num_attention_heads}, K=V={t.head_dim}); got H={g.num_heads}, "
            f"K={g.head_k_dim}, V={g.head_v_dim}. Build the GDNConfig with GDNConfig.from_teacher."
        )
    for i in range(t.num_hidden_layers):
        layer = teacher_params.get(f"layers_{i}")
        if layer is None or "self_attn" not in layer:
            raise ValueError(
                f"teacher params lack layers_{i}/self_attn; pass the teacher's params "
                "(all-attention), not a student's"
            )


def gdn_from_attention(attn: Params, config: StudentConfig, rng) -> Params:
    """GDN params of one converted layer from its teacher attention params (`copy` init)."""
    t, g = config.teacher, config.gdn
    d = t.hidden_size
    dtype = attn["q_proj"]["kernel"].dtype
    groups = t.num_kv_groups
    r_a, r_b, r_g, r_A, r_dt = jax.random.split(rng, 5)
    out: Params = {
        "q_proj": {"kernel": attn["q_proj"]["kernel"]},
        "k_proj": {
            "kernel": repeat_kv_heads(attn["k_proj"]["kernel"], t.num_key_value_heads, groups)
        },
        "v_proj": {
            "kernel": repeat_kv_heads(attn["v_proj"]["kernel"], t.num_key_value_heads, groups)
        },
        "o_proj": {"kernel": attn["o_proj"]["kernel"]},
        "a_proj": {"kernel": torch_linear_init(r_a, (d, g.num_heads)).astype(dtype)},
        "b_proj": {"kernel": torch_linear_init(r_b, (d, g.num_heads)).astype(dtype)},
        "g_proj": {"kernel": torch_linear_init(r_g, (d, g.value_dim)).astype(dtype)},
        "A_log": init_A_log(r_A, (g.num_heads,)),
        "dt_bias": init_dt_bias(r_dt, (g.num_heads,)),
        "o_norm": {"scale": jnp.ones((g.head_v_dim,), jnp.float32)},
    }
    if g.use_short_conv:
        for name, width in (("q", g.key_dim), ("k", g.key_dim), ("v", g.value_dim)):
            kernel = jnp.zeros((g.conv_size, width), jnp.float32).at[-1].set(1.0)
            out[f"{name}_conv"] = {"kernel": kernel}
    return out


_TEACHER_PARTS = ("q_proj", "o_proj")  # GDN params that are the teacher's arrays, unchanged


@functools.partial(jax.jit, static_argnums=1)
def _new_mixer_parts(attn: Params, config: StudentConfig, rng, layer) -> Params:
    """`gdn_from_attention(attn, config, fold_in(rng, layer))` less _TEACHER_PARTS; `layer` is
    traced, so every converted layer of a model runs the same compiled program."""
    gdn = gdn_from_attention(attn, config, jax.random.fold_in(rng, layer))
    return {k: v for k, v in gdn.items() if k not in _TEACHER_PARTS}


def copy_init(teacher_params: Params, config: StudentConfig, rng) -> Params:
    """`copy`: the student params; the teacher's arrays are reused (never modified).

    Converted layer i gets `gdn_from_attention(its self_attn, config, fold_in(rng, i))`, the
    new parts from one jitted program (config static, so it compiles once per config and
    shapes, not once per small op), q_proj and o_proj being the teacher's arrays themselves.
    """
    _check(teacher_params, config)
    student = {k: v for k, v in teacher_params.items()}
    for i in config.converted_layers:
        name = f"layers_{i}"
        attn = teacher_params[name]["self_attn"]
        layer = {k: v for k, v in teacher_params[name].items() if k != "self_attn"}
        layer["gdn"] = {
            **{k: {"kernel": attn[k]["kernel"]} for k in _TEACHER_PARTS},
            **_new_mixer_parts(attn, config, rng, i),
        }
        student[name] = layer
    return student


def _scale_gates(params: Params, config: StudentConfig, factor: float) -> Params:
    out = dict(params)
    for i in config.converted_layers:
        name = f"layers_{i}"
        gdn = dict(out[name]["gdn"])
        kernel = gdn["g_proj"]["kernel"]
        gdn["g_proj"] = {"kernel": jnp.zeros_like(kernel) if factor == 0 else kernel * factor}
        out[name] = {**out[name], "gdn": gdn}
    return out


def zero_gate(teacher_params: Params, config: StudentConfig, rng) -> Params:
    """`zero_gate`: `copy` with g_proj = 0 (GDN layers output exactly 0)."""
    return _scale_gates(copy_init(teacher_params, config, rng), config, 0.0)


def small_gate(teacher_params: Params, config: StudentConfig, rng) -> Params:
    """`small_gate`: `copy` with g_proj scaled by SMALL_GATE_FACTOR (0.02)."""
    return _scale_gates(copy_init(teacher_params, config, rng), config, SMALL_GATE_FACTOR)


NAIVE_STRATEGIES: dict[str, Callable[[Params, StudentConfig, Any], Params]] = {
    "copy": copy_init,
    "zero_gate": zero_gate,
    "small_gate": small_gate,
}
