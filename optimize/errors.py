"""One error hierarchy for edgeopt.

Library code raises these; ``cli.py`` catches :class:`EdgeoptError` once, prints its message on one line
and exits with :attr:`EdgeoptError.exit_code`. Messages name the file involved and the fix.
"""

from __future__ import annotations


class EdgeoptError(Exception):
    """Base class of every error edgeopt reports to a user."""

    exit_code = 2


class ConfigError(EdgeoptError, ValueError):
    """A stage's configuration is invalid (bad value, conflicting options)."""


class DataError(EdgeoptError):
    """The data set is missing, empty, or does not fit the model."""


class CheckpointError(EdgeoptError):
    """A checkpoint is missing, truncated, untrusted, or does not match what was asked."""


class OutputError(EdgeoptError):
    """An output path cannot be written."""
