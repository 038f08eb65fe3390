"""The documentation keeps up with the code.

The docs build itself (Sphinx, strict) runs in ``.ci/run``; these checks need no Sphinx. They
fail when a public name, module or method is added without its place in ``docs/``:

- every name in a public module's ``__all__`` has a reference entry (an ``auto*`` directive);
- every public module has a reference page (``.. module::``);
- every public method of the pool, the cache, the manager, the subscription and the
  Valkey/Redis tier is in the "Cancellation and threads" page, which says whether it is a
  checkpoint and what it does when cancelled;
- the README's docs build command is the one CI runs.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import types
from pathlib import Path

import pytest

import darwin_metrics
from darwin_metrics.redis import RedisCache
from darwin_metrics.resource import Cache, ResourceManager, ResourcePool, Subscription

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
DIRECTIVE = re.compile(
    r"^\.\. (module|currentmodule|auto(?:class|exception|function|data|attribute))::\s*(\S+)",
    re.MULTILINE,
)
# What "async with" and "async for" run: documented as such, and so listed.
PROTOCOL_METHODS = ("__aenter__", "__aexit__", "__anext__")


def public_modules() -> list[types.ModuleType]:
    names = [
        f"darwin_metrics.{info.name}"
        for info in pkgutil.iter_modules(darwin_metrics.__path__)
        if not info.name.startswith("_")
    ]
    return [darwin_metrics, *(importlib.import_module(name) for name in sorted(names))]


def documented() -> tuple[set[str], set[str]]:
    """The modules given a page, and the dotted names given a reference entry."""
    modules: set[str] = set()
    names: set[str] = set()
    for page in DOCS.rglob("*.rst"):
        current = ""
        for match in DIRECTIVE.finditer(page.read_text(encoding="utf-8")):
            kind, target = match[1], match[2]
            if kind == "module":
                modules.add(target)
                current = target
            elif kind == "currentmodule":
                current = target
            else:
                full = target if target.startswith("darwin_metrics.") else f"{current}.{target}"
                names.add(full)
    return modules, names


def resolve(dotted: str) -> object:
    module_name, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


@pytest.mark.parametrize("module", public_modules(), ids=lambda module: module.__name__)
def test_every_public_name_has_a_reference_entry(module: types.ModuleType) -> None:
    modules, names = documented()
    assert module.__name__ in modules, f"no docs page declares '.. module:: {module.__name__}'"
    # A name exported by two modules (darwin_metrics and darwin_metrics.resource) is one
    # object, documented once under either name.
    objects = {id(resolve(name)) for name in names}
    missing = [
        name
        for name in module.__all__
        if name != "__version__" and id(getattr(module, name)) not in objects
    ]
    assert not missing, f"not in docs/reference: {missing}"


def public_methods(cls: type) -> list[str]:
    found: set[str] = set()
    for klass in cls.__mro__[:-1]:  # not object's
        for name in vars(klass):
            if not name.startswith("_") or name in PROTOCOL_METHODS:
                found.add(name)
    return sorted(found)


@pytest.mark.parametrize(
    "cls",
    [ResourcePool, Cache, ResourceManager, Subscription, RedisCache],
    ids=lambda cls: cls.__name__,
)
def test_the_cancellation_page_covers_every_method(cls: type) -> None:
    page = (DOCS / "cancellation.rst").read_text(encoding="utf-8")
    missing = [
        name
        for name in public_methods(cls)
        if not re.search(rf"\b{cls.__name__}\.{re.escape(name)}\b", page)
    ]
    assert not missing, (
        f"docs/cancellation.rst does not say whether these {cls.__name__} methods are "
        f"checkpoints: {missing}"
    )


def test_the_readme_builds_the_docs_as_ci_does() -> None:
    command = "python -m sphinx -W --keep-going -b html docs docs/_build/html"
    assert command in (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert command.replace("-b html", "-q -b html") in ci  # CI's, quietly
    assert command in (DOCS / "index.rst").read_text(encoding="utf-8")
