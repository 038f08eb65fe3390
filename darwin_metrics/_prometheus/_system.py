"""This machine's usage under OpenTelemetry's system metric names, for ``monitor --serve``.

OpenTelemetry's ``system.cpu.utilization``, ``system.memory.usage``, ``system.paging.usage``
and ``system.filesystem.usage`` (with their ``utilization`` and ``limit`` siblings), spelled
as its Prometheus exporter spells them: dots become underscores, bytes get ``_bytes`` and
fractions ``_ratio``. Never ``node_*``: those names belong to node_exporter, and dashboards
would mistake these series for its.

:class:`SystemSampler` reads psutil (memory and swap in the event loop's thread, where they
take microseconds; disks in a worker thread, since ``statvfs`` on a stale network mount
blocks), and :class:`SystemCollector` exports the latest reading at each scrape, so that a
scrape never waits for a disk.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final, NoReturn

import anyio
import anyio.abc
import attrs

from .._manager import ResourceManager
from .._manager._samplers import cpu_busy_percent
from ._collector import DarwinCollector, Spec, _gauge, import_prometheus_client
from ._server import MetricsServer

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

__all__ = [
    "Filesystem",
    "SystemCollector",
    "SystemReading",
    "SystemSampler",
    "serve_monitor_metrics",
]

MONITOR_MANAGER: Final = "monitor"  # the manager label of the monitor's own series


@attrs.frozen
class Filesystem:
    """One mounted filesystem's usage, in bytes."""

    device: str
    mountpoint: str
    used: int
    free: int
    """Available to unprivileged users."""
    reserved: int
    """Neither used nor available to unprivileged users (reserved for root)."""

    @property
    def limit(self) -> int:
        return self.used + self.free + self.reserved

    @property
    def utilization(self) -> float:
        """Used over used + free, as ``df`` reports it (and the manager's ``disk:`` usage)."""
        usable = self.used + self.free
        return self.used / usable if usable else 0.0


@attrs.frozen
class SystemReading:
    """One reading of this machine."""

    cpu: float | None
    """The fraction of CPU time spent busy since the previous reading (``None`` the first
    time: a reading right after the first covers almost no time)."""
    memory: tuple[tuple[str, int], ...]
    """``(state, bytes)``: ``used`` and ``free``, and where the platform reports them
    ``buffered`` and ``cached`` (then ``used`` is the rest, and the four add up to the total)."""
    memory_total: int
    paging: tuple[tuple[str, int], ...]
    """``(state, bytes)`` of swap: ``used`` and ``free``."""
    paging_total: int
    filesystems: tuple[Filesystem, ...]


def read_filesystems() -> tuple[Filesystem, ...]:
    """Each mounted partition's usage (partitions that cannot be read are left out)."""
    import psutil

    found = []
    for partition in psutil.disk_partitions(all=False):
        try:
            usage = psutil.disk_usage(partition.mountpoint)
        except OSError:  # vanished, or not readable by us
            continue
        used, free, total = int(usage.used), int(usage.free), int(usage.total)
        if min(used, free, total) < 0:  # some FUSE mounts report nonsense
            continue
        found.append(
            Filesystem(
                device=partition.device,
                mountpoint=partition.mountpoint,
                used=used,
                free=free,
                reserved=max(total - used - free, 0),
            )
        )
    return tuple(found)


class SystemSampler:
    """Reads this machine with psutil; CPU usage is measured between its own readings."""

    def __init__(self) -> None:
        import psutil

        self._cpu_times: Any = psutil.cpu_times()
        self._primed = False

    async def read(self) -> SystemReading:
        """Take a reading.

        Checkpoint: yes (disks are read in a worker thread, abandoned if cancelled).
        """
        import psutil

        cpu = None
        now = psutil.cpu_times()
        if self._primed:
            cpu = cpu_busy_percent(self._cpu_times, now) / 100.0
        self._cpu_times, self._primed = now, True
        memory = psutil.virtual_memory()
        total, free = int(memory.total), int(memory.free)
        buffers, cached = getattr(memory, "buffers", None), getattr(memory, "cached", None)
        if buffers is not None and cached is not None:
            # As OpenTelemetry's host metrics count them: the states add up to the total
            # (psutil's own "used" is total - available, which overlaps cached).
            used = max(total - free - int(buffers) - int(cached), 0)
            states = [
                ("used", used),
                ("free", free),
                ("buffered", int(buffers)),
                ("cached", int(cached)),
            ]
        else:
            states = [("used", int(memory.used)), ("free", free)]
        swap = psutil.swap_memory()
        filesystems = await anyio.to_thread.run_sync(read_filesystems, abandon_on_cancel=True)
        return SystemReading(
            cpu=cpu,
            memory=tuple(states),
            memory_total=total,
            paging=(("used", int(swap.used)), ("free", int(swap.free))),
            paging_total=int(swap.total),
            filesystems=filesystems,
        )


