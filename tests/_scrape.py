"""Helpers for the exporter tests: parse a scrape, talk raw HTTP, compute buckets by hand."""

from __future__ import annotations

import contextlib
import math
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import anyio
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from darwin_metrics._histogram import DEFAULT_BUCKETS


def parse(text: str) -> dict[str, Metric]:
    """The families of a scrape in the Prometheus text format, by name (no duplicates)."""
    families: dict[str, Metric] = {}
    for family in text_string_to_metric_families(text):
        assert family.name not in families, f"{family.name} twice"
        families[family.name] = family
    return families


def values(family: Metric, sample: str | None = None) -> dict[tuple[tuple[str, str], ...], float]:
    """``{sorted label pairs: value}`` of the samples named ``sample`` (the family's name
    for gauges, ``<name>_total`` for counters)."""
    if sample is None:
        sample = family.name + ("_total" if family.type == "counter" else "")
    found = {}
    for each in family.samples:
        if each.name == sample:
            key = tuple(sorted(each.labels.items()))
            assert key not in found, (sample, key)
            found[key] = each.value
    return found


def value(family: Metric, sample: str | None = None, **labels: str) -> float:
    """The value of the one sample with exactly these labels."""
    return values(family, sample)[tuple(sorted(labels.items()))]


def buckets(family: Metric, **labels: str) -> list[tuple[float, float]]:
    """The ``(le, cumulative count)`` pairs of one histogram series, in order of ``le``."""
    pairs = []
    for each in family.samples:
        if each.name != family.name + "_bucket":
            continue
        rest = dict(each.labels)
        le = rest.pop("le")
        if rest == labels:
            pairs.append((float(le), each.value))
    return sorted(pairs)


def label_names(family: Metric) -> set[frozenset[str]]:
    """The sets of label names the family's samples carry (``le`` left out)."""
    return {frozenset(name for name in each.labels if name != "le") for each in family.samples}


def hand_buckets(durations: Iterable[float]) -> list[tuple[float, float]]:
    """Cumulative ``le`` buckets of ``durations``, counted one by one against the bounds."""
    durations = list(durations)
    return [
        (bound, float(sum(1 for seconds in durations if seconds <= bound)))
        for bound in (*DEFAULT_BUCKETS, math.inf)
    ]


@dataclass
class Response:
    status: int
    headers: Mapping[str, str]
    body: bytes


def _parse_response(data: bytes) -> Response:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, text = line.partition(":")
        headers[name.strip().lower()] = text.strip()
    return Response(status, headers, body)


async def ahttp(host: str, port: int, request: bytes) -> Response:
    """Send ``request`` as it is, read the response until the server closes."""
    async with await anyio.connect_tcp(host, port) as stream:
        await stream.send(request)
        data = bytearray()
        with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError):
            async for chunk in stream:  # until the server closes
                data += chunk
    return _parse_response(bytes(data))


async def aget(host: str, port: int, path: str = "/metrics", headers: str = "") -> Response:
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n"
    return await ahttp(host, port, request.encode())


def get(host: str, port: int, path: str = "/metrics", timeout: float = 10.0) -> Response:
    """A plain GET over a blocking socket, for tests of a server in another process."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return _parse_response(data)
