"""What the ops' dispatchers share: which backends count as GPUs, the log line of an "auto"
choice, written once per (op, backend, choice) in the logger of the dispatching module, and the
rule of the ops whose only kernel is a GPU one (`resolve_gpu_kernel`)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import jax

GPU_BACKENDS = ("gpu", "cuda", "rocm")
TPU_BACKEND = "tpu"
# implementations of an op with XLA's form and one GPU kernel (resolve_gpu_kernel)
KERNEL_IMPLS = ("auto", "xla", "pallas")
_logged: set[tuple[str, str, str]] = set()


def log_choice_once(
    logger: logging.Logger, op: str, backend: str, choice: str, why: str, stacklevel: int = 2
) -> str:
    """Logs "<op> impl='auto' -> '<choice>' on backend '<backend>' (<why>)" at INFO the first
    time this (op, backend, choice) is chosen; returns `choice`. `stacklevel` 2 names the
    caller's module and line in the record, not this one's."""
    if (op, backend, choice) not in _logged:
        _logged.add((op, backend, choice))
        logger.info(
            "%s impl='auto' -> %r on backend %r (%s)",
            op,
            choice,
            backend,
            why,
            stacklevel=stacklevel,
        )
    return choice


def resolve_gpu_kernel(
    op: str, impl: str, logger: logging.Logger, unsupported: Callable[[], str] | None = None
) -> str:
    """ "xla" or "pallas": what `impl` (one of KERNEL_IMPLS) of `op` runs as here. "auto" is
    "pallas" on a GPU backend unless `unsupported()` (called there only, so that the kernel's
    module is imported only on a GPU) names why the kernel cannot take the inputs, else "xla";
    the choice is logged once in `logger`, naming the dispatcher that called this."""
    if impl not in KERNEL_IMPLS:
        raise ValueError(f"unknown {op} impl {impl!r}; valid: {', '.join(KERNEL_IMPLS)}")
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    if backend not in GPU_BACKENDS:
        return log_choice_once(logger, op, backend, "xla", "no GPU backend", stacklevel=3)
    reason = unsupported() if unsupported is not None else ""
    if reason:
        why = f"the Pallas kernel does not take these: {reason}"
        return log_choice_once(logger, op, backend, "xla", why, stacklevel=3)
    return log_choice_once(logger, op, backend, "pallas", f"{backend} backend", stacklevel=3)
