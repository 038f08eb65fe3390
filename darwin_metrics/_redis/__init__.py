"""The Valkey/Redis integration's private modules; the public names live in
:mod:`darwin_metrics.redis`."""
