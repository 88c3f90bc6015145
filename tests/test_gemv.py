"""The few-row dense product (ops/gemv): the Pallas kernel in interpret mode against numpy in
float64 (1 row: the CUDA-core path; 3 and 16 rows: the tensor-core path, 3 padded to 16), its
launch plan, the dispatch of nn.Dense's products, gradients, a model's decoding steps at batch
1 and 2, and the Triton lowering.

Metric: rel = max|a - b| / max|b|. Tolerances:
  float32 operands, kernel vs float64 numpy                          1e-6 (fp32 sums of <= 1536)
  bfloat16 operands, kernel vs float64 numpy on the same bf16 values  1e-2 (the bf16 result)
  gradients, kernel vs XLA (the kernel's backward is XLA's)           1e-6
  model decode logits, pallas vs xla, float32                         2e-5
"""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decode_testing import greedy_steps, pallas_calls
from gdn_testing import rel_err
from tiny_models import tiny_model_config

from taylorcal_jax.models.layers import AttentionRuntime
from taylorcal_jax.models.mixers.gdn import GDNRuntime
from taylorcal_jax.models.student import StudentConfig
from taylorcal_jax.ops.gemv import api, pallas_gpu

F32 = jnp.float32


def _operands(m, k, n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, k)), rng.standard_normal((k, n)) / np.sqrt(k)


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("k, n", [(64, 48), (1536, 160)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_equals_numpy(m, k, n, dtype):
    x, w = _operands(m, k, n)
    x_d, w_d = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
    want = np.asarray(x_d, np.float64) @ np.asarray(w_d, np.float64)
    got = pallas_gpu.gemv_pallas(x_d, w_d, interpret=True)
    assert got.dtype == F32 and got.shape == (m, n)
    assert rel_err(got, want) < 1e-6  # float32 sums of the operands as given
    y = api.dense_product(x_d[:, None], w_d, impl="pallas")
    assert y.dtype == dtype and y.shape == (m, 1, n)
    assert rel_err(y[:, 0].astype(F32), want) < (1e-6 if dtype == F32 else 1e-2)


def test_plan_splits_k_until_there_are_enough_programs():
    config = pallas_gpu.GemvConfig()
    # BK 128 would leave 12 x 12 = 144 programs, under min_programs (264): BK 64, 24 segments
    assert config.plan(1536, 1536) == (128, 64, 24)
    assert config.plan(1536, 8960) == (128, 128, 12)  # 70 x 12 = 840: all 12 loads split
    assert config.plan(8960, 1536) == (128, 128, 70)  # 12 x 70 = 840
    assert pallas_gpu.GemvConfig(programs=280).plan(1536, 8960) == (128, 128, 4)  # 70 x 4
    assert config.plan(64, 48) == (16, 16, 4)  # few programs: the least BK, every load split
    assert pallas_gpu.GemvConfig(programs=1).plan(1536, 1536) == (128, 64, 1)
    assert config.plan(1536, 12) is None and config.plan(24, 64) is None
    # segments of several loads each: the loop inside a program
    small = pallas_gpu.GemvConfig(programs=2, min_programs=1, block_k=32)
    assert small.plan(512, 32) == (32, 32, 2)
    for m in (1, 16):
        x, w = _operands(m, 512, 32, seed=1)
        got = pallas_gpu.gemv_pallas(jnp.asarray(x, F32), jnp.asarray(w, F32), interpret=True,
                                     config=small)  # fmt: skip
        assert rel_err(got, x @ w) < 1e-6
    with pytest.raises(ValueError, match="warps must be >= 1"):
        pallas_gpu.GemvConfig(warps=0)


def _calls(fn, *args) -> int:
    return pallas_calls(jax.make_jaxpr(fn)(*args).jaxpr)


def test_dispatch():
    x1, x16, x17 = jnp.ones((1, 1, 64)), jnp.ones((4, 4, 64)), jnp.ones((17, 1, 64))
    w = jnp.ones((64, 32))
    narrow = jnp.ones((64, 12))
    assert api.resolve_impl("auto", x1[0], w) == "xla"  # no GPU here
    assert api.resolve_impl("pallas") == "pallas"
    pallas = lambda x, w: api.dense_product(x, w, impl="pallas")  # noqa: E731
    assert _calls(pallas, x1, w) == 1
    assert _calls(pallas, x16, w) == 1  # 4 x 4 rows
    assert _calls(pallas, x17, w) == 0  # 17 rows: XLA's dot
    assert _calls(pallas, x1, narrow) == 0  # N = 12: XLA's dot
    with jax.enable_x64(True):
        assert _calls(pallas, x1.astype(jnp.float64), w) == 0
    assert api.max_rows("auto") == 1 and api.max_rows("pallas") == 16  # measured: see api.py
    for impl in ("xla", "auto"):
        assert _calls(lambda x, w, i=impl: api.dense_product(x, w, impl=i), x1, w) == 0
    assert "N must be multiples of 16" in pallas_gpu.unsupported_reason(x1[0], narrow)
    assert "17 rows" in pallas_gpu.unsupported_reason(x17[:, 0], w)
    with pytest.raises(ValueError, match="N must be multiples of 16.*impl='xla'"):
        pallas_gpu.gemv_pallas(x1[0], narrow, interpret=True)
    with pytest.raises(ValueError, match="unknown dense product impl 'cublas'"):
        api.dense_dot_general("cublas")
    assert api.dense_dot_general("pallas") is api.dense_dot_general("pallas")
    with pytest.raises(ValueError, match="gemv_impl must be one of"):
        AttentionRuntime(gemv_impl="fast")
    with pytest.raises(ValueError, match="GDN gemv_impl must be one of"):
        GDNRuntime(gemv_impl="fast")


def test_auto_off_a_gpu_never_loads_the_kernel():
    """'auto' (the models' default) runs as XLA's dot off a GPU without importing the kernel's
    module, and with it Pallas's Triton backend, at every one-row product (a fresh process:
    this file imports pallas_gpu itself)."""
    code = (
        "import sys, jax.numpy as jnp\n"
        "from taylorcal_jax.ops.gemv import api\n"
        "y = api.dense_product(jnp.ones((1, 64)), jnp.ones((64, 32)), impl='auto')\n"
        "assert float(y[0, 0]) == 64.0\n"
        "loaded = ('gemv.pallas_gpu', 'pallas.triton')\n"
        "print(sorted(m for m in sys.modules if m.endswith(loaded)))\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("m", [1, 4])
def test_dense_layer_and_gradients_equal_xla(m):
    x, _ = _operands(m, 64, 32, seed=2)
    x = jnp.asarray(x, F32)
    dense = {
        impl: nn.Dense(32, use_bias=True, dot_general=api.dense_dot_general(impl))
        for impl in ("xla", "pallas")
    }
    params = dense["xla"].init(jax.random.PRNGKey(0), x)
    assert jax.tree.structure(params) == jax.tree.structure(
        dense["pallas"].init(jax.random.PRNGKey(0), x)
    )

    def loss(p, x, impl):
        return jnp.sum(jnp.sin(dense[impl].apply(p, x)))

    outs = {i: dense[i].apply(params, x) for i in dense}
    assert rel_err(outs["pallas"], outs["xla"]) < 1e-6
    grads = {i: jax.grad(loss, argnums=(0, 1))(params, x, i) for i in dense}
    for a, b in zip(jax.tree.leaves(grads["pallas"]), jax.tree.leaves(grads["xla"]), strict=True):
        assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("rows", [1, 2])
def test_model_decode_steps_pallas_equal_xla(rows):
    # a hybrid student at batch 1 and 2 (hidden 64, MLP 96, GDN K = V = 16 with 4 heads): every
    # projection of width >= 16 by the kernel, the GDN gate products (N = 2 x 4 heads) by XLA
    config = tiny_model_config(
        num_hidden_layers=3, hidden_size=64, intermediate_size=96, head_dim=16,
        max_position_embeddings=64,
    )  # fmt: skip
    sc = StudentConfig.from_teacher(config, (0,), mixer="gdn", use_short_conv=True)
    models = {
        impl: sc.model(
            runtime=GDNRuntime(impl="chunked", decode_impl="xla", gemv_impl=impl),
            attention_runtime=AttentionRuntime(decode_impl="xla", gemv_impl=impl),
        )
        for impl in ("xla", "pallas")
    }
    steps = greedy_steps(models, config.vocab_size, rows=rows)
    # attention layer: q, k, v, o; GDN layers (projections joined, the default): q|k|v|g and o
    # each (a|b, 8 wide, by XLA); 3 MLPs of 3 products
    assert steps["pallas"][1] == 4 + 2 * 2 + 3 * 3
    assert steps["xla"][1] == 0
    assert rel_err(steps["pallas"][0], steps["xla"][0]) <= 2e-5


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("k, n", [(1536, 1536), (8960, 1536)])
def test_kernel_lowers_to_triton_for_a_gpu(m, k, n):
    # Pallas's Triton lowering runs here, without a GPU (the export for platform "cuda"): every
    # load, dot, reduction and store passes its checks at the Qwen2.5-1.5B projections' shapes
    args = [jax.ShapeDtypeStruct((m, k), jnp.bfloat16), jax.ShapeDtypeStruct((k, n), jnp.bfloat16)]
    triton = "__gpu$xla.gpu.triton"
    exported = jax.export.export(
        jax.jit(lambda x, w: pallas_gpu.gemv_pallas(x, w)),
        platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton)],
    )(*args)
    assert exported.mlir_module().count(triton) == 1


@pytest.mark.gpu
@pytest.mark.parametrize(
    "m, k, n",
    [(1, 1536, 1536), (16, 1536, 1536), (5, 1536, 8960), (1, 8960, 1536), (16, 8960, 1536)],
)
def test_compiled_kernel_equals_xla_on_gpu(m, k, n):
    # the Qwen2.5-1.5B projections in bf16, compiled by Triton, against fp64 and XLA's dot
    x, w = _operands(m, k, n, seed=3)
    x, w = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    got = jax.jit(lambda x, w: api.dense_product(x, w, impl="pallas"))(x, w)
    # on a GPU "auto" sends the one-row products to the kernel, and only those
    assert _calls(lambda x, w: api.dense_product(x, w, impl="auto"), x, w) == int(m == 1)
    assert _calls(lambda x, w: api.dense_product(x, w, impl="pallas"), x, w) == 1
    assert rel_err(got.astype(F32), want) < 1e-2
    assert rel_err(got, x @ w) < 1e-2
