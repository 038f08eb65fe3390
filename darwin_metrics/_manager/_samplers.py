"""What the manager's samplers read: a pool's usage, and this machine's through psutil."""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING, Any, Final

import anyio

if TYPE_CHECKING:
    from .._pool import ResourcePool

__all__ = ["Readings", "SystemReader", "cpu_busy_percent", "pool_usage"]

POOL_SNAPSHOTS_MAX: Final = 1024  # pool changes kept for a pool watcher that lags behind

Readings = tuple[list[tuple[str, float]], list[str]]
"""One round of a sampler: ``(resource_type, usage)`` pairs, and the types that are gone."""


def pool_usage(pool: ResourcePool[Any]) -> float:
    stats = pool.statistics()
    return stats.leased / stats.max_size * 100.0 if stats.max_size else 0.0


class PoolWatcher:
    """Snapshots a pool's usage on every change; a manager task tracks the snapshots."""

    __slots__ = ("changed", "pool", "snapshots", "unwatch")

    def __init__(self, pool: ResourcePool[Any]) -> None:
        self.pool = pool
        self.snapshots: deque[float] = deque(maxlen=POOL_SNAPSHOTS_MAX)
        self.changed = anyio.Event()
        self.snapshots.append(pool_usage(pool))
        self.unwatch = pool._watch(self.notify)

    def notify(self) -> None:
        # Called by the pool, synchronously, in the task that changed it: cheap, never raises.
        self.snapshots.append(pool_usage(self.pool))
        self.changed.set()


def _cpu_totals(times: Any) -> tuple[float, float]:
    """``(busy, total)`` seconds of a ``psutil.cpu_times()`` reading, as psutil counts them.

    Guest time is already inside user time on Linux, so it is not counted twice; idle and
    I/O wait are not busy.
    """
    total = sum(times)
    total -= getattr(times, "guest", 0.0) + getattr(times, "guest_nice", 0.0)
    busy = total - times.idle - getattr(times, "iowait", 0.0)
    return busy, total


def cpu_busy_percent(before: Any, after: Any) -> float:
    """The CPU usage between two ``psutil.cpu_times()`` readings, in percent (0 to 100)."""
    busy_before, total_before = _cpu_totals(before)
    busy_after, total_after = _cpu_totals(after)
    elapsed = total_after - total_before
    if elapsed <= 0:
        return 0.0
    percent = (busy_after - busy_before) / elapsed * 100.0
    return min(max(percent, 0.0), 100.0)


class SystemReader:
    """Reads the system's usage with psutil, one round per call.

    CPU, memory and swap come from procfs-like sources in microseconds and are read in the
    event loop's thread. CPU usage is measured between this reader's own successive
    ``cpu_times()`` readings, so two samplers never disturb each other (``cpu_percent`` keeps
    one baseline per thread). Disks are read in a worker thread: ``statvfs`` on a stale
    network mount blocks. The first round has no ``cpu``: a reading microseconds after the
    first one covers almost no time. A disk that was read before and is gone now (unmounted)
    is reported gone, so that the manager forgets it.
    """

    def __init__(self) -> None:
        import psutil

        self._cpu_times = psutil.cpu_times()
        self._primed = False
        self._disks: set[str] = set()

    async def __call__(self) -> Readings:
        import psutil

        readings = []
        if self._primed:
            now = psutil.cpu_times()
            readings.append(("cpu", cpu_busy_percent(self._cpu_times, now)))
            self._cpu_times = now
        self._primed = True
        readings.append(("memory", float(psutil.virtual_memory().percent)))
        readings.append(("swap", float(psutil.swap_memory().percent)))
        # Abandoned on cancellation: a hung statvfs must not hold up the manager's exit.
        disks, mounted = await anyio.to_thread.run_sync(read_disks, abandon_on_cancel=True)
        readings += disks
        gone = sorted(self._disks - mounted)  # unmounted; not merely unreadable this round
        self._disks = mounted
        return readings, gone


def read_disks() -> tuple[list[tuple[str, float]], set[str]]:
    """Each mounted partition's usage, and the resource types of every mounted partition."""
    import psutil

    readings = []
    mounted = set()
    for partition in psutil.disk_partitions(all=False):
        mounted.add(f"disk:{partition.mountpoint}")
        try:
            usage = psutil.disk_usage(partition.mountpoint)
        except OSError:  # vanished, or not readable by us
            continue
        percent = float(usage.percent)
        if math.isfinite(percent) and percent >= 0:  # some FUSE mounts report nonsense
            readings.append((f"disk:{partition.mountpoint}", percent))
    return readings, mounted