_SYSTEM: Final[dict[str, Spec]] = {
    "cpu": (
        "gauge",
        "system_cpu_utilization_ratio",
        "The fraction of CPU time (all CPUs together) spent busy since the previous sample.",
        (),
    ),
    "memory_usage": (
        "gauge",
        "system_memory_usage_bytes",
        "Memory in use, by state.",
        ("state",),
    ),
    "memory_utilization": (
        "gauge",
        "system_memory_utilization_ratio",
        "Memory in use, by state, as a fraction of the total.",
        ("state",),
    ),
    "memory_limit": (
        "gauge",
        "system_memory_limit_bytes",
        "Total memory.",
        (),
    ),
    "paging_usage": (
        "gauge",
        "system_paging_usage_bytes",
        "Swap space, by state.",
        ("state",),
    ),
    "paging_utilization": (
        "gauge",
        "system_paging_utilization_ratio",
        "Swap space, by state, as a fraction of the total (absent without swap).",
        ("state",),
    ),
    "filesystem_usage": (
        "gauge",
        "system_filesystem_usage_bytes",
        "Filesystem space, by state: used, free (available to unprivileged users), reserved.",
        ("device", "mountpoint", "state"),
    ),
    "filesystem_utilization": (
        "gauge",
        "system_filesystem_utilization_ratio",
        "Used filesystem space as a fraction of used and free, as df reports it.",
        ("device", "mountpoint"),
    ),
    "filesystem_limit": (
        "gauge",
        "system_filesystem_limit_bytes",
        "Filesystem size.",
        ("device", "mountpoint"),
    ),
}


class SystemCollector:
    """A prometheus_client collector of :attr:`reading`, this machine's latest reading."""

    def __init__(self) -> None:
        import_prometheus_client()
        self.reading: SystemReading | None = None
        """What the next scrape exports; nothing while ``None``."""

    def describe(self) -> Iterator[Metric]:
        for spec in _SYSTEM.values():
            yield _gauge(spec)

    def collect(self) -> Iterator[Metric]:
        reading = self.reading
        if reading is None:
            return
        if reading.cpu is not None:
            cpu = _gauge(_SYSTEM["cpu"])
            cpu.add_metric([], reading.cpu)
            yield cpu
        for prefix, states, total in (
            ("memory", reading.memory, reading.memory_total),
            ("paging", reading.paging, reading.paging_total),
        ):
            usage = _gauge(_SYSTEM[f"{prefix}_usage"])
            utilization = _gauge(_SYSTEM[f"{prefix}_utilization"])
            for state, value in states:
                usage.add_metric([state], value)
                if total > 0:
                    utilization.add_metric([state], value / total)
            yield usage
            if utilization.samples:
                yield utilization
        limit = _gauge(_SYSTEM["memory_limit"])
        limit.add_metric([], reading.memory_total)
        yield limit
        if reading.filesystems:
            usage = _gauge(_SYSTEM["filesystem_usage"])
            utilization = _gauge(_SYSTEM["filesystem_utilization"])
            size = _gauge(_SYSTEM["filesystem_limit"])
            for fs in reading.filesystems:
                where = [fs.device, fs.mountpoint]
                for state, value in (
                    ("used", fs.used),
                    ("free", fs.free),
                    ("reserved", fs.reserved),
                ):
                    usage.add_metric([*where, state], value)
                utilization.add_metric(where, fs.utilization)
                size.add_metric(where, fs.limit)
            yield from (usage, utilization, size)


async def serve_monitor_metrics(
    server: MetricsServer,
    manager: ResourceManager,
    interval: float,
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve the monitor's metrics on ``server`` until cancelled.

    ``manager``'s series (label ``manager="monitor"``) and this machine's, read every
    ``interval`` seconds. Reports started once the first reading is there and the server
    accepts scrapes.

    Checkpoint: yes; it returns only by raising. On the way out the server is closed.
    """
    if not math.isfinite(interval) or interval <= 0:
        raise ValueError(f"interval must be finite and positive, got {interval!r}")
    system = SystemCollector()
    server.registry.register(system)
    server.registry.register(DarwinCollector(managers={MONITOR_MANAGER: manager}))
    sampler = SystemSampler()
    try:
        system.reading = await sampler.read()
        async with anyio.create_task_group() as group:
            group.start_soon(server.serve)
            task_status.started()
            due = anyio.current_time()
            while True:
                due += interval
                await anyio.sleep_until(due)
                system.reading = await sampler.read()
    finally:
        await server.aclose()
    raise AssertionError("unreachable")  # pragma: no cover
