"""The MLP half of a block with the norm and the SwiGLU gate inside the few-row kernel's products
(ops/gemv/fused.py, pallas_gpu.py's prologues): each prologue in interpret mode against float64
numpy, `residual_mlp` by the kernels against its XLA reference in float32 and bfloat16, the
dispatch (one row only), gradients, the Triton lowering at the Qwen2.5-1.5B MLP's shapes, and on
a GPU the compiled kernels against XLA.

Metric: rel = max|a - b| / max|b|. Tolerances:
  float32, a prologue's product vs float64 numpy of the same math   1e-6 (fp32 sums)
  float32, residual_mlp by the kernels vs the XLA reference          1e-6
  bfloat16 compute, kernels vs the XLA reference                     1e-2 (the bf16 roundings
                                                                     of the prologues' steps)
  gradients, kernels vs the reference (its backward is XLA's)        1e-6
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gdn_testing import rel_err
from jaxpr_testing import equations

from taylorcal_jax.ops.gemv import fused, pallas_gpu

F32, BF16 = jnp.float32, jnp.bfloat16
EPS = 1e-6


def _mlp(d, f, seed=0, h_dtype=F32, w_dtype=F32):
    """h [1, D], the norm's scale [D], W_gate_up [D, 2F], W_down [F, D]."""
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.standard_normal((1, d)), h_dtype)
    scale = jnp.asarray(1 + 0.1 * rng.standard_normal(d), F32)
    w_gate_up = jnp.asarray(rng.standard_normal((d, 2 * f)) / np.sqrt(d), w_dtype)
    w_down = jnp.asarray(rng.standard_normal((f, d)) / np.sqrt(f), w_dtype)
    return h, scale, w_gate_up, w_down


def _f64(a):
    return np.asarray(a, np.float64)


def test_prologues_equal_numpy():
    # float32 throughout: the prologues' roundings are no-ops, so numpy's math is exact
    h, scale, w_gate_up, w_down = _mlp(64, 48)
    gate_up_s = pallas_gpu.gemv_partials(h, w_gate_up, scale, prologue="norm", eps=EPS,
                                         interpret=True)  # fmt: skip
    x = _f64(h[0])
    x_n = x / np.sqrt(np.mean(x * x) + EPS) * _f64(scale)
    gate_up = x_n @ _f64(w_gate_up)
    assert gate_up_s.ndim == 2 and gate_up_s.dtype == F32
    assert rel_err(jnp.sum(gate_up_s, 0), gate_up) < 1e-6
    y_s = pallas_gpu.gemv_partials(gate_up_s, w_down, prologue="silu", interpret=True)
    gate, up = np.split(gate_up, 2)
    assert rel_err(jnp.sum(y_s, 0), (gate / (1 + np.exp(-gate)) * up) @ _f64(w_down)) < 1e-6


@pytest.mark.parametrize("h_dtype, w_dtype", [(F32, F32), (F32, BF16), (BF16, BF16)])
def test_residual_mlp_by_the_kernels_equals_the_reference(h_dtype, w_dtype):
    # the residual stream (h) in float32 or bf16, the MLP computing in W's dtype
    args = _mlp(128, 96, seed=1, h_dtype=h_dtype, w_dtype=w_dtype)
    options = dict(eps=EPS, dtype=w_dtype)
    got = fused.residual_mlp(*args, impl="pallas", **options)
    want = fused.residual_mlp(*args, impl="xla", **options)
    assert got.dtype == want.dtype == h_dtype and got.shape == want.shape == (1, 128)
    tol = 1e-6 if w_dtype == F32 else 1e-2
    assert rel_err(got.astype(F32), want.astype(F32)) < tol


def _kernel_calls(fn, *args) -> int:
    return len(equations(jax.make_jaxpr(fn)(*args).jaxpr, "pallas_call"))


