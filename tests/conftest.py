"""Test setup: 8 simulated CPU devices and the tests' compile flags (both must be set before JAX
initialises its backends), launch/ on sys.path so that tests import its scripts as modules
(`import plot_gdn_kernel`), and one persistent compilation cache for the whole test run."""

import atexit
import gc
import os
import shutil
import sys
import tempfile

LAUNCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch")
sys.path.insert(0, LAUNCH_DIR)


# The suite is bound by XLA:CPU compiling many small programs, most of whose time is LLVM
# optimising the generated machine code, which at test sizes buys nothing back; level 0 took a
# quarter off test_gdn_pallas.py and test_distill.py on 2 cores. XLA's own HLO passes stay as
# they are. Values may differ from level 3 by rounding (a tiny model's loss and gradients: up
# to 2e-6 of the largest entry), far inside every tolerance here; tests that compare runs bit
# for bit run both under these flags. Tests that start processes with XLA_FLAGS of their own
# pass them on. Where a GPU or TPU plugin of JAX is installed the flag would also reach that
# backend's code generation, which the gpu and tpu tests check as users compile it: none then,
# unless JAX_PLATFORMS=cpu keeps the run off that backend.
def _accelerator_backend_possible() -> bool:
    import importlib.metadata
    import importlib.util

    if os.environ.get("JAX_PLATFORMS", "").strip() == "cpu":
        return False
    return bool(importlib.metadata.entry_points(group="jax_plugins")) or (
        importlib.util.find_spec("jax_plugins") is not None
    )


TEST_XLA_FLAGS = os.environ.setdefault(
    "TAYLORCAL_TEST_XLA_FLAGS",
    "" if _accelerator_backend_possible() else "--xla_backend_optimization_level=0",
)
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# One persistent compilation cache for the test run, shared through the environment by the
# pytest-xdist workers (spawned after this module is imported in the controller) and by every
# `python -m taylorcal_jax.main` subprocess: the command-line tests compile the same smoke
# pipeline many times (a reference run, a killed run and its rerun), and the module-level
# `jax.clear_caches()` below would otherwise make later modules compile again. A truncated
# entry (a subprocess killed while writing one) is read as an error, warned about, and
# compiled again by JAX. A cache directory given by the caller is used and kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="taylorcal_jax_test_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    _owner = os.getpid()
    # Removed by the process that made it (the controller, or the single pytest process).
    atexit.register(lambda: os.getpid() == _owner and shutil.rmtree(_cache_dir, True))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Skips gpu/tpu-marked tests when that backend is absent (and says why)."""
    backend = jax.default_backend()
    for item in items:
        for mark, name in (("gpu", "gpu"), ("tpu", "tpu")):
            # The marker itself, not item.keywords (which also holds the names of the
            # directories above the test, e.g. a checkout named "tpu").
            if item.get_closest_marker(mark) is not None and backend != name:
                item.add_marker(pytest.mark.skip(reason=f"needs a {name.upper()} backend"))


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
    """Drops every compiled program after each test module. The suite runs in one process;
    holding every module's executables, it came near the 24 GB of the 2-core CI machine and
    XLA's JIT failed to map code in the last modules ("Failed to materialize symbols")."""
    yield
    jax.clear_caches()
    gc.collect()
