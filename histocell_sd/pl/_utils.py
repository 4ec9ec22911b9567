"""Shared pieces of the plots: new figures, return values, extents, colours, colorbars and the µm scale bar."""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.colors import Normalize
from matplotlib.layout_engine import ConstrainedLayoutEngine
from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar
from spatialdata import SpatialData, bounding_box_query, get_extent

from .._constants import CELL_TYPE_KEY, COORDINATE_SYSTEM, PALETTE
from .._errors import InvalidInputError
from ..io._elements import check_in_global

MIN_DPI = 100
"""Lowest dpi of a figure a plot creates (a lower ``rcParams["figure.dpi"]`` is raised to it)."""

SCALE_BAR_LABEL = "scale bar"
"""Label of the :class:`~mpl_toolkits.axes_grid1.anchored_artists.AnchoredSizeBar` the image plots add."""


def new_figure(figsize: tuple[float, float], nrows: int = 1, ncols: int = 1, **kwargs):
    """``plt.subplots`` with a constrained layout and at least :data:`MIN_DPI` dpi."""
    dpi = max(MIN_DPI, float(mpl.rcParams["figure.dpi"]))
    return plt.subplots(nrows, ncols, figsize=figsize, dpi=dpi, layout="constrained", squeeze=False, **kwargs)


def axes_or_new(ax, figsize: tuple[float, float]):
    """``(figure, axes)``: the given axes and its figure, or a new constrained figure of ``figsize`` with one axes."""
    if ax is None:
        fig, axes = new_figure(figsize)
        return fig, axes[0, 0]
    if not isinstance(ax, plt.Axes):
        raise InvalidInputError(f"ax must be one matplotlib Axes, got {type(ax).__name__}.")
    return ax.figure, ax


def finish(fig, ax, return_fig: bool):
    """What a plot returns: the figure when ``return_fig``, else the axes.

    A constrained layout is run once here: its first pass starts from positions before the equal aspect
    and the legends were applied and can leave tick labels or a legend outside the figure; the pass of
    ``savefig`` / ``show`` then starts from a laid-out figure and converges.
    """
    engine = fig.get_layout_engine()
    if isinstance(engine, ConstrainedLayoutEngine):
        engine.execute(fig)
    return fig if return_fig else ax


def colorbar(fig, mappable, ax, label: str | None = None):
    """A colorbar that takes its room from ``ax`` (never drawn over a neighbour)."""
    cbar = fig.colorbar(mappable, ax=ax, shrink=0.8, pad=0.02, fraction=0.05)
    if label:
        cbar.set_label(label)
    return cbar


def norm(values, vmin: float | None, vmax: float | None) -> Normalize:
    """Colour range ``[vmin, vmax]``; a None bound is the finite minimum / maximum of ``values``."""
    finite = np.asarray(values, dtype=float)
    finite = finite[np.isfinite(finite)]
    lo = vmin if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    if hi <= lo:
        raise InvalidInputError(f"vmax ({hi}) must be larger than vmin ({lo}).")
    return Normalize(vmin=lo, vmax=hi)


def check_extent(extent) -> tuple[float, float, float, float] | None:
    """``extent`` as four floats ``(x_min, x_max, y_min, y_max)`` (None stays None)."""
    if extent is None:
        return None
    try:
        x0, x1, y0, y1 = (float(v) for v in extent)
    except (TypeError, ValueError):
        raise InvalidInputError(f"extent must be four numbers (x_min, x_max, y_min, y_max) in px, got {extent!r}.") from None
    if not (x1 > x0 and y1 > y0):
        raise InvalidInputError(f"extent must be (x_min, x_max, y_min, y_max) with x_max > x_min and y_max > y_min, got {extent}.")
    return x0, x1, y0, y1


