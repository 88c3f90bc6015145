"""The one exception type of the data pipeline for problems a user can fix."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data or data settings; the message is one line that ends with what to do."""
