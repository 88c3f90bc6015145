"""Registers, spill stack and shared memory of the Pallas GDN kernels for sm_90, with no GPU.

Lowers forward + backward for the CUDA platform through jax.export (no device needed), captures
each pallas_call's Triton IR (a hook on JAX's Pallas->Triton lowering, a private API: this is a
developer tool, pinned to what JAX 0.10/0.11 do), compiles it with the locally installed `triton`
package for compute capability 9.0 and prints what cuobjdump reports. The local Triton is not
the one bundled in jaxlib, so figures are indicative; they agreed with the H100's behaviour on
shared memory (fp32 at 2 stages overflowing; the reverse kernel's one program per SM).

Usage: python launch/gdn_kernel_resources.py [--path bfloat16|float32] [--config '{"warps": 8}']
  [--stages 1] [--shape 1,32768,16,128] [--forward-only]  (--config: fields of the path's
  configuration, BF16Config or F32Config; inputs in the path's dtype. Kernels are named once: the
  first lowering of a name is reported, so the forward's gdn_states stands for the backward's
  rerun, which runs at stages_bwd; --forward-only lowers the primal forward alone)
Letters: B batch, T time, H heads, K key dim (= V here).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import tempfile


def dump_ttir(
    cfg_fields: dict,
    out_dir: str,
    shape=(8, 4096, 16, 128),
    forward_only=False,
    path="bfloat16",
) -> dict[str, dict]:
    """{kernel name: {"path": ttir file, "num_warps": int, "num_stages": int}}."""
    import jax
    import jax.numpy as jnp
    from jax import export
    from jax._src.pallas.triton import pallas_call_registration as reg

    from taylorcal_jax.ops.gdn.pallas_gpu.config import BF16Config, F32Config
    from taylorcal_jax.ops.gdn.pallas_gpu.op import gated_delta_rule_pallas

    found = {}
    orig = reg.lowering.lower_jaxpr_to_triton_module

    def hook(*a, **kw):
        res = orig(*a, **kw)
        text = res.module.operation.get_asm(enable_debug_info=False)
        name = next(ln for ln in text.splitlines() if "tt.func" in ln).split("@")[1].split("(")[0]
        path = os.path.join(out_dir, f"{name}.ttir")
        with open(path, "w") as f:
            f.write(text)
        # the launch options as the caller (pallas_call_lowering) resolved them
        caller = inspect.currentframe().f_back.f_locals
        found.setdefault(
            name,
            {"path": path, "num_warps": caller["num_warps"], "num_stages": caller["num_stages"]},
        )
        return res

    cfg = (BF16Config if path == "bfloat16" else F32Config)(**cfg_fields)
    dtype = jnp.bfloat16 if path == "bfloat16" else jnp.float32

    def loss(q, k, v, g, b):
        o = gated_delta_rule_pallas(q, k, v, g, b, interpret=False, config=cfg)[0]
        return jnp.sum(o.astype(jnp.float32))

    b, t, h, d = shape
    sds = jax.ShapeDtypeStruct
    args = [sds((b, t, h, d), dtype)] * 3 + [sds((b, t, h), jnp.float32), sds((b, t, h), dtype)]
    reg.lowering.lower_jaxpr_to_triton_module = hook
    try:
        export.export(
            jax.jit(loss if forward_only else jax.grad(loss, argnums=range(5))),
            platforms=("cuda",),
            disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
        )(*args)
    finally:
        reg.lowering.lower_jaxpr_to_triton_module = orig
    return found


def compile_report(info: dict, stages_override: int | None = None, maxnreg: int | None = None):
    """One line: warps, stages, shared memory and cuobjdump's resource usage of one kernel.
    maxnreg: cap on registers per thread (Triton's option; Pallas' Triton lowering has no way to
    set it, so this only shows what a cap would cost in spills)."""
    import triton
    from triton.backends.compiler import GPUTarget

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    stages = stages_override or info["num_stages"]
    kernel = triton.compile(
        info["path"],
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": info["num_warps"], "num_stages": stages}
        | ({"maxnreg": maxnreg} if maxnreg else {}),
    )
    cubin = info["path"] + ".cubin"
    with open(cubin, "wb") as f:
        f.write(kernel.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    usage = subprocess.run(
        [tool, "--dump-resource-usage", cubin], capture_output=True, text=True
    ).stdout
    regs = next((ln.strip() for ln in usage.splitlines() if "REG:" in ln), usage.strip())
    return f"warps {info['num_warps']} stages {stages} shared {kernel.metadata.shared} B | {regs}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--path", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--config", default="{}", help="fields of the path's configuration, JSON")
    ap.add_argument("--stages", type=int, default=None, help="override num_stages for all")
    ap.add_argument("--shape", default="8,4096,16,128", help="B,T,H,D")
    ap.add_argument("--maxnreg", type=int, default=None, help="cap registers per thread")
    ap.add_argument(
        "--forward-only", action="store_true", help="the primal forward alone (no backward)"
    )
    a = ap.parse_args()
    shape = tuple(int(x) for x in a.shape.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        for name, info in sorted(
            dump_ttir(json.loads(a.config), tmp, shape, a.forward_only, a.path).items()
        ):
            try:
                print(f"{name:>14}: {compile_report(info, a.stages, a.maxnreg)}", flush=True)
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"{name:>14}: compile failed: {type(e).__name__}: {str(e)[:300]}")


if __name__ == "__main__":
    main()
