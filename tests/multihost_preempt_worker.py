"""One process of the two-process preemption test (tests/test_multihost.py): both poll
`interrupts.requested()` once per "call" as the training loop does; process 0 sends itself
SIGTERM at call 5. Each process writes {"stopped": the call at which requested() turned
true, "status": interrupts.exit_status()} as JSON to <argv[1]>.<process index>.

Run through launch/multihost.py (which sets the JAX_* variables).
"""

import json
import os
import signal
import sys
import time

import jax

from taylorcal_jax.utils import hosts, interrupts

if __name__ == "__main__":
    interrupts.install()  # as the command line does, before jax.distributed starts
    hosts.initialize(True)
    stopped = None
    with interrupts.deferred():
        for call in range(1, 400):
            if call == 5 and jax.process_index() == 0:
                os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.02)  # a call's work
            if interrupts.requested():
                stopped = call
                break
    with open(f"{sys.argv[1]}.{jax.process_index()}", "w") as f:
        json.dump({"stopped": stopped, "status": interrupts.exit_status()}, f)
