"""Stopping a run on Ctrl-C or SIGTERM (a scheduler's preemption, `timeout`, `kill`) without
losing the training done so far.

Python raises KeyboardInterrupt wherever the main thread is when a signal arrives. In a
training loop that is most often inside a donated jitted call (on a CPU the call runs in the
calling thread), whose input state is gone and whose output is not yet bound: nothing is left
to save. So the command line routes both signals here (`install`):

- inside `deferred()` (the training loop) a signal only records the request (and says so);
  the loop asks `requested()` after each call's hooks, where its state is whole, and stops
  there (it saves that step and raises KeyboardInterrupt itself);
- elsewhere, or on a second signal (to stop a loop that does not come back), it raises
  KeyboardInterrupt at once, as Python's default Ctrl-C does.

With several processes, jax.distributed's preemption service takes SIGTERM from the start of
the run and agrees across processes on the call at which all of them stop
(`multihost_utils.reached_preemption_sync_point`, asked once per `requested()`, which every
process calls equally often). Ctrl-C there stops each process at once, without the loop's
save (a collective that processes stopped elsewhere would never join): the run resumes from
its last periodic checkpoint. The loop saves on `Stop`, raised where every process stops.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_received: list[int] = []  # the signals received, in order
_deferring = 0  # depth of code that polls requested() (one process only)
_polls = 0  # requested() calls: the step ids of the multi-process preemption sync


class Stop(KeyboardInterrupt):
    """Raised by the training loop where `requested()` said to stop (on every process)."""


def one_process() -> bool:
    import jax  # noqa: PLC0415

    return jax.process_count() == 1


def install() -> None:
    """Routes SIGINT and SIGTERM here for the rest of the process (the command line's)."""
    for signum in SIGNALS:
        signal.signal(signum, _handler)


def _handler(signum, frame) -> None:
    del frame
    _received.append(signum)
    if not _deferring or len(_received) > 1:
        raise KeyboardInterrupt
    print(
        f"\n{signal.Signals(signum).name}: stopping after the current training call, with its "
        "step saved (again to stop at once)",
        file=sys.stderr,
        flush=True,
    )


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block that polls `requested()` at points where it can stop cleanly (with several
    processes a signal still stops each at once: see the module docstring)."""
    global _deferring
    alone = one_process()
    _deferring += alone
    try:
        yield
    finally:
        _deferring -= alone


def requested() -> bool:
    """Whether to stop here: a signal was received (one process), or every process has
    reached the call at which a preemption notice tells them all to stop (several)."""
    global _polls
    if one_process():
        return bool(_received)
    from jax.experimental import multihost_utils  # noqa: PLC0415

    _polls += 1
    try:
        reached = multihost_utils.reached_preemption_sync_point(_polls)
    except (RuntimeError, ValueError):  # jax.distributed not started, or without that service
        return False
    if reached and not _received:
        _received.append(signal.SIGTERM)  # the exit status of a preempted run
    return reached


def exit_status() -> int:
    """128 + the first signal received (130 for Ctrl-C, 143 for SIGTERM); 130 if none was
    (a KeyboardInterrupt raised by other means)."""
    return 128 + (_received[0] if _received else signal.SIGINT)


def reset() -> None:
    """Forgets the signals received (tests)."""
    _received.clear()
