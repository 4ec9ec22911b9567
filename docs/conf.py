"""Sphinx configuration of the histocell-sd documentation (`make docs`: offline, warnings are errors)."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # document the checkout, also when the package is installed elsewhere

import histocell_sd  # noqa: E402

project = "histocell-sd"
author = "histocell-sd developers"
copyright = "histocell-sd developers"
release = version = histocell_sd.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "myst_nb",
]
# No sphinx.ext.intersphinx: the build is offline, so references to other projects stay plain text.

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
templates_path = ["_templates"]
exclude_patterns = ["_build", "**/.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]

# docs/tutorials and docs/notebooks are links to the repository's folders: the notebooks are rendered
# from their stored outputs (`make test` runs them under nbval), never executed here.
nb_execution_mode = "off"
nb_merge_streams = True
myst_enable_extensions = ["colon_fence", "deflist", "substitution"]
_METADATA = histocell_sd.io._schema.METADATA
myst_substitutions = {  # data_model.md: the keys of a nuclei table's uns["histocell"], from the code
    "metadata_table": "| key | meaning |\n|---|---|\n" + "".join(f"| `{key}` | {text} |\n" for key, text in _METADATA.items()),
}
myst_heading_anchors = 3

# API reference: one page per name in each subpackage's __all__ (docs/_templates/autosummary/).
autosummary_generate = True
autosummary_ignore_module_all = False
autosummary_imported_members = True
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_preserve_defaults = True
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
# "Attributes" rendered like "Parameters": one entry may name several attributes (``a, b``), and no
# attribute object is registered (the properties are documented as members already).
napoleon_custom_sections = [("Attributes", "params_style")]

html_theme = "furo"
html_title = f"histocell-sd {release}"
html_static_path: list[str] = []
html_show_sourcelink = False

_logger = logging.getLogger(__name__)


def _defining_module(package: str, name: str) -> str | None:
    """The module a package's ``__init__`` imports ``name`` from (constants carry no ``__module__``)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None or not spec.origin.endswith("__init__.py"):
        return None
    for node in ast.walk(ast.parse(Path(spec.origin).read_text())):
        if isinstance(node, ast.ImportFrom) and any(alias.name == name for alias in node.names):
            return importlib.util.resolve_name("." * node.level + (node.module or ""), package)
    return None


def _constant_docstring(app, what, name, obj, options, lines):
    """A re-exported constant gets the docstring written under its assignment in the defining module.

    autodoc only reads attribute docstrings of the module a name is documented in (the subpackage), and
    would otherwise show the docstring of ``tuple`` or ``dict``. A public constant without one warns.
    """
    if what != "data" or name == "histocell_sd.settings":
        return
    package, _, attr = name.rpartition(".")
    module = _defining_module(package, attr)
    docs = ModuleAnalyzer.for_module(module).find_attr_docs() if module else {}
    if ("", attr) in docs:
        lines[:] = list(docs["", attr])
    elif lines and type(obj).__doc__ and lines[0] == type(obj).__doc__.splitlines()[0]:
        _logger.warning("%s has no docstring (write one under its assignment in %s)", name, module or package)
        lines[:] = []


def _list_optional_pages(app, docname, source):
    """docs/viewing.md comes from another branch: the index's toctree lists it when it is there."""
    if docname == "index" and (DOCS / "viewing.md").exists():
        source[0] = source[0].replace("\nbenchmarks\n```", "\nbenchmarks\nviewing\n```", 1)


def setup(app):
    app.connect("autodoc-process-docstring", _constant_docstring)
    app.connect("source-read", _list_optional_pages)
