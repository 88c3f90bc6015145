"""The one-kernel SwiGLU MLP of a decoding row (ops/swiglu): the Pallas kernel in interpret mode
against numpy in float64, its launch plan and refusals, the dispatch, gradients, and the Triton
lowering; on a GPU, the compiled kernel at the Qwen2.5-1.5B MLP's shape. The models' decoding
steps through it: tests/test_joined.py.

Metric: rel = max|a - b| / max|b|. Tolerances:
  float32 operands, kernel vs float64 numpy                          1e-6 (fp32 sums of <= 256)
  bfloat16 operands, kernel vs float64 numpy on the same bf16 values  1e-2 (h rounded to bf16)
  gradients, kernel vs XLA's form (the kernel's backward is that form's) 1e-6
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decode_testing import pallas_calls
from gdn_testing import rel_err

from taylorcal_jax.ops.swiglu import api, pallas_gpu

F32 = jnp.float32
QWEN2_5_1_5B = (1536, 8960, 1536)  # K, F, N


def _operands(k, f, n, seed=0):
    """x [1, K], r [1, 1], W_gu [K, 2F], W_d [F, N] (float64 numpy), scaled so h is O(1)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, k))
    w_gu = rng.standard_normal((k, 2 * f)) / np.sqrt(k)
    w_d = rng.standard_normal((f, n)) / np.sqrt(f)
    return x, np.array([[0.8]]), w_gu, w_d


def _numpy(x, r, w_gu, w_d):
    f = w_d.shape[0]
    g, u = r * (x @ w_gu[:, :f]), r * (x @ w_gu[:, f:])
    return (g / (1.0 + np.exp(-g)) * u) @ w_d


@pytest.mark.parametrize("k, f, n", [(64, 96, 64), (256, 160, 48)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_equals_numpy(k, f, n, dtype):
    x, r, w_gu, w_d = _operands(k, f, n)
    ops = [jnp.asarray(x, dtype), jnp.asarray(r, F32), jnp.asarray(w_gu, dtype),
           jnp.asarray(w_d, dtype)]  # fmt: skip
    got = pallas_gpu.swiglu_mlp_pallas(*ops, interpret=True)
    assert got.shape == (1, n) and got.dtype == F32
    want = _numpy(*(np.asarray(a, np.float64) for a in ops))  # the same rounded operands
    assert rel_err(got, want) < (1e-6 if dtype == F32 else 1e-2)
    assert rel_err(got, api.swiglu_mlp_xla(*ops)) < (1e-6 if dtype == F32 else 1e-2)


def test_plan_and_refusals():
    config = pallas_gpu.SwigluConfig()
    assert config.plan(*QWEN2_5_1_5B) == (32, 128, 256)  # 280 programs of 32 columns
    assert config.plan(64, 96, 48) == (32, 64, 16)
    assert config.plan(64, 100, 64) is None
    small = pallas_gpu.SwigluConfig(block_f=16, block_k=16, block_n=16)
    x, r, w_gu, w_d = (jnp.asarray(a, F32) for a in _operands(64, 96, 64, seed=1))
    got = pallas_gpu.swiglu_mlp_pallas(x, r, w_gu, w_d, interpret=True, config=small)
    assert rel_err(got, _numpy(*(np.asarray(a, np.float64) for a in (x, r, w_gu, w_d)))) < 1e-6
    reason = pallas_gpu.unsupported_reason
    assert "2 rows" in reason(jnp.ones((2, 64)), w_gu, w_d)
    assert "is not [K, 2F]" in reason(x, w_gu[:, :100], w_d)
    assert "multiples of 16" in reason(jnp.ones((1, 40)), jnp.ones((40, 192)), w_d)
    with jax.enable_x64(True):
        assert "float64" in reason(x.astype(jnp.float64), w_gu, w_d)
    with pytest.raises(ValueError, match="2 rows.*impl='xla'"):
        pallas_gpu.swiglu_mlp_pallas(jnp.ones((2, 64)), r, w_gu, w_d, interpret=True)
    with pytest.raises(ValueError, match="warps must be >= 1"):
        pallas_gpu.SwigluConfig(warps=0)


def test_dispatch():
    x, _, w_gu, w_d = (jnp.asarray(a, F32) for a in _operands(64, 96, 64))
    assert api.runs_fused("pallas", x, w_gu, w_d)
    assert not api.runs_fused("pallas", jnp.ones((2, 64)), w_gu, w_d)  # one row only
    assert not api.runs_fused("auto", x, w_gu, w_d)  # no GPU here
    assert not api.runs_fused("xla", x, w_gu, w_d)
    with pytest.raises(ValueError, match="unknown SwiGLU MLP impl 'fast'"):
        api.runs_fused("fast", x, w_gu, w_d)


def test_gradients_equal_xla():
    ops = [jnp.asarray(a, F32) for a in _operands(64, 96, 64, seed=2)]

    def loss(fn, *ops):
        return jnp.sum(jnp.sin(fn(*ops)))

    kernel = jax.grad(lambda *o: loss(api.swiglu_mlp, *o), argnums=(0, 1, 2, 3))(*ops)
    xla = jax.grad(lambda *o: loss(api.swiglu_mlp_xla, *o), argnums=(0, 1, 2, 3))(*ops)
    assert pallas_calls(jax.make_jaxpr(api.swiglu_mlp)(*ops).jaxpr) == 1
    for a, b in zip(kernel, xla, strict=True):
        assert rel_err(a, b) < 1e-6


def test_kernel_lowers_to_triton_for_a_gpu():
    # Pallas's Triton lowering runs here, without a GPU (the export for platform "cuda"): every
    # load, dot, reduction and store passes its checks at the Qwen2.5-1.5B MLP's shape
    k, f, n = QWEN2_5_1_5B
    bf16 = jnp.bfloat16
    args = [jax.ShapeDtypeStruct((1, k), bf16), jax.ShapeDtypeStruct((1, 1), F32),
            jax.ShapeDtypeStruct((k, 2 * f), bf16), jax.ShapeDtypeStruct((f, n), bf16)]  # fmt: skip
    triton = "__gpu$xla.gpu.triton"
    exported = jax.export.export(
        jax.jit(lambda *a: pallas_gpu.swiglu_mlp_pallas(*a)),
        platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton)],
    )(*args)
    assert exported.mlir_module().count(triton) == 1


@pytest.mark.gpu
def test_compiled_kernel_equals_xla_on_gpu():
    # the Qwen2.5-1.5B MLP in bf16, compiled by Triton, against fp64 and XLA's form; "auto"
    # takes the one-row operands on a GPU
    ops = _operands(*QWEN2_5_1_5B, seed=3)
    dtypes = (jnp.bfloat16, F32, jnp.bfloat16, jnp.bfloat16)
    ops = [jnp.asarray(a, d) for a, d in zip(ops, dtypes, strict=True)]
    assert api.runs_fused("auto", ops[0], ops[2], ops[3])
    got = jax.jit(api.swiglu_mlp)(*ops)
    want = _numpy(*(np.asarray(a, np.float64) for a in ops))
    assert rel_err(got, want) < 1e-2
    assert rel_err(got, jax.jit(api.swiglu_mlp_xla)(*ops)) < 1e-2