def check_look(*, fill_alpha, scale_bar_um) -> None:
    """Refuse, before anything is drawn, a ``fill_alpha`` outside [0, 1] or a ``scale_bar_um`` that is not
    ``"auto"``, None/False or a positive number of µm."""
    if isinstance(fill_alpha, bool) or not isinstance(fill_alpha, (int, float, np.number)) or not 0 <= fill_alpha <= 1:
        raise InvalidInputError(f"fill_alpha must be a number in [0, 1], got {fill_alpha!r}.")
    if scale_bar_um is None or scale_bar_um is False or scale_bar_um == "auto":
        return
    if isinstance(scale_bar_um, bool) or not isinstance(scale_bar_um, (int, float, np.number)) or not scale_bar_um > 0:
        raise InvalidInputError(f'scale_bar_um must be "auto", None or a positive length in µm, got {scale_bar_um!r}.')


def crop(view: SpatialData, extent) -> SpatialData:
    """The elements of ``view`` within ``extent`` (px, ``global``); shapes whose centroid lies outside are dropped.

    A shapes element with nothing in ``extent`` is an :class:`~histocell_sd.InvalidInputError` naming it.
    """
    x0, x1, y0, y1 = extent
    box = get_extent(view, coordinate_system=COORDINATE_SYSTEM)
    nothing = InvalidInputError(f"Nothing of the sample lies within extent {extent} (x_min, x_max, y_min, y_max in px).")
    if x1 <= box["x"][0] or x0 >= box["x"][1] or y1 <= box["y"][0] or y0 >= box["y"][1]:
        raise nothing  # spatialdata's query asserts when nothing intersects
    out = bounding_box_query(view, axes=("x", "y"), min_coordinate=[x0, y0], max_coordinate=[x1, y1], target_coordinate_system=COORDINATE_SYSTEM)
    if out is None or any(key not in out.images for key in view.images):
        raise nothing
    for key in view.shapes:
        shapes = out.shapes[key] if key in out.shapes else view.shapes[key].iloc[:0]  # the query drops an element it empties
        c = shapes.geometry.centroid
        inside = ((c.x >= x0) & (c.x <= x1) & (c.y >= y0) & (c.y <= y1)).to_numpy()
        if not inside.any():
            raise InvalidInputError(f"No {key!r} lie within extent {extent} (x_min, x_max, y_min, y_max in px); choose a window that holds some.")
        if inside.all():
            continue
        out.shapes[key] = shapes[inside]
        for name, table in list(out.tables.items()):
            attrs = table.uns.get("spatialdata_attrs", {})
            if attrs.get("region") == key or key in np.atleast_1d(attrs.get("region", [])):
                keep = ~table.obs[attrs["region_key"]].astype(str).eq(key).to_numpy() | table.obs[attrs["instance_key"]].isin(shapes.index[inside]).to_numpy()
                out.tables[name] = table[keep].copy()
    return out


def view_limits(ax, extent, default) -> tuple[float, float, float, float]:
    """Set the view to ``extent`` (else ``default``, the whole image), y pointing down like the image; clip."""
    x0, x1, y0, y1 = extent if extent is not None else default
    ax.set_xlim(x0, x1)
    ax.set_ylim(y1, y0)
    ax.set_aspect("equal")
    for artist in ax.collections + ax.images + ax.patches:
        artist.set_clip_on(True)
        artist.set_clip_path(ax.patch)
    return x0, x1, y0, y1


def check_drawable(sdata: SpatialData, keys) -> None:
    """Refuse elements the plots cannot draw: every one must be in the ``global`` coordinate system they draw in."""
    for key in keys:
        check_in_global(
            sdata, key, "the plots draw in 'global' (spatialdata.transform(..., to_coordinate_system=...) keeps only the target "
            "system): plot the sample as read."
        )


def image_bounds(sdata: SpatialData, image_key: str) -> tuple[float, float, float, float]:
    """``(0, width, 0, height)`` of an image in ``global`` pixels."""
    box = get_extent(sdata.images[image_key], coordinate_system=COORDINATE_SYSTEM)
    return float(box["x"][0]), float(box["x"][1]), float(box["y"][0]), float(box["y"][1])