def test_dispatch_sends_one_row_to_the_kernels():
    h, scale, w_gate_up, w_down = _mlp(64, 48, seed=2)

    def block(impl):
        return lambda h: fused.residual_mlp(h, scale, w_gate_up, w_down, eps=EPS, dtype=F32,
                                            impl=impl)  # fmt: skip

    assert _kernel_calls(block("pallas"), h[None]) == 2  # [1, 1, D]: the two prologue kernels
    assert _kernel_calls(block("pallas"), jnp.concatenate([h, h])) == 2  # 2 rows: plain ones
    for impl in ("xla", "auto"):  # "auto": XLA's ops without a GPU
        assert _kernel_calls(block(impl), h) == 0
    two = jnp.concatenate([h, 2 * h])
    assert rel_err(block("pallas")(two), block("xla")(two)) < 1e-6
    narrow = fused.residual_mlp(
        h[:, :24], scale[:24], w_gate_up[:24], w_down[:, :24], eps=EPS, dtype=F32, impl="pallas"
    )  # fmt: skip  (K = 24: XLA's ops)
    want = fused.reference(h[:, :24], scale[:24], w_gate_up[:24], w_down[:, :24], eps=EPS,
                           dtype=F32)  # fmt: skip
    assert rel_err(narrow, want) < 1e-6


def test_unsupported_prologue_operands_are_named():
    h, scale, w_gate_up, w_down = _mlp(64, 48)
    reason = pallas_gpu.unsupported_reason
    assert reason(h, w_gate_up, prologue="norm") is None
    assert "2 rows (the kernel takes 1 to 1)" in reason(jnp.concatenate([h, h]), w_gate_up,
                                                       prologue="norm")  # fmt: skip
    assert "not float32 partial sums [S, 2K] of W 48 rows" in reason(h, w_down, prologue="silu")
    assert "prologue 'gelu'" in reason(h, w_gate_up, prologue="gelu")
    with pytest.raises(ValueError, match="scale is the norm prologue's weight"):
        pallas_gpu.gemv_partials(h, w_gate_up, scale, interpret=True)


def test_gradients_equal_the_reference():
    h, scale, w_gate_up, w_down = _mlp(64, 48, seed=3)

    def loss(h, s, wg, wd, impl):
        return jnp.sum(jnp.sin(fused.residual_mlp(h, s, wg, wd, eps=EPS, dtype=F32, impl=impl)))

    grads = {i: jax.grad(loss, argnums=(0, 1, 2, 3))(h, scale, w_gate_up, w_down, i)
             for i in ("pallas", "xla")}  # fmt: skip
    for a, b in zip(grads["pallas"], grads["xla"], strict=True):
        assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("prologue", ["norm", "silu"])
def test_prologue_kernels_lower_to_triton_for_a_gpu(prologue):
    # Pallas's Triton lowering runs here, without a GPU (the export for platform "cuda"), at the
    # Qwen2.5-1.5B MLP's shapes: D 1536, F 8960
    d, f = 1536, 8960
    if prologue == "norm":
        args = [jax.ShapeDtypeStruct((1, d), BF16), jax.ShapeDtypeStruct((d, 2 * f), BF16),
                jax.ShapeDtypeStruct((d,), F32)]  # fmt: skip
    else:
        segments = pallas_gpu.GemvConfig().plan(d, 2 * f)[2]
        args = [jax.ShapeDtypeStruct((segments, 2 * f), F32), jax.ShapeDtypeStruct((f, d), BF16)]
    triton = "__gpu$xla.gpu.triton"
    exported = jax.export.export(
        jax.jit(lambda *a: pallas_gpu.gemv_partials(*a, prologue=prologue, eps=EPS)),
        platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton)],
    )(*args)
    assert exported.mlir_module().count(triton) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("h_dtype", [F32, BF16])
def test_compiled_kernels_equal_xla_on_gpu(h_dtype):
    # the Qwen2.5-1.5B MLP in bf16, compiled by Triton, against XLA's ops; "auto" sends the
    # one-row call to the kernels on a GPU
    args = _mlp(1536, 8960, seed=4, h_dtype=h_dtype, w_dtype=BF16)

    def block(impl):
        return jax.jit(lambda *a: fused.residual_mlp(*a, eps=EPS, dtype=BF16, impl=impl))

    assert _kernel_calls(block("auto"), *args) == 2
    got, want = block("auto")(*args), block("xla")(*args)
    assert got.dtype == want.dtype == h_dtype
    assert rel_err(got.astype(F32), want.astype(F32)) < 1e-2
