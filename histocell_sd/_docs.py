"""Parameter descriptions shared by the public API, written once and injected into docstrings.

A docstring line that holds only ``{name}`` (indented like a parameter entry of a numpydoc
``Parameters`` section) becomes the entry ``name`` followed by :data:`PARAMS` ``[name]``; lines
indented further right after it continue that description with what is specific to the function::

    @inject_docs
    def f(sdata, *, image_key=None, key_added="x"):
        '''...

        Parameters
        ----------
        {image_key}
        {key_added}
            the ``obs`` column of the result.
        '''

``{name:variant}`` documents parameter ``name`` with ``PARAMS["name:variant"]`` (e.g. a table that a
function writes rather than reads). Only whole-line placeholders are replaced, so braces elsewhere
(``obsm[f"{key_added}_composition"]``, JSON examples) stay as written; an unknown name raises at
import, so a typo cannot ship.
"""

from __future__ import annotations

import re
import textwrap

__all__ = ["PARAMS", "inject_docs"]

PARAMS: dict[str, str] = {
    "image_key": (
        'Name of the H&E image element in ``sdata.images`` (read). None: the image the nuclei were segmented on '
        '(recorded in the nuclei table\'s ``uns["histocell"]``) where nuclei are read, else ``"he"`` when present, else the only image.'
    ),
    "spots_key": (
        'Name of the spots in ``sdata.shapes`` (read): circles (Visium) or squares (Visium HD bins). None: ``"spots"`` when present, else the only '
        "shapes element."
    ),
    "spots_table_key": (
        "Name of the spots table in ``sdata.tables``: the table annotating the spots (counts in "
        '``X``, spot proportions in ``obsm``). None: ``"table"`` when present, else the only table.'
    ),
    "nuclei_key": (
        "Name of the nucleus polygons in ``sdata.shapes`` (read), as written by "
        ":func:`~histocell_sd.pp.segment_nuclei` or :func:`~histocell_sd.io.read_nuclei`."
    ),
    "nuclei_table_key": (
        "Name of the nuclei table in ``sdata.tables``: one row per nucleus, annotating the nucleus "
        'polygons (morphology features in ``X``, ``obsm["spatial"]`` centroids in px, ``obs["spot_id"]``, '
        "and the predictions of :func:`~histocell_sd.tl.predict`)."
    ),
    "nuclei_table_key:written": (
        "Name of the nuclei table this function writes to ``sdata.tables``: one row per nucleus, annotating "
        "the polygons ``key_added``."
    ),
    "labels_key": (
        "Name of a Labels2D element (instance raster) written to ``sdata.labels`` as well; None writes none."
    ),
    "key_added": "Name under which this function writes its result:",
    "proportions_key": (
        "``obsm`` key of the spot cell-type proportions in the spots table (DataFrame, rows = spots, "
        "columns = cell types; read)."
    ),
    "cluster_key": "``obs`` column of the nuclei table holding the cell types (categorical; read).",
    "progress": "Show progress bars (``hc.settings.progress = False`` silences them all).",
    "device": (
        "Torch device: ``\"auto\"`` (CUDA when available, else the CPU), ``\"cpu\"``, ``\"cuda\"`` or "
        "``\"cuda:<i>\"``; None: ``hc.settings.device``. CPU results do not depend on it."
    ),
    "copy": "Return a modified copy instead of writing into the input, which is then left unchanged.",
    "n_neighbors": "Number of nearest neighbours.",
    "seed": "Seed of every random draw: same seed, same result.",
    "mpp": (
        'Microns per pixel, for data without its own (``sdata.attrs["mpp"]`` or, for an AnnData, ``uns["mpp"]`` / '
        "``uns[\"histocell\"][\"mpp\"]``); a value that disagrees with the data's own is refused."
    ),
    # plots (hc.pl)
    "ax": "Matplotlib Axes to draw on; None: a new figure of ``figsize`` (constrained layout, ≥ 100 dpi).",
    "figsize": "Width and height in inches of the figure created when no axes are given; None: a size suited to the plot.",
    "title": "Title of the axes; None: a default naming what is shown.",
    "return_fig": "Return the matplotlib Figure instead of the Axes (as scanpy's ``return_fig``).",
    "extent": (
        "``(x_min, x_max, y_min, y_max)`` in pixels of the ``global`` coordinate system: the view, recommended on "
        "whole slides. Shapes whose centre lies outside are not drawn and the rest are clipped at its border; None: "
        "the whole image."
    ),
    "scale_bar_um": (
        'Length in µm of the scale bar drawn lower right (needs ``sdata.attrs["mpp"]``); ``"auto"``: a round length '
        "(1, 2 or 5 × 10^k µm) of about a fifth of the view width; None: no scale bar."
    ),
    "cmap": "Matplotlib colormap (name or object) of the values.",
    "vmin": (
        "Lower end of the colour range; None: the smallest value shown. Give the same ``vmin`` and ``vmax`` to "
        "panels that are compared."
    ),
    "vmax": "Upper end of the colour range; None: the largest value shown.",
}
"""Description of each shared parameter, keyed by its name (``name:variant`` for a variant)."""

_PLACEHOLDER = re.compile(r"^(?P<indent>[ \t]*)\{(?P<key>\w+(?::\w+)?)\}[ \t]*$")
_WIDTH = 108


def format_docstring(doc: str | None) -> str | None:
    """Replace the whole-line ``{name}`` placeholders of ``doc`` by their :data:`PARAMS` entries."""
    if not doc:
        return doc
    lines = []
    for line in doc.splitlines():
        match = _PLACEHOLDER.match(line)
        if match is None:
            lines.append(line)
            continue
        key, indent = match["key"], match["indent"]
        if key not in PARAMS:
            raise KeyError(f"Unknown docstring placeholder {{{key}}}; known: {sorted(PARAMS)}.")
        lines.append(indent + key.split(":")[0])
        body = indent + " " * 4
        lines += textwrap.wrap(PARAMS[key], width=max(_WIDTH - len(body), 40), initial_indent=body, subsequent_indent=body)
    return "\n".join(lines) + ("\n" if doc.endswith("\n") else "")


def inject_docs(obj):
    """Decorator: format the placeholders of a function's or class's docstring (see the module docstring)."""
    obj.__doc__ = format_docstring(obj.__doc__)
    return obj
