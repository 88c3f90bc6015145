"""The static options of one Pallas gated-delta-rule call, as the GPU and TPU kernels take them."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from taylorcal_jax.ops.gdn.pallas_gpu.config import GDNPallasConfig
    from taylorcal_jax.ops.gdn.pallas_tpu.config import TPUConfig


@dataclasses.dataclass(frozen=True)
class Static:
    """The static options of one call (a nondiff argument of the custom_vjp): chunk length C,
    output scale s, whether q and k are L2-normalised, interpret mode, the kernel package's
    launch configuration and what the forward under differentiation keeps."""

    chunk: int
    scale: float
    use_l2: bool
    interpret: bool
    cfg: GDNPallasConfig | TPUConfig
    residuals: str  # the package's config.RESIDUALS entry, resolved from "auto"


def call_options(*, chunk_size, kdim, scale, use_qk_l2norm, interpret, config, residuals) -> Static:
    """Static of an entry's arguments: s = scale, or K^-1/2 when scale is None; config and
    residuals already resolved by the kernel package."""
    return Static(
        chunk=chunk_size,
        scale=float(kdim**-0.5 if scale is None else scale),
        use_l2=bool(use_qk_l2norm),
        interpret=bool(interpret),
        cfg=config,
        residuals=residuals,
    )
