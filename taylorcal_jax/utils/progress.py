"""Progress bars (tqdm) for long loops; one global switch.

`main` decides once (config.progress) and calls `set_enabled`; library code just wraps
its loops in `progress(...)`. With several processes only process 0 shows bars.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from tqdm.auto import tqdm

from taylorcal_jax.utils import hosts

T = TypeVar("T")
_ENABLED = True


def set_enabled(enabled: bool) -> None:
    global _ENABLED
    _ENABLED = bool(enabled)


def progress(iterable: Iterable[T] | None = None, **kwargs) -> Iterable[T]:
    """tqdm over `iterable` (or a manual bar when None); off when disabled globally."""
    kwargs.setdefault("disable", not _ENABLED or not hosts.is_main())
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
