"""The one exception type of the data pipeline for problems a user can fix."""

from __future__ import annotations

from taylorcal_jax.errors import UserError


class DataError(UserError, ValueError):
    """Bad input data or data settings; the message is one line that ends with what to do."""
