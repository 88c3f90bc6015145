"""One process of tests/test_multihost.py's test of hosts.main_value and hosts.main_first: each
process writes what it saw as JSON to <argv[1]>.<process index>.

Run through launch/multihost.py (which sets the JAX_* variables).
"""

import json
import os
import sys
import time

import jax

from taylorcal_jax.errors import UserError
from taylorcal_jax.utils import hosts


def build_or_read(marker: str) -> str:
    """Process 0 builds (slowly); the others find what it built, if it ran first."""
    if hosts.is_main():
        time.sleep(1.0)
        with open(marker, "w") as f:
            f.write("built")
        return "built"
    return "read" if os.path.exists(marker) else "not built yet"


def fail_on_main():
    if hosts.is_main():
        raise UserError("no text in the source", "give it some")
    return "built"


def main(out: str) -> None:
    hosts.initialize(True)
    seen = {"value": hosts.main_value(lambda: {"made by": jax.process_index()}, "value")}
    seen["first"] = hosts.main_first(lambda: build_or_read(f"{out}.marker"), "first")
    try:
        hosts.main_first(fail_on_main, "corpus")
    except UserError as e:
        seen["error"], seen["hint"] = e.message, e.hint
    with open(f"{out}.{jax.process_index()}", "w") as f:
        json.dump(seen, f)


if __name__ == "__main__":
    main(sys.argv[1])
