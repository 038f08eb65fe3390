"""Prometheus export: a collector for pools, caches and managers, and a ``/metrics`` server.

Needs the ``prometheus`` extra (``pip install 'darwin-metrics[prometheus]'``, which brings
prometheus-client); importing this module does not import prometheus-client, using it does.

- :class:`DarwinCollector`: register it with prometheus_client's registry; each scrape
  reads the pools', caches' and managers' ``statistics()`` snapshots.
- :func:`register`: make one for some sources and register it, in one call.
- :class:`MetricsServer` and :func:`serve_metrics`: serve a registry's ``/metrics`` from an
  anyio TCP listener in your task group, on asyncio or trio, without a thread.
"""

from __future__ import annotations

from ._prometheus._collector import Conventions, DarwinCollector, register
from ._prometheus._server import MetricsServer, serve_metrics

__all__ = ["Conventions", "DarwinCollector", "MetricsServer", "register", "serve_metrics"]
