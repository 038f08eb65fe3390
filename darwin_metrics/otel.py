"""OpenTelemetry export: observable instruments over pools, caches and managers.

Needs the ``otel`` extra (``pip install 'darwin-metrics[otel]'``, which brings the
OpenTelemetry API, not the SDK); importing this module does not import OpenTelemetry, using
it does.

- :func:`instrument`: the instruments of a meter, reading the pools', caches' and managers'
  ``statistics()`` when metrics are collected (:class:`DarwinInstruments`).
- :func:`pool_timing_listener`: a pool's ``on_timing`` listener that records wait, use and
  create times into OpenTelemetry histograms.
"""

from __future__ import annotations

from ._otel import DarwinInstruments, instrument, pool_timing_listener

__all__ = ["DarwinInstruments", "instrument", "pool_timing_listener"]