def round_length(length: float) -> float:
    """The largest 1, 2 or 5 × 10^k not above ``length`` (> 0)."""
    power = 10 ** math.floor(math.log10(length))
    return max(step * power for step in (1, 2, 5) if step * power <= length)


def scale_bar(ax, sdata: SpatialData, scale_bar_um, view: tuple[float, float, float, float]):
    """Add a µm scale bar (lower right) to an image plot in ``global`` pixels; None / False adds none.

    ``"auto"``: a round length (1, 2 or 5 × 10^k µm) of about a fifth of the view width; a number: that many µm.
    Needs ``sdata.attrs["mpp"]`` (µm per pixel).
    """
    if scale_bar_um is None or scale_bar_um is False:
        return None
    mpp = sdata.attrs.get("mpp")
    if mpp is None:
        if scale_bar_um == "auto":
            return None
        raise InvalidInputError('A scale bar needs the µm per pixel of the sample: sdata.attrs["mpp"] is not set.')
    mpp = float(mpp)
    if scale_bar_um == "auto":
        length_um = round_length((view[1] - view[0]) * mpp / 5)
    else:
        length_um = float(scale_bar_um)  # checked by check_look
    bar = AnchoredSizeBar(
        ax.transData, length_um / mpp, f"{length_um:g} µm", "lower right", pad=0.3, borderpad=0.6, sep=3, color="black",
        frameon=True, size_vertical=max((view[3] - view[2]) / 120, 1e-9), fontproperties={"size": 8},
    )
    bar.patch.set(facecolor="white", alpha=0.75, edgecolor="none")
    bar.set_label(SCALE_BAR_LABEL)
    bar.length_um = length_um
    ax.add_artist(bar)
    return bar


def category_colors(table, key: str, groups: Sequence[str], palette: Sequence[str] | None) -> list[str]:
    """Colours of ``groups`` (categories of ``table.obs[key]``).

    ``palette`` when given; else ``uns[f"{key}_colors"]``; else, per category, the colour it has in another
    ``uns["<column>_colors"]`` of the table (``cell_type`` first), so e.g. ``true_cell_type`` (written by
    :func:`~histocell_sd.tl.transfer_truth` without colours) matches the predictions; else unused package colours.
    """
    if palette is not None:
        if len(palette) < len(groups):
            raise InvalidInputError(f"palette has {len(palette)} colours for {len(groups)} categories of {key!r}.")
        return list(palette[: len(groups)])
    known: dict[str, str] = {}
    others = [CELL_TYPE_KEY] + sorted(k.removesuffix("_colors") for k in table.uns if k.endswith("_colors"))
    for name in [key] + others:
        stored = table.uns.get(f"{name}_colors")
        column = table.obs.get(name)
        if stored is None or column is None or not hasattr(column, "cat") or len(stored) != len(column.cat.categories):
            continue
        for category, colour in zip(column.cat.categories, stored):
            known.setdefault(str(category), str(colour))
        if name == key:
            break  # the column's own colours: nothing else is consulted
    spare = iter([c for c in PALETTE if c not in {known.get(str(g)) for g in groups}] + list(PALETTE) * (len(groups) // len(PALETTE) + 1))
    return [known[str(g)] if str(g) in known else next(spare) for g in groups]


def legend_outside(ax, handles, labels, title: str | None = None, below: bool = False):
    """A legend right of (or below) the axes, outside it: in a constrained layout it never covers data or a neighbour."""
    if below:
        long = max((len(str(label)) for label in labels), default=0) > 16
        placement = {"loc": "upper center", "bbox_to_anchor": (0.5, -0.09), "ncols": 1 if long else min(3, len(labels))}
    else:
        placement = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)}
    return ax.legend(handles, labels, title=title, borderaxespad=0.0, frameon=False, fontsize=8, title_fontsize=8, **placement)
