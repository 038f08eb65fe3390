"""Sphinx helpers for darwin-metrics' documentation; nothing here is fetched from the network.

- **Links to Python, anyio and trio.** intersphinx would download those projects'
  inventories, which a build on a machine without internet access cannot do. Instead, a
  ``missing-reference`` handler links the names the docs use to their pages by rule (the
  standard library, anyio's API page, trio's reference pages), and renders any other name of
  an outside library as plain code. A name of darwin-metrics' own that does not resolve is
  left alone, so that ``nitpicky`` reports it and the strict build fails.
- **The command line.** ``.. darwin-metrics-help::`` renders ``darwin-metrics monitor
  --help`` from the parser itself, so the page never drifts from the command.
- **Attribute docstrings** are read as plain sentences, not as Google style's inline
  ``type: description``.
- **Private names in signatures.** A method that returns a private class is shown returning
  the public protocol that class implements (``pool.lease()`` returns an async context
  manager), and a default given as a private constant is shown as its value.
"""

from __future__ import annotations

import builtins
import importlib.util
import os
import re
import sys
from collections.abc import Callable
from typing import Any, ClassVar

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

PYTHON = "https://docs.python.org/3/library/"
ANYIO = "https://anyio.readthedocs.io/en/stable/"
TRIO = "https://trio.readthedocs.io/en/stable/"

# Builtins documented outside exceptions.html, by their page.
_BUILTIN_PAGES = {
    "functions.html": {"bool", "float", "int", "object", "type", "callable", "isinstance"},
    "stdtypes.html": {
        "bytearray",
        "bytes",
        "dict",
        "frozenset",
        "list",
        "memoryview",
        "set",
        "str",
        "tuple",
    },
    "constants.html": {"None", "True", "False", "Ellipsis", "NotImplemented"},
}
# asyncio's names live on several pages.
_ASYNCIO_PAGES = {
    "asyncio-task.html": {
        "asyncio.Task",
        "asyncio.Task.cancel",
        "asyncio.TaskGroup",
        "asyncio.create_task",
        "asyncio.shield",
        "asyncio.sleep",
        "asyncio.timeout",
        "asyncio.wait",
        "asyncio.wait_for",
    },
    "asyncio-exceptions.html": {"asyncio.CancelledError", "asyncio.InvalidStateError"},
    "asyncio-runner.html": {"asyncio.run", "asyncio.Runner"},
    "asyncio-eventloop.html": {"asyncio.get_running_loop", "asyncio.AbstractEventLoop"},
    "asyncio-future.html": {"asyncio.Future"},
}
# anyio's modules, by the guide that introduces them (its API page anchors functions only).
_ANYIO_MODULES = {
    "anyio.from_thread": "threads.html",
    "anyio.to_thread": "threads.html",
    "anyio.lowlevel": "api.html",
    "anyio.abc": "api.html",
}
# trio's reference is split by topic: the first matching prefix names the page.
_TRIO_PAGES = (
    ("trio.testing.", "reference-testing.html"),
    ("trio.lowlevel.", "reference-lowlevel.html"),
    ("trio.from_thread.", "reference-core.html"),
    ("trio.to_thread.", "reference-core.html"),
    ("trio.", "reference-core.html"),
)
_TYPE_VARS = {"T", "K", "V", "V_co", "Key"}
# Names that annotations use unqualified (imported for type checking only).
_BARE_NAMES = {
    "timedelta": "datetime.timedelta",
    "Awaitable": "collections.abc.Awaitable",
    "Callable": "collections.abc.Callable",
    "Hashable": "collections.abc.Hashable",
    "Sequence": "collections.abc.Sequence",
    "Self": "typing.Self",
    "TaskGroup": "anyio.abc.TaskGroup",
    "AbstractAsyncContextManager": "contextlib.AbstractAsyncContextManager",
    "SocketListener": "anyio.abc.SocketListener",
    # The exporters' third-party types (prometheus-client, the OpenTelemetry API).
    "CollectorRegistry": "prometheus_client.registry.CollectorRegistry",
    "Metric": "prometheus_client.metrics_core.Metric",
    "Meter": "opentelemetry.metrics.Meter",
    # What a pool's on_timing listener is given: a Literal of the pool's, not public itself.
    "TimingKind": "darwin_metrics._pool._statistics.TimingKind",
}


