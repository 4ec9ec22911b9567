"""Tissue niches over the H&E."""

from __future__ import annotations

import matplotlib.pyplot as plt
import spatialdata_plot  # noqa: F401  (registers the .pl accessor)
from spatialdata import SpatialData

from .._constants import IMAGE_KEY
from .._docs import inject_docs
from .._errors import InvalidInputError
from ..io import resolve_key


@inject_docs
def niches(
    sdata: SpatialData,
    *,
    niche_key: str = "niche",
    image_key: str | None = None,
    fill_alpha: float = 0.45,
    palette: list[str] | None = None,
    ax: plt.Axes | None = None,
    title: str | None = None,
    figsize: tuple[float, float] = (5, 4.5),
) -> plt.Axes:
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
    fill_alpha
        Opacity of the region fill.
    palette
        Colours of the niches, in category order.
    ax, title, figsize
        Matplotlib options.

    Returns
    -------
    matplotlib.axes.Axes
        The axes drawn on.
    """
    regions_key = f"{niche_key}_regions"
    if regions_key not in sdata.shapes:
        raise InvalidInputError(f"No shapes element {regions_key!r}: run tl.tissue_architecture(sdata, key_added={niche_key!r}) first.")
    regions = sdata.shapes[regions_key]
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    images = {}
    if sdata.images:
        image_key = resolve_key(sdata, "images", key=image_key, default=IMAGE_KEY)
        images[image_key] = sdata.images[image_key]
    view = SpatialData(images=images, shapes={regions_key: regions})
    if images:
        view = view.pl.render_images(image_key)
    if palette is not None and len(palette) < len(regions):
        raise InvalidInputError(f"palette has {len(palette)} colours for {len(regions)} niches.")
    view = view.pl.render_shapes(
        regions_key, color=niche_key, fill_alpha=fill_alpha, outline_alpha=1.0, palette=palette[: len(regions)] if palette else None
    )
    view.pl.show(ax=ax, coordinate_systems="global", title=title or f"{niche_key} regions")
    return ax
