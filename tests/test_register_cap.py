"""Register caps of the Pallas Triton kernels (register_cap.py, config.max_registers).

No GPU is needed: the forward and backward are lowered for the CUDA platform through jax.export,
which runs Pallas' Triton lowering; the Triton module of each kernel is read there.
"""

import jax
import jax.numpy as jnp
import pytest

from taylorcal_jax.ops.gdn import register_cap
from taylorcal_jax.ops.gdn.config import BF16_DEFAULT, GDNPallasConfig
from taylorcal_jax.ops.gdn.pallas_gpu import gated_delta_rule_pallas


def test_kernel_name_carries_the_cap_and_cap_of_reads_it_back():
    caps = (("gdn_bwd_qk", 128), ("gdn_chunk", 168))
    assert register_cap.kernel_name("gdn_bwd_qk", caps) == "gdn_bwd_qk_nreg128"
    assert register_cap.kernel_name("gdn_out", caps) == "gdn_out"
    assert register_cap.cap_of("gdn_chunk_nreg168") == 168
    assert register_cap.cap_of("gdn_chunk") is None


def _triton_modules(config, monkeypatch):
    """{kernel name: Triton module text} of fwd + bwd lowered for CUDA (bf16, 1 x 128 x 2 x 64)."""
    from jax import export
    from jax._src.pallas.triton import lowering

    if not register_cap.install():
        pytest.fail("Pallas' Triton lowering has no lower_jaxpr_to_triton_module to wrap")
    seen = {}
    capped = lowering.lower_jaxpr_to_triton_module

    def record(*args, **kwargs):
        result = capped(*args, **kwargs)
        text = result.module.operation.get_asm(enable_debug_info=False)
        name = next(ln for ln in text.splitlines() if "tt.func" in ln).split("@")[1].split("(")[0]
        seen[name] = text
        return result

    monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", record)

    def loss(q, k, v, g, b):
        o = gated_delta_rule_pallas(q, k, v, g, b, interpret=False, config=config)[0]
        return jnp.sum(o.astype(jnp.float32))

    sds = jax.ShapeDtypeStruct
    x = sds((1, 128, 2, 64), jnp.bfloat16)
    export.export(
        jax.jit(jax.grad(loss, argnums=range(5))),
        platforms=("cuda",),
        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(x, x, x, sds((1, 128, 2), jnp.float32), sds((1, 128, 2), jnp.bfloat16))
    return seen


def test_capped_kernels_get_ttg_maxnreg_and_the_others_none(monkeypatch):
    caps = (("gdn_bwd_qk", 128), ("gdn_chunk", 168))
    config = GDNPallasConfig(**{**BF16_DEFAULT.__dict__, "max_registers": caps})
    modules = _triton_modules(config, monkeypatch)
    assert "gdn_bwd_qk_nreg128" in modules and "gdn_chunk_nreg168" in modules
    assert "ttg.maxnreg = 128 : i32" in modules["gdn_bwd_qk_nreg128"]
    assert "ttg.maxnreg = 168 : i32" in modules["gdn_chunk_nreg168"]
    others = [n for n in modules if register_cap.cap_of(n) is None]
    assert {"gdn_bwd_wy", "gdn_out", "gdn_bwd_prep"} <= set(others)
    assert not any("ttg.maxnreg" in modules[n] for n in others)
