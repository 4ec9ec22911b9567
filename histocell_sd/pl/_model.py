"""Plots of a trained model and its predictions: training curve, confusion matrix, proportions, overlay."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import spatialdata_plot  # noqa: F401  (registers the .pl accessor)
from spatialdata import SpatialData, bounding_box_query

from .._constants import CELL_TYPE_KEY, HISTOCELL_KEY, IMAGE_KEY, NUCLEI_KEY, PREDICTED_PROPORTIONS_KEY
from .._docs import inject_docs
from .._errors import InvalidInputError
from ..io import resolve_key


def training_curve(model, *, ax: plt.Axes | None = None) -> plt.Axes:
    """Training and validation loss per epoch (stages shaded), with the validation spot Pearson r.

    Parameters
    ----------
    model
        A fitted :class:`~histocell_sd.models.HistoCell` (reads ``model.history_``).
    ax
        Axes to draw on (a new figure otherwise).

    Returns
    -------
    matplotlib.axes.Axes
        The axes drawn on.
    """
    if model.history_ is None or model.history_.empty:
        raise InvalidInputError("The model has no training history; fit it first.")
    history = model.history_.reset_index(drop=True)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    x = np.arange(len(history))
    ax.plot(x, history["train_loss"], label="train loss")
    ax.plot(x, history["val_loss"], label="validation loss (held-out spots)")
    for stage, rows in history.groupby("stage", sort=False):
        ax.axvspan(rows.index.min() - 0.5, rows.index.max() + 0.5, alpha=0.08, color=sns.color_palette()[len(ax.patches) % 10])
        ax.text(rows.index.min(), ax.get_ylim()[1], stage, va="top", fontsize=8)
    twin = ax.twinx()
    twin.plot(x, history["val_spot_pearson"], color="grey", ls="--", label="validation spot r")
    twin.set_ylabel("spot Pearson r")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend(loc="center right", fontsize=8)
    return ax


def confusion_matrix(
    y_true, y_pred, *, labels: Sequence[str] | None = None, normalize: bool = True, ax: plt.Axes | None = None, title: str | None = None
) -> plt.Axes:
    """Heatmap of true (rows) vs predicted (columns) labels, row-normalised by default; unknown truth skipped.

    Parameters
    ----------
    y_true
        True labels, missing (NaN / None) where unknown.
    y_pred
        Predicted labels, same length.
    labels
        Rows and columns, in order; default: every label occurring (sorted).
    normalize
        Divide each row by its total (the recall of each class on the diagonal).
    ax, title
        Axes to draw on (a new figure otherwise) and its title.

    Returns
    -------
    matplotlib.axes.Axes
        The axes drawn on.
    """
    y_true, y_pred = pd.Series(y_true, dtype=object), pd.Series(y_pred, dtype=object)
    known = y_true.notna().to_numpy()
    labels = list(labels) if labels is not None else sorted(set(y_true[known].astype(str)) | set(y_pred[known].astype(str)))
    table = pd.crosstab(pd.Categorical(y_true[known].astype(str), labels), pd.Categorical(y_pred[known].astype(str), labels), dropna=False)
    if normalize:
        table = table.div(table.sum(axis=1).replace(0, 1), axis=0)
    if ax is None:
        _, ax = plt.subplots(figsize=(1 + 0.8 * len(labels), 0.8 + 0.7 * len(labels)))
    sns.heatmap(table, annot=True, fmt=".2f" if normalize else "d", cmap="Blues", cbar=False, ax=ax, vmin=0)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "")
    return ax


@inject_docs
def predicted_vs_true(
    sdata: SpatialData,
    *,
    predicted_key: str = PREDICTED_PROPORTIONS_KEY,
    true_key: str = "true_proportions",
    spots_table_key: str | None = None,
    axes=None,
):
    """One scatter per cell type: predicted vs true spot proportions with Pearson r.

    Parameters
    ----------
    sdata
        The sample (read only).
    predicted_key
        ``obsm`` key of the predicted spot proportions in the spots table (e.g. written by
        :func:`~histocell_sd.tl.predict`); spots with NaN rows are skipped.
    true_key
        ``obsm`` key of the true spot proportions.
    {spots_table_key}
    axes
        One axes per cell type (a new row of subplots otherwise).

    Returns
    -------
    numpy.ndarray or matplotlib.axes.Axes
        The axes drawn on.
    """
    table = sdata.tables[resolve_key(sdata, "tables", key=spots_table_key, default="table")]
    for key in (predicted_key, true_key):
        if key not in table.obsm:
            raise InvalidInputError(f"The spots table has no obsm[{key!r}].")
    predicted = table.obsm[predicted_key]
    true = table.obsm[true_key].reindex(columns=predicted.columns)
    keep = predicted.notna().all(axis=1).to_numpy()
    if axes is None:
        _, axes = plt.subplots(1, len(predicted.columns), figsize=(2.6 * len(predicted.columns), 2.6), sharex=True, sharey=True)
    for ax, column in zip(np.atleast_1d(axes), predicted.columns):
        x, y = true[column].to_numpy()[keep], predicted[column].to_numpy()[keep]
        ax.scatter(x, y, s=8, alpha=0.6)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8)
        r = np.corrcoef(x, y)[0, 1] if x.std() > 0 and y.std() > 0 else np.nan
        ax.set_title(f"{column}\nr = {r:.2f}", fontsize=9)
        ax.set_xlabel("true")
    np.atleast_1d(axes)[0].set_ylabel("predicted")
    return axes


@inject_docs
def cell_types(
    sdata: SpatialData,
    *,
    color: str = CELL_TYPE_KEY,
    nuclei_table_key: str = HISTOCELL_KEY,
    nuclei_key: str = NUCLEI_KEY,
    image_key: str | None = None,
    extent: tuple[float, float, float, float] | None = None,
    palette: Sequence[str] | None = None,
    ax: plt.Axes | None = None,
    title: str | None = None,
) -> plt.Axes:
    """Nuclei coloured by a column of the nuclei table (predicted cell type by default) over the H&E.

    Parameters
    ----------
    sdata
        The sample (read only).
    color
        ``obs`` column of the nuclei table to colour by (categorical), e.g. ``"cell_state"``.
    {nuclei_table_key}
    {nuclei_key}
    {image_key}
    extent
        ``(x_min, x_max, y_min, y_max)`` in pixels: crops the view (recommended on whole slides).
    palette
        Colours of the categories in order; default: ``uns[f"{color}_colors"]`` of the nuclei table
        (the colours :func:`~histocell_sd.tl.predict` stores), else tab10.
    ax, title
        Axes to draw on (a new figure otherwise) and its title.

    Returns
    -------
    matplotlib.axes.Axes
        The axes drawn on.
    """
    image_key = resolve_key(sdata, "images", key=image_key, default=IMAGE_KEY)
    if nuclei_table_key not in sdata.tables or color not in sdata.tables[nuclei_table_key].obs:
        raise InvalidInputError(f"No obs[{color!r}] in table {nuclei_table_key!r}; run hc.tl.predict first.")
    view = SpatialData(
        images={image_key: sdata.images[image_key]},
        shapes={nuclei_key: sdata.shapes[nuclei_key]},
        tables={nuclei_table_key: sdata.tables[nuclei_table_key]},
    )
    if extent is not None:
        x0, x1, y0, y1 = extent
        view = bounding_box_query(view, axes=("x", "y"), min_coordinate=[x0, y0], max_coordinate=[x1, y1], target_coordinate_system="global")
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 6))
    categories = view.tables[nuclei_table_key].obs[color]
    groups = list(categories.cat.categories) if hasattr(categories, "cat") else None
    stored = sdata.tables[nuclei_table_key].uns.get(f"{color}_colors")
    if palette is not None:
        colours = list(palette)
    elif groups and stored is not None and len(stored) == len(sdata.tables[nuclei_table_key].obs[color].cat.categories):
        full = dict(zip(sdata.tables[nuclei_table_key].obs[color].cat.categories, stored))  # the colours tl.predict stored
        colours = [full[g] for g in groups]
    else:
        colours = sns.color_palette("tab10", len(groups)).as_hex() if groups else None
    (
        view.pl.render_images(image_key)
        .pl.render_shapes(nuclei_key, color=color, table_name=nuclei_table_key, fill_alpha=0.7, groups=groups, palette=colours)
        .pl.show(coordinate_systems="global", ax=ax, title=title or color)
    )
    return ax
