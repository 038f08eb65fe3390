"""The Prometheus exporter, one idea per module.

- :mod:`._collector`: :class:`DarwinCollector` (pools, caches and managers, read at scrape
  time) and :func:`register`.
- :mod:`._server`: :class:`MetricsServer`, ``/metrics`` over HTTP from an anyio listener.
- :mod:`._system`: this machine's usage under OpenTelemetry's system metric names, for
  ``darwin-metrics monitor --serve``.
"""