def external_url(target: str) -> str | None:
    """The documentation page of an outside name, or ``None`` when no rule knows it."""
    top = target.partition(".")[0]
    if top == "builtins":
        target = target.removeprefix("builtins.")
        top = target.partition(".")[0]
    if "." not in target and hasattr(builtins, target):
        value = getattr(builtins, target)
        if isinstance(value, type) and issubclass(value, BaseException):
            return f"{PYTHON}exceptions.html#{target}"
        for page, names in _BUILTIN_PAGES.items():
            if target in names:
                return f"{PYTHON}{page}#{target}"
        return None
    if top == "anyio":
        if target in _ANYIO_MODULES:
            return f"{ANYIO}{_ANYIO_MODULES[target]}"
        return f"{ANYIO}api.html#{target}"  # one page for all of anyio's API
    if top == "trio":
        for prefix, page in _TRIO_PAGES:
            if target.startswith(prefix):
                return f"{TRIO}{page}#{target}"
    if top == "asyncio":
        for page, names in _ASYNCIO_PAGES.items():
            if target in names:
                return f"{PYTHON}{page}#{target}"
        return f"{PYTHON}asyncio.html"
    if top in {
        "collections",
        "contextlib",
        "datetime",
        "time",
        "typing",
        "pickle",
        "threading",
        "json",
        "ssl",
    }:
        module = "collections.abc" if target.startswith("collections.abc.") else top
        anchor = target if target != module else f"module-{module}"
        return f"{PYTHON}{module}.html#{anchor}"
    return None


def _is_outside_name(target: str) -> bool:
    """Whether ``target`` names something that is not darwin-metrics' own."""
    top = target.partition(".")[0]
    if top == "darwin_metrics":
        return False
    if "." not in target and hasattr(builtins, target):
        return True
    return importlib.util.find_spec(top) is not None


def _on_missing_reference(
    app: Sphinx, env: Any, node: Any, contnode: nodes.Element
) -> nodes.Element | None:
    if node.get("refdomain") != "py":
        return None
    target: str = node.get("reftarget", "")
    target = _BARE_NAMES.get(target, target)
    if target in _TYPE_VARS or target.rpartition(".")[2] in _TYPE_VARS:
        return contnode  # a type variable: plain code
    if "._" in target or target.startswith("_"):
        return contnode  # a private class in a signature: nothing to link to
    if not _is_outside_name(target):
        return None  # one of ours that did not resolve: nitpicky reports it
    url = external_url(target)
    if url is None:
        return contnode
    reference = nodes.reference("", "", internal=False, refuri=url, reftitle=target)
    reference += contnode
    return reference


# Return types of public methods that are private classes, and the protocol they implement.
_PUBLIC_RETURNS = {
    r"\bLeaseContext\[(\w+)\]": r"contextlib.AbstractAsyncContextManager[\1]",
}


def _on_process_signature(
    app: Sphinx,
    what: str,
    name: str,
    obj: object,
    options: Any,
    signature: str | None,
    return_annotation: str | None,
) -> tuple[str | None, str | None] | None:
    if signature and "= _" in signature:
        # A default spelled with a private constant (hook_timeout=_DEFAULT_HOOK_TIMEOUT):
        # show its value instead.
        namespace = vars(sys.modules[getattr(obj, "__module__", "builtins")])
        signature = re.sub(
            r"= (_\w+)",
            lambda match: f"= {namespace[match[1]]!r}" if match[1] in namespace else match[0],
            signature,
        )
    if return_annotation:
        for pattern, public in _PUBLIC_RETURNS.items():
            return_annotation = re.sub(pattern, public, return_annotation)
    return signature, return_annotation


class CommandHelp(SphinxDirective):
    """``.. darwin-metrics-help:: monitor``: the subcommand's ``--help``, as printed."""

    required_arguments = 1
    option_spec: ClassVar[dict[str, Callable[[str], object]]] = {"width": directives.positive_int}

    def run(self) -> list[nodes.Node]:
        from darwin_metrics.__main__ import build_parser

        parser, monitor = build_parser()
        chosen = {"darwin-metrics": parser, "monitor": monitor}.get(self.arguments[0])
        if chosen is None:
            raise self.error(f"no such command: {self.arguments[0]!r}")
        old = os.environ.get("COLUMNS")
        os.environ["COLUMNS"] = str(self.options.get("width", 88))  # argparse wraps to it
        try:
            text = chosen.format_help()
        finally:
            if old is None:
                del os.environ["COLUMNS"]
            else:
                os.environ["COLUMNS"] = old
        block = nodes.literal_block(text, text)
        block["language"] = "text"
        return [block]


def _on_process_docstring(
    app: Sphinx, what: str, name: str, obj: object, options: Any, lines: list[str]
) -> None:
    # napoleon reads an attribute's first line "type: description" (Google style's inline
    # type); ours give the type as an annotation and may use a colon in the sentence
    # ("The usage in percent: finite and not negative"). A leading colon tells napoleon
    # that there is no inline type.
    if what not in {"attribute", "property", "data"}:
        return
    for index, line in enumerate(lines):
        if line.strip():
            lines[index] = ": " + line
            return


def setup(app: Sphinx) -> dict[str, object]:
    app.connect("missing-reference", _on_missing_reference)
    app.connect("autodoc-process-signature", _on_process_signature)
    app.connect("autodoc-process-docstring", _on_process_docstring, priority=400)  # napoleon: 500
    app.add_directive("darwin-metrics-help", CommandHelp)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
