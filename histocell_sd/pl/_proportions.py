"""Spot proportions over the H&E."""

from __future__ import annotations

import matplotlib.pyplot as plt
import spatialdata_plot  # noqa: F401  (registers the .pl accessor)
from spatialdata import SpatialData

from .._constants import IMAGE_KEY, PROPORTIONS_KEY, SPOTS_KEY, TABLE_KEY
from .._docs import inject_docs
from .._errors import InvalidInputError
from ..io import resolve_key


@inject_docs
def spot_proportions(
    sdata: SpatialData,
    *,
    cell_type: str,
    proportions_key: str = PROPORTIONS_KEY,
    image_key: str | None = None,
    spots_key: str | None = None,
    spots_table_key: str | None = None,
    cmap: str = "viridis",
    ax: plt.Axes | None = None,
    title: str | None = None,
) -> plt.Axes:
    """Plot the H&E with spots coloured by one cell type's proportion (spatialdata-plot).

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
    cmap, ax, title
        Matplotlib options.

    Returns
    -------
    matplotlib.axes.Axes
        The axes drawn on.
    """
    image_key = resolve_key(sdata, "images", key=image_key, default=IMAGE_KEY)
    spots_key = resolve_key(sdata, "shapes", key=spots_key, default=SPOTS_KEY)
    spots_table_key = resolve_key(sdata, "tables", key=spots_table_key, default=TABLE_KEY)
    table = sdata.tables[spots_table_key]
    if proportions_key not in table.obsm:
        raise InvalidInputError(f"Table {spots_table_key!r} has no obsm[{proportions_key!r}]; it has {list(table.obsm)}.")
    proportions = table.obsm[proportions_key]
    if cell_type not in proportions.columns:
        raise InvalidInputError(f"Unknown cell type {cell_type!r}; obsm[{proportions_key!r}] has {list(proportions.columns)}.")
    column = f"{proportions_key}.{cell_type}"
    view = SpatialData(
        images={image_key: sdata.images[image_key]},
        shapes={spots_key: sdata.shapes[spots_key]},
        tables={spots_table_key: table.copy()},
    )
    view.tables[spots_table_key].obs[column] = proportions[cell_type].to_numpy()
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 6))
    (
        view.pl.render_images(image_key)
        .pl.render_shapes(spots_key, color=column, cmap=cmap, fill_alpha=0.8, table_name=spots_table_key)
        .pl.show(coordinate_systems="global", ax=ax, title=title or f"{cell_type} ({proportions_key})")
    )
    return ax
