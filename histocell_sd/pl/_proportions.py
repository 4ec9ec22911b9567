"""Spot proportions over the H&E."""

from __future__ import annotations

import matplotlib.pyplot as plt
import spatialdata_plot  # noqa: F401  (registers the .pl accessor)
from matplotlib.cm import ScalarMappable
from spatialdata import SpatialData

from .._constants import COORDINATE_SYSTEM, IMAGE_KEY, PROPORTIONS_KEY, SPOTS_KEY, TABLE_KEY
from .._docs import inject_docs
from .._errors import InvalidInputError
from ..io import resolve_key
from ._utils import axes_or_new, check_drawable, check_extent, check_look, colorbar, crop, finish, image_bounds, norm, scale_bar, view_limits


@inject_docs
def spot_proportions(
    sdata: SpatialData,
    *,
    cell_type: str,
    proportions_key: str = PROPORTIONS_KEY,
    image_key: str | None = None,
    spots_key: str | None = None,
    spots_table_key: str | None = None,
    extent: tuple[float, float, float, float] | None = None,
    cmap: str = "viridis",
    vmin: float | None = 0.0,
    vmax: float | None = 1.0,
    fill_alpha: float = 0.8,
    colorbar_label: str | None = None,
    scale_bar_um: float | str | None = "auto",
    ax: plt.Axes | None = None,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    return_fig: bool = False,
):
    """Plot the H&E with spots coloured by one cell type's proportion (spatialdata-plot).

    The colour range is [0, 1] by default, so panels of different proportions (truth, deconvolution,
    prediction) side by side are comparable; the colorbar takes its room from ``ax``. For panels side by
    side, give axes of a figure with ``layout="constrained"`` (as the figures the plots create), so that
    a colorbar's ticks never reach into the neighbouring panel.

    Parameters
    ----------
    sdata
        Sample in the histocell-sd data model (read only).
    cell_type
        Column of ``obsm[proportions_key]`` to show.
    {proportions_key}
        E.g. ``"proportions"``, ``"true_proportions"`` or ``"histocell_proportions"``.
    {image_key}
    {spots_key}
    {spots_table_key}
    {extent}
    {cmap}
    {vmin}
        Default 0 (proportions).
    {vmax}
        Default 1 (proportions).
    fill_alpha
        Opacity of the spot fill.
    colorbar_label
        Label of the colorbar; None: ``f"{cell_type} proportion"``.
    {scale_bar_um}
    {ax}
    {title}
        Default ``f"{cell_type} ({proportions_key})"``.
    {figsize}
        Default (6, 5).
    {return_fig}

    Returns
    -------
    matplotlib.axes.Axes or matplotlib.figure.Figure
        The axes drawn on (its figure with ``return_fig=True``).
    """
    image_key = resolve_key(sdata, "images", key=image_key, default=IMAGE_KEY)
    spots_key = resolve_key(sdata, "shapes", key=spots_key, default=SPOTS_KEY)
    spots_table_key = resolve_key(sdata, "tables", key=spots_table_key, default=TABLE_KEY)
    extent = check_extent(extent)
    check_look(fill_alpha=fill_alpha, scale_bar_um=scale_bar_um)
    table = sdata.tables[spots_table_key]
    if proportions_key not in table.obsm:
        raise InvalidInputError(f"Table {spots_table_key!r} has no obsm[{proportions_key!r}]; it has {list(table.obsm)}.")
    proportions = table.obsm[proportions_key]
    if not isinstance(cell_type, str):
        raise InvalidInputError(f"cell_type must be one column name of obsm[{proportions_key!r}], got {cell_type!r}.")
    if cell_type not in proportions.columns:
        raise InvalidInputError(f"Unknown cell type {cell_type!r}; obsm[{proportions_key!r}] has {list(proportions.columns)}.")
    column = f"{proportions_key}.{cell_type}"
    values = proportions[cell_type].to_numpy(dtype=float)
    colours = norm(values, vmin, vmax)
    spots_table = table.copy()
    spots_table.obs[column] = values
    check_drawable(sdata, [image_key, spots_key])
    view = SpatialData(images={image_key: sdata.images[image_key]}, shapes={spots_key: sdata.shapes[spots_key]}, tables={spots_table_key: spots_table})
    bounds = image_bounds(sdata, image_key)
    if extent is not None:
        view = crop(view, extent)
    fig, ax = axes_or_new(ax, figsize or (6, 5))
    (
        view.pl.render_images(image_key)
        .pl.render_shapes(spots_key, color=column, cmap=cmap, norm=colours, fill_alpha=fill_alpha, table_name=spots_table_key, colorbar=False)
        .pl.show(coordinate_systems=COORDINATE_SYSTEM, ax=ax, title=title or f"{cell_type} ({proportions_key})", colorbar=False)
    )
    shown = view_limits(ax, extent, bounds)
    colorbar(fig, ScalarMappable(norm=colours, cmap=cmap), ax, colorbar_label or f"{cell_type} proportion")
    scale_bar(ax, sdata, scale_bar_um, shown)
    return finish(fig, ax, return_fig)
