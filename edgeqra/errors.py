"""Errors a user can fix. Each message names the bad value and says how to fix it.

The CLI turns any :class:`EdgeQRAError` into one red line and exit code 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = [
    "BudgetError",
    "ConfigError",
    "DataError",
    "EdgeQRAError",
    "ModelError",
    "ProfileError",
]


class EdgeQRAError(Exception):
    """A problem in the user's input: the message names the value and the fix."""


class ProfileError(EdgeQRAError):
    """A device profile is unknown, malformed or inconsistent."""


class ModelError(EdgeQRAError):
    """A model cannot be found, loaded or understood."""


class DataError(EdgeQRAError):
    """A data source is unknown, missing or empty."""


class ConfigError(EdgeQRAError):
    """A per-unit (bits, rank) configuration is malformed or does not match the model."""


class BudgetError(EdgeQRAError):
    """Nothing fits the memory budget; the message states the minimum needed."""
