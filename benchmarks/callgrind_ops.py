"""Instructions per pool operation, counted by valgrind's callgrind, for comparing two trees.

    python benchmarks/callgrind_ops.py [--ops 2000]
    PYTHONPATH=/path/to/an/older/checkout python benchmarks/callgrind_ops.py

(Run as a script, so that ``PYTHONPATH`` decides which ``darwin_metrics`` is measured.)

For each backend it runs, under ``valgrind --tool=callgrind``, a process doing ``ops`` and then
``3 * ops`` operations of each kind: an uncontended ``async with pool.lease()`` cycle, an
``await pool.acquire()`` + ``await pool.release()`` cycle, and a bare
``anyio.lowlevel.checkpoint()`` (the floor under both); the difference of the two counts,
divided by ``2 * ops``, is the instructions one operation costs, start-up taken off. The
counts do not move with the machine's load, so two trees (this one and another checkout put
first on ``PYTHONPATH``) can be compared on a busy machine. Needs valgrind
(``apt-get install valgrind``); it takes a minute or two. Not part of ``python -m benchmarks``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys

import anyio

KINDS = ("lease", "acquire", "checkpoint")


async def _run(kind: str, ops: int) -> None:
    from anyio.lowlevel import checkpoint

    from darwin_metrics.resource import ResourcePool

    async with ResourcePool[object](10, factory=object) as pool:
        if kind == "lease":
            for _ in range(ops):
                async with pool.lease():
                    pass
        elif kind == "acquire":
            for _ in range(ops):
                resource = await pool.acquire()
                await pool.release(resource)
        else:
            for _ in range(ops):
                await checkpoint()


def _count(kind: str, backend: str, ops: int) -> int:
    completed = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            os.path.abspath(__file__),
            "--child",
            kind,
            backend,
            str(ops),
        ],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ,
    )
    match = re.search(r"Collected : ([\d,]+)", completed.stderr)
    if match is None:
        raise RuntimeError(f"no instruction count in valgrind's output:\n{completed.stderr}")
    return int(match[1].replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python benchmarks/callgrind_ops.py")
    parser.add_argument("--ops", type=int, default=2000)
    parser.add_argument("--child", nargs=3, metavar=("KIND", "BACKEND", "OPS"))
    args = parser.parse_args()
    if args.child:
        kind, backend, ops = args.child
        anyio.run(_run, kind, int(ops), backend=backend)
        return
    import darwin_metrics

    print(f"darwin_metrics from {os.path.dirname(darwin_metrics.__file__)}")
    for backend in ("asyncio", "trio"):
        for kind in KINDS:
            low = _count(kind, backend, args.ops)
            high = _count(kind, backend, 3 * args.ops)
            print(f"{backend:8} {kind:10} {(high - low) / (2 * args.ops):9.0f} instructions/op")


if __name__ == "__main__":
    main()
