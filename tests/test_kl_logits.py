"""KL(p || q) and its gradient from two rows of logits (ops/kl_logits): the Pallas kernel in
interpret mode and XLA's form against float64 NumPy, the dispatch, the distillation loss
(train/kl.kl_sum) by either, the Triton lowering at SmolLM2's shape.

Metric: rel = max|a - b| / max|b|. Tolerances: float32 against float64, 1e-5 (sums of 192-1024
float32 terms); G rounded to bf16 by both, 1e-2 (2^-8); kernel against XLA's form through
kl_sum, value and gradients, 1e-5.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gdn_testing import rel_err

from taylorcal_jax.ops.kl_logits import api, pallas_gpu
from taylorcal_jax.train import kl


def _logits(seed, n, v, scale=4.0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 2)
    z_t, z_s = (scale * jax.random.normal(k, (n, v)) for k in keys)
    valid = jnp.arange(n) % 5 != 3  # some rows are padding
    return z_t, z_s, valid


def _float64(z_t, z_s, valid):
    def log_softmax(z):
        z = np.asarray(z, np.float64)
        top = z.max(-1, keepdims=True)
        return z - top - np.log(np.exp(z - top).sum(-1, keepdims=True))

    logp, logq = log_softmax(z_t), log_softmax(z_s)
    m = np.asarray(valid, np.float64)
    total = (m * (np.exp(logp) * (logp - logq)).sum(-1)).sum()
    return total, m[:, None] * (np.exp(logq) - np.exp(logp))


@pytest.mark.parametrize(("n", "v"), [(12, 192), (16, 1024 * 3)], ids=["3_loads_of_64", "1024"])
def test_kernel_and_xla_form_equal_float64(n, v):
    # 12 rows: 3 programs of 4; 3 x 1024 columns: loads of the largest block
    args = _logits(0, n, v)
    want_total, want_g = _float64(*args)
    for fn in (api.kl_and_grad_xla, pallas_gpu.kl_and_grad_pallas):
        total, g = fn(*args, jnp.float32)
        assert g.dtype == jnp.float32 and g.shape == (n, v)
        assert abs(float(total) - want_total) < 1e-5 * abs(want_total)
        assert rel_err(g, want_g) < 1e-5
        np.testing.assert_array_equal(np.asarray(g)[3], 0.0)  # a padding row
    total, g = pallas_gpu.kl_and_grad_pallas(*args, jnp.bfloat16)
    assert g.dtype == jnp.bfloat16 and rel_err(g.astype(jnp.float32), want_g) < 1e-2


def test_dispatch_and_refusals():
    z = jnp.zeros((4, 100))
    assert api.resolve_gpu_kernel("KL from logits", "auto", api.logger) == "xla"  # no GPU here
    assert "V=100 must be a multiple of 64" in pallas_gpu.unsupported_reason(z)
    assert pallas_gpu.unsupported_reason(jnp.zeros((4, 49152))) is None
    with pytest.raises(ValueError, match="V=100 must be a multiple of 64") as e:
        api.kl_and_grad(z, z, jnp.ones(4, bool), jnp.float32, impl="pallas")
    assert "\n" not in str(e.value) and "impl='xla'" in str(e.value)
    with pytest.raises(ValueError, match="unknown KL from logits impl 'triton'"):
        api.kl_and_grad(z, z, jnp.ones(4, bool), jnp.float32, impl="triton")


def test_distillation_loss_and_gradients_equal_by_either_impl():
    # kl_sum over 2 chunks of [2, 8] positions, a padded tail, heads [16, 128]
    keys = jax.random.split(jax.random.PRNGKey(3), 4)
    h_t, h_s = (jax.random.normal(k, (2, 12, 16)) for k in keys[:2])
    w_t, w_s = (jax.random.normal(k, (16, 128)) for k in keys[2:])
    valid = jnp.arange(12)[None, :] < jnp.array([[12], [9]])

    def loss(impl):
        fn = lambda h, w: kl.kl_sum(h_t, w_t, h, w, valid, chunk=8, impl=impl)[0]  # noqa: E731
        return jax.value_and_grad(fn, argnums=(0, 1))(h_s, w_s)

    (value, grads), (want, want_grads) = loss("pallas"), loss("xla")
    assert abs(float(value) - float(want)) < 1e-5 * abs(float(want))
    for g, w in zip(grads, want_grads, strict=True):
        assert rel_err(g, w) < 1e-5


def test_kernel_lowers_to_triton_for_a_gpu():
    # SmolLM2's stage-2 chunk, 8 x 2048 rows of 49,152 logits, G in bf16; the Triton IR is
    # compiled on a GPU only
    triton = "__gpu$xla.gpu.triton"
    z = jax.ShapeDtypeStruct((8 * 2048, 49152), jnp.float32)
    valid = jax.ShapeDtypeStruct((8 * 2048,), bool)
    fn = jax.jit(lambda a, b, m: pallas_gpu.kl_and_grad_pallas(a, b, m, jnp.bfloat16,
                                                               interpret=False))  # fmt: skip
    skip = [jax.export.DisabledSafetyCheck.custom_call(triton)]
    module = jax.export.export(fn, platforms=["cuda"], disabled_checks=skip)(z, z, valid)
    assert module.mlir_module().count(triton) == 1


@pytest.mark.gpu
def test_compiled_kernel_equals_xla_on_gpu():
    # 4 x 2048 rows of SmolLM2's 49,152 logits, G in bf16: both round the same float32 G
    args = _logits(5, 4 * 2048, 49152, scale=6.0)
    total, g = jax.jit(lambda *a: pallas_gpu.kl_and_grad_pallas(*a, jnp.bfloat16))(*args)
    want_total, want_g = jax.jit(lambda *a: api.kl_and_grad_xla(*a, jnp.bfloat16))(*args)
    assert abs(float(total) - float(want_total)) < 1e-4 * abs(float(want_total))
    assert rel_err(g.astype(jnp.float32), want_g.astype(jnp.float32)) < 1e-2
