"""Per-kernel register caps for Pallas' Triton kernels (Triton's `maxnreg`), chosen by kernel name.

Why: ptxas gives a Triton kernel as many registers per thread as its launch bound allows (up to
255). A kernel that takes 251 registers at 8 warps fits one program per SM (65536 registers /
(251 x 256 threads)); capped at 128 it fits two, at the price of some spilling to local memory.
Triton has the option (`maxnreg`, lowered from the module attribute `ttg.maxnreg` to PTX's
`.maxnreg`), but Pallas' `CompilerParams` for Triton only carries num_warps and num_stages.

How: a pallas_call whose name ends in `_nreg<N>` (see `kernel_name`) has the attribute
`ttg.maxnreg = N` set on the Triton module that Pallas lowers it to, before it is serialised for
compilation (by XLA's Triton pipeline on jaxlib <= 0.10.2, by jaxlib's Triton compile after). This
wraps `jax._src.pallas.triton.lowering.lower_jaxpr_to_triton_module`, a private function: if it is
missing, `install` returns False and the kernels run uncapped (same results, other speed), which
`launch/gdn_kernel_resources.py` and the tests report.
"""

from __future__ import annotations

import functools
import re

_SUFFIX = re.compile(r"_nreg(\d+)$")
_INSTALLED = []  # [True] once the lowering is wrapped (idempotent install)


def kernel_name(base: str, caps: tuple[tuple[str, int], ...]) -> str:
    """`base`, with `_nreg<N>` appended when caps (pairs (kernel name, N)) name it."""
    cap = dict(caps).get(base)
    return f"{base}_nreg{int(cap)}" if cap else base


def cap_of(func_name: str) -> int | None:
    """The register cap a kernel's (sanitised) name asks for, or None."""
    m = _SUFFIX.search(func_name)
    return int(m.group(1)) if m else None


def _func_name(module) -> str | None:
    for op in module.body.operations:
        if op.operation.name == "tt.func":
            return op.attributes["sym_name"].value
    return None


def _set_cap(module) -> None:
    from jax._src.lib.mlir import ir

    name = _func_name(module)
    cap = cap_of(name) if name else None
    if cap is not None:
        with module.context:
            module.operation.attributes["ttg.maxnreg"] = ir.IntegerAttr.get(
                ir.IntegerType.get_signless(32), cap
            )


def install() -> bool:
    """Wrap Pallas' Triton lowering so that `_nreg<N>` kernels get `ttg.maxnreg = N`; True when
    the wrap is in place (JAX versions whose Pallas Triton lowering has the hooked function)."""
    if _INSTALLED:
        return True
    try:
        from jax._src.pallas.triton import lowering
    except ImportError:
        return False
    orig = getattr(lowering, "lower_jaxpr_to_triton_module", None)
    if orig is None:
        return False

    @functools.wraps(orig)
    def lower_with_cap(*args, **kwargs):
        result = orig(*args, **kwargs)
        _set_cap(result.module)
        return result

    lowering.lower_jaxpr_to_triton_module = lower_with_cap
    _INSTALLED.append(True)
    return True
