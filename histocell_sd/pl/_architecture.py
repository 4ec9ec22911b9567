"""Tissue niches over the H&E."""

from __future__ import annotations

import matplotlib.pyplot as plt
import spatialdata_plot  # noqa: F401  (registers the .pl accessor)
from matplotlib.patches import Patch
from spatialdata import SpatialData

from .._constants import COORDINATE_SYSTEM, HISTOCELL_KEY, IMAGE_KEY, PALETTE
from .._docs import inject_docs
from .._errors import InvalidInputError
from ..io import resolve_key
from ._utils import (
    axes_or_new,
    category_colors,
    check_drawable,
    check_extent,
    check_look,
    crop,
    finish,
    image_bounds,
    legend_outside,
    scale_bar,
    view_limits,
)


@inject_docs
def niches(
    sdata: SpatialData,
    *,
    niche_key: str = "niche",
    image_key: str | None = None,
    nuclei_table_key: str = HISTOCELL_KEY,
    extent: tuple[float, float, float, float] | None = None,
    fill_alpha: float = 0.45,
    palette: list[str] | None = None,
    scale_bar_um: float | str | None = "auto",
    ax: plt.Axes | None = None,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    return_fig: bool = False,
):
    """Plot the niche regions of :func:`histocell_sd.tl.tissue_architecture` over the H&E.

    Parameters
    ----------
    sdata
        Sample holding the shapes element ``f"{niche_key}_regions"`` (and an H&E image, drawn when
        present); read only.
    niche_key
        The ``key_added`` used by :func:`~histocell_sd.tl.tissue_architecture`: the regions
        ``f"{niche_key}_regions"`` and their niche column ``niche_key`` are drawn.
    {image_key}
        None draws no image when the sample has none.
    {nuclei_table_key}
        Its ``uns[f"{niche_key}_colors"]``, when present, colours the niches.
    {extent}
    fill_alpha
        Opacity of the region fill.
    palette
        Colours of the niches, in category order; default: ``uns[f"{niche_key}_colors"]`` of the nuclei
        table, else the package palette (visible on H&E).
    {scale_bar_um}
    {ax}
    {title}
        Default ``f"{niche_key} regions"``.
    {figsize}
        Default (5, 5.2).
    {return_fig}

    Returns
    -------
    matplotlib.axes.Axes or matplotlib.figure.Figure
        The axes drawn on (its figure with ``return_fig=True``).
    """
    regions_key = f"{niche_key}_regions"
    if regions_key not in sdata.shapes:
        raise InvalidInputError(f"No shapes element {regions_key!r}: run tl.tissue_architecture(sdata, key_added={niche_key!r}) first.")
    extent = check_extent(extent)
    check_look(fill_alpha=fill_alpha, scale_bar_um=scale_bar_um)
    regions = sdata.shapes[regions_key]
    if niche_key not in regions:
        raise InvalidInputError(f"The shapes element {regions_key!r} has no column {niche_key!r}.")
    column = regions[niche_key]
    names = [str(c) for c in column.cat.categories] if hasattr(column, "cat") else sorted(column.astype(str).unique())
    table = sdata.tables.get(nuclei_table_key)
    if table is not None and niche_key in table.obs and palette is None:
        colours = category_colors(table, niche_key, names, None)
    else:
        if palette is not None and len(palette) < len(names):
            raise InvalidInputError(f"palette has {len(palette)} colours for {len(names)} niches.")
        colours = list(palette[: len(names)]) if palette is not None else [PALETTE[i % len(PALETTE)] for i in range(len(names))]
    images = {}
    if sdata.images:
        image_key = resolve_key(sdata, "images", key=image_key, default=IMAGE_KEY)
        images[image_key] = sdata.images[image_key]
    check_drawable(sdata, [*images, regions_key])
    view = SpatialData(images=images, shapes={regions_key: regions})
    if images:
        bounds = image_bounds(sdata, image_key)
    else:
        x0, y0, x1, y1 = regions.total_bounds
        bounds = (float(x0), float(x1), float(y0), float(y1))
    if extent is not None and images:  # regions are large: keep them whole, the view limits show the window
        view = SpatialData(images=dict(crop(SpatialData(images=images), extent).images), shapes={regions_key: regions})
    fig, ax = axes_or_new(ax, figsize or (5, 5.2))
    render = view.pl.render_images(image_key) if images else view.pl
    render = render.pl.render_shapes(regions_key, color=niche_key, fill_alpha=fill_alpha, outline_alpha=1.0, groups=names, palette=colours)
    render.pl.show(ax=ax, coordinate_systems=COORDINATE_SYSTEM, title=title or f"{niche_key} regions", legend_loc=None, colorbar=False)
    limits = view_limits(ax, extent, bounds)
    legend_outside(ax, [Patch(facecolor=c, alpha=max(fill_alpha, 0.6), edgecolor="black", linewidth=0.6) for c in colours], names, title=niche_key, below=True)
    scale_bar(ax, sdata, scale_bar_um, limits)
    return finish(fig, ax, return_fig)
