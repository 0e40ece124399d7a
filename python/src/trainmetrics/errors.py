"""The package's exceptions: one base, one class per operation that can fail."""

from __future__ import annotations


class TrainmetricsError(Exception):
    """Base of every error this package raises."""


class ConfigError(TrainmetricsError, ValueError):
    """`init()` (or an integration) was given settings that cannot work: a bad endpoint, a
    distributed job without a shared run id, a status that is not FINISHED/FAILED/KILLED."""


class EmbeddedServeError(TrainmetricsError, RuntimeError):
    """The embedded default could not start or join a local `trainmetrics serve`: no binary, or
    the process did not come up (the message holds the tail of its log)."""
