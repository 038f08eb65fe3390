"""Run a module or a script as if some packages were not installed; for the tests.

    python tests/run_without.py psutil,rich -m darwin_metrics monitor --json
    python tests/run_without.py psutil examples/system_monitor.py --backend trio

A finder placed first on ``sys.meta_path`` refuses the named top-level packages (and their
submodules) with the ``ModuleNotFoundError`` a missing package raises, so the code under test
meets exactly what a machine without them gives it, and nothing has to be uninstalled.
"""

from __future__ import annotations

import runpy
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType


class RefuseImport:
    """A meta path finder that makes some top-level packages look absent."""

    def __init__(self, names: set[str]) -> None:
        self.names = names

    def find_spec(
        self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if name.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None  # let the other finders look


def main() -> None:
    refused, *command = sys.argv[1:]
    sys.meta_path.insert(0, RefuseImport(set(filter(None, refused.split(",")))))
    if command[:1] == ["-m"]:
        sys.argv = [command[1], *command[2:]]
        runpy.run_module(command[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = command
        runpy.run_path(command[0], run_name="__main__")


if __name__ == "__main__":
    main()
