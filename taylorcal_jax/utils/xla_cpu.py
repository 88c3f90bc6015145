"""A workaround for XLA:CPU in jaxlib 0.10.x, applied by the entry points before JAX starts.

jaxlib 0.10's XLA:CPU groups chains of matmuls and elementwise ops into YNNPACK fusions
("__ynn_fusion" in the compiled HLO). For a one-layer model with an 8192-token vocabulary, the
fusion that ends in the LM head made a forward over 8192 tokens take 21.5 s instead of 0.49 s
(2 CPU cores, `python launch/probe_xla_cpu_ynn.py`; 4096 tokens: 0.27 s either way), so every
CPU evaluation or prefill past a few thousand tokens fell off a cliff. The flag

    --xla_cpu_experimental_ynn_fusion_type=        (empty list: no YNN fusions)

removes it; pretraining the tiny config ran at the same speed with it (3.97 vs 3.81 steps/s).

XLA reads XLA_FLAGS when the first backend starts, and aborts on a flag it does not know, so
this only touches jaxlib 0.10.*, the release where the cliff was measured and the flag exists,
and leaves any ynn setting the user already put in XLA_FLAGS alone.
"""

from __future__ import annotations

import importlib.metadata
import os

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type="


def _jaxlib_version() -> str | None:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return None


def disable_ynn_fusion(environ=None, jaxlib_version: str | None = None) -> bool:
    """Appends YNN_FLAG to environ["XLA_FLAGS"] on jaxlib 0.10.*; returns whether it did.

    Call before JAX initialises a backend (before the first array or jax.devices()).
    """
    environ = os.environ if environ is None else environ
    version = _jaxlib_version() if jaxlib_version is None else jaxlib_version
    if version is None or not version.startswith("0.10."):
        return False
    flags = environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags:
        return False
    environ["XLA_FLAGS"] = f"{flags} {YNN_FLAG}".strip()
    return True
