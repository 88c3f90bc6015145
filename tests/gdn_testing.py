"""Shared helpers for gated-delta-rule tests: random inputs, a NumPy fp64 loop, relative error,
the exported gradient of a kernel.

Letters: B batch, T time, H heads, K key dim, V value dim. Inputs in [B, T, H, .] layout,
states [B, H, K, V]. Kept small and stable: the Pallas kernel tests import it too.
"""

from __future__ import annotations

import numpy as np


def random_inputs(
    seed: int,
    b: int = 2,
    t: int = 19,
    h: int = 2,
    k: int = 8,
    v: int = 6,
    *,
    dtype=np.float32,
    g_min: float = -2.0,
    g_max: float = -0.01,
    beta_min: float = 0.0,
    beta_max: float = 1.0,
    with_state: bool = True,
) -> dict[str, np.ndarray]:
    """q, k [B,T,H,K], v [B,T,H,V] ~ N(0, 1); g ~ U(g_min, g_max) (log decay); beta ~
    U(beta_min, beta_max); initial_state [B,H,K,V] ~ N(0, 1) when with_state. NumPy arrays."""
    rng = np.random.default_rng(seed)
    out = {
        "q": rng.standard_normal((b, t, h, k)),
        "k": rng.standard_normal((b, t, h, k)),
        "v": rng.standard_normal((b, t, h, v)),
        "g": rng.uniform(g_min, g_max, (b, t, h)),
        "beta": rng.uniform(beta_min, beta_max, (b, t, h)),
    }
    if with_state:
        out["initial_state"] = rng.standard_normal((b, h, k, v))
    return {name: x.astype(dtype) for name, x in out.items()}


def numpy_gated_delta_rule(
    q, k, v, g, beta, initial_state=None, *, scale=None, use_qk_l2norm=True, eps=1e-6
):
    """Plain per-token loop in float64, written independently of the JAX code.

    For each (b, h): S <- exp(g_t) S; S <- S + beta_t k_t (v_t - S^T k_t)^T; o_t = s S^T q_t,
    with q, k L2-normalised as x / sqrt(sum x^2 + eps). Returns (o [B,T,H,V], S [B,H,K,V]).
    """
    q, k, v, g, beta = (np.asarray(x, np.float64) for x in (q, k, v, g, beta))
    bsz, t, h, kdim = q.shape
    vdim = v.shape[-1]
    scale = kdim**-0.5 if scale is None else scale
    if use_qk_l2norm:
        q = q / np.sqrt(np.sum(q * q, axis=-1, keepdims=True) + eps)
        k = k / np.sqrt(np.sum(k * k, axis=-1, keepdims=True) + eps)
    o = np.zeros((bsz, t, h, vdim))
    states = np.zeros((bsz, h, kdim, vdim))
    if initial_state is not None:
        states = np.array(initial_state, np.float64)
    for bi in range(bsz):
        for hi in range(h):
            s = states[bi, hi]
            for ti in range(t):
                s = np.exp(g[bi, ti, hi]) * s
                kt = k[bi, ti, hi]
                s = s + beta[bi, ti, hi] * np.outer(kt, v[bi, ti, hi] - s.T @ kt)
                o[bi, ti, hi] = scale * (s.T @ q[bi, ti, hi])
            states[bi, hi] = s
    return o, states


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected| (both taken in float64)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    if actual.shape != expected.shape:
        raise ValueError(f"shape mismatch: {actual.shape} vs {expected.shape}")
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


TRITON_CALL = "__gpu$xla.gpu.triton"  # the custom call of a Pallas Triton kernel


def exported_gradient_module(
    op, platform: str, dtype, t: int, kdim: int = 128, vdim: int = 128, **op_kwargs
) -> str:
    """The MLIR module of value_and_grad of a GDN op, exported for `platform` ("cuda", "tpu")
    on the CPU: the Pallas kernels' lowering for that platform runs, their compilation does not.
    Operands: head dims K and V (by default Qwen2.5-1.5B's, 128), B = 1, H = 2, T = t,
    q/k/v/beta in `dtype`, g and the initial state float32; the loss sums the output and the
    final state."""
    import jax
    import jax.numpy as jnp

    b, h = 1, 2
    shapes = [(b, t, h, kdim), (b, t, h, kdim), (b, t, h, vdim), (b, t, h), (b, t, h)]
    dtypes = [dtype, dtype, dtype, jnp.float32, dtype]
    args = [jax.ShapeDtypeStruct(s, d) for s, d in zip(shapes, dtypes, strict=True)]
    args.append(jax.ShapeDtypeStruct((b, h, kdim, vdim), jnp.float32))

    def loss(q, k, v, g, beta, s0):
        o, s = op(q, k, v, g, beta, initial_state_bhkv=s0, output_final_state=True, **op_kwargs)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

    fn = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6))))
    # Pallas's Triton kernels are custom calls that jax.export does not vouch for
    skip = [jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
    return jax.export.export(fn, platforms=[platform], disabled_checks=skip)(*args).mlir_module()
