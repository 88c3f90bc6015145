"""Stopping a run on Ctrl-C or SIGTERM (a scheduler's preemption, `timeout`, `kill`) without
losing the training done so far.

Python raises KeyboardInterrupt wherever the main thread is when a signal arrives. In a
training loop that is most often inside a donated jitted call (on a CPU the call runs in the
calling thread), whose input state is gone and whose output is not yet bound: nothing is left
to save. So the command line routes both signals here (`install`):

- inside `deferred()` (the training loop) a signal only records the request; the loop asks
  `requested()` after each call's hooks, where its state is whole, and stops there (it saves
  that step and raises KeyboardInterrupt itself);
- elsewhere, or on a second signal (to stop a loop that does not come back), it raises
  KeyboardInterrupt at once, as Python's default Ctrl-C does.

`requested()` agrees across processes (any process's request stops all at the same call), so
the collective save of a multi-process run is reached by every process.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_received: list[int] = []  # the signals received, in order
_deferring = 0  # depth of code that polls requested()


def install() -> None:
    """Routes SIGINT and SIGTERM here for the rest of the process (the command line's)."""
    for signum in SIGNALS:
        signal.signal(signum, _handler)


def _handler(signum, frame) -> None:
    del frame
    _received.append(signum)
    if not _deferring or len(_received) > 1:
        raise KeyboardInterrupt


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block that polls `requested()` at points where it can stop cleanly."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1


def requested() -> bool:
    """Whether a stop was asked for, in this process or (a collective) in any other."""
    import jax  # noqa: PLC0415

    here = bool(_received)
    if jax.process_count() == 1:
        return here
    from jax.experimental import multihost_utils  # noqa: PLC0415

    return bool(multihost_utils.process_allgather(here).any())


def exit_status() -> int:
    """128 + the first signal received (130 for Ctrl-C, 143 for SIGTERM); 130 if none was
    (a KeyboardInterrupt raised by other means)."""
    return 128 + (_received[0] if _received else signal.SIGINT)


def reset() -> None:
    """Forgets the signals received (tests)."""
    _received.clear()
