"""What the ops' dispatchers share: which backends count as GPUs, and the log line of an "auto"
choice, written once per (op, backend, choice) in the logger of the dispatching module."""

from __future__ import annotations

import logging

GPU_BACKENDS = ("gpu", "cuda", "rocm")
TPU_BACKEND = "tpu"
_logged: set[tuple[str, str, str]] = set()


def log_choice_once(logger: logging.Logger, op: str, backend: str, choice: str, why: str) -> str:
    """Logs "<op> impl='auto' -> '<choice>' on backend '<backend>' (<why>)" at INFO the first
    time this (op, backend, choice) is chosen; returns `choice`."""
    if (op, backend, choice) not in _logged:
        _logged.add((op, backend, choice))
        # stacklevel 2: the record names the dispatcher's module and line, not this one's
        logger.info(
            "%s impl='auto' -> %r on backend %r (%s)", op, choice, backend, why, stacklevel=2
        )
    return choice
