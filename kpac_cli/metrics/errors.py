"""Exceptions of :mod:`kpac_cli.metrics`."""

from __future__ import annotations


class MetricUnavailable(RuntimeError):
    """A metric cannot be computed here (e.g. LPIPS without its weight files).

    The message is the reason, written for the user; report the metric as
    ``unavailable: <reason>`` and never substitute a number.
    """


class PairingError(ValueError):
    """Predictions and targets cannot be paired (counts differ, names missing, ...)."""
