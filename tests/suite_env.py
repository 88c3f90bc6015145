"""The environment that processes started by the tests inherit from the suite."""

import os


def suite_xla_flags(extra: str = "") -> str:
    """XLA_FLAGS for a process a test starts: the suite's compile flags (conftest.py sets them
    in TAYLORCAL_TEST_XLA_FLAGS), without the 8 simulated devices of the test process, and
    `extra`."""
    return f"{os.environ['TAYLORCAL_TEST_XLA_FLAGS']} {extra}".strip()
