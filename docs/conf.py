"""Sphinx configuration for darwin-metrics' documentation.

Build it with ``python -m sphinx -W --keep-going -b html docs docs/_build/html`` (warnings
fail the build, as in CI). The API reference comes from the docstrings (autodoc, Google style
through napoleon); ``_ext/darwin_docs.py`` links the names of Python, anyio and trio without
fetching anything, and renders ``darwin-metrics monitor --help`` from the parser itself.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(0, str(HERE.parent))  # the checkout's darwin_metrics, installed or not

import darwin_metrics  # noqa: E402

project = "darwin-metrics"
author = "darwin-metrics developers"
copyright = "darwin-metrics developers"
release = darwin_metrics.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "darwin_docs",
]

root_doc = "index"
exclude_patterns = ["_build"]
templates_path: list[str] = []

# Every cross-reference must resolve: a broken link to one of our own names fails the build.
# Names from other libraries resolve through darwin_docs (a link, or plain code).
nitpicky = True

primary_domain = "py"
python_use_unqualified_type_names = True
add_module_names = False

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True  # time.monotonic, not <built-in function monotonic>
autodoc_class_signature = "mixed"
autodoc_inherit_docstrings = False

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True
napoleon_attr_annotations = True

html_theme = "furo"
html_title = f"darwin-metrics {release}"
html_static_path: list[str] = []
html_show_sourcelink = False
