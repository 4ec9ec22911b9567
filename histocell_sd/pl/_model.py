"""Plots of a trained model and its predictions: training curve, confusion matrix, proportions, overlay."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import spatialdata_plot  # noqa: F401  (registers the .pl accessor)
from matplotlib.patches import Patch
from spatialdata import SpatialData

from .._constants import CELL_TYPE_KEY, COORDINATE_SYSTEM, HISTOCELL_KEY, IMAGE_KEY, PREDICTED_PROPORTIONS_KEY
from .._docs import inject_docs
from .._errors import InvalidInputError
from ..io import resolve_key
from ..io._elements import annotated_shapes, segmented_image_key
from ..tl._prediction.evaluate import paired_labels
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
    new_figure,
    scale_bar,
    view_limits,
)


@inject_docs
def training_curve(
    model, *, ax: plt.Axes | None = None, title: str | None = None, figsize: tuple[float, float] | None = None, return_fig: bool = False
):
    """Training and validation loss per epoch (stages shaded), with the validation spot Pearson r.

    The validation loss and r are measured on the held-out spots; the r has its own y axis on the right, and
    one legend above the axes names all three curves.

    Parameters
    ----------
    model
        A fitted :class:`~histocell_sd.models.HistoCell` (reads ``model.history_``).
    {ax}
    {title}
        Default none.
    {figsize}
        Default (6, 3.8).
    {return_fig}

    Returns
    -------
    matplotlib.axes.Axes or matplotlib.figure.Figure
        The loss axes drawn on (the r axis is ``ax.r_axis``); its figure with ``return_fig=True``.
    """
    history = getattr(model, "history_", None)
    if history is None or history.empty:
        raise InvalidInputError("The model has no training history; fit it first.")
    history = history.reset_index(drop=True)
    fig, ax = axes_or_new(ax, figsize or (6, 3.8))
    x = np.arange(len(history))
    colours = sns.color_palette("tab10")
    lines = ax.plot(x, history["train_loss"], color=colours[0], label="train loss")
    lines += ax.plot(x, history["val_loss"], color=colours[1], label="validation loss")
    band = ax.get_xaxis_transform()  # x in data, y in axes fraction: labels stay inside whatever the losses
    for i, (stage, rows) in enumerate(history.groupby("stage", sort=False)):
        ax.axvspan(rows.index.min() - 0.5, rows.index.max() + 0.5, alpha=0.08, color=colours[(i + 2) % 10], lw=0)
        ax.text(rows.index.min() - 0.4, 0.97, str(stage), transform=band, va="top", ha="left", fontsize=8, color="0.3")
    twin = ax.twinx()
    lines += twin.plot(x, history["val_spot_pearson"], color="grey", ls="--", label="validation spot r")
    twin.set_ylabel("spot Pearson r")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_xlim(-0.5, len(history) - 0.5)
    ax.legend(lines, [line.get_label() for line in lines], loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=3, fontsize=8, frameon=False)
    if title:
        ax.set_title(title, pad=22)
    ax.r_axis = twin
    return finish(fig, ax, return_fig)


@inject_docs
def confusion_matrix(
    y_true,
    y_pred,
    *,
    labels: Sequence[str] | None = None,
    normalize: bool = True,
    cmap: str = "Blues",
    ax: plt.Axes | None = None,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    return_fig: bool = False,
):
    """Heatmap of true (rows) vs predicted (columns) labels, row-normalised by default; unknown truth skipped.

    Normalised matrices share the colour range [0, 1], so two of them side by side compare.

    Parameters
    ----------
    y_true
        True labels, missing (NaN / None) where unknown.
    y_pred
        Predicted labels of the same nuclei (two Series whose indexes hold the same nuclei are paired by index).
    labels
        Rows and columns, in order; default: every label occurring (sorted).
    normalize
        Divide each row by its total (the recall of each class on the diagonal).
    {cmap}
    {ax}
    {title}
        Default none.
    {figsize}
        Default: 0.75 in per label plus room for the labels.
    {return_fig}

    Returns
    -------
    matplotlib.axes.Axes or matplotlib.figure.Figure
        The axes drawn on (its figure with ``return_fig=True``).
    """
    y_true, y_pred = paired_labels(y_true, y_pred)
    known = y_true.notna().to_numpy()
    labels = list(labels) if labels is not None else sorted(set(y_true[known].astype(str)) | set(y_pred[known].astype(str)))
    table = pd.crosstab(pd.Categorical(y_true[known].astype(str), labels), pd.Categorical(y_pred[known].astype(str), labels), dropna=False)
    if not table.to_numpy().any():
        raise InvalidInputError(f"No nucleus has a known true label among {labels} with a prediction among them: nothing to show.")
    if normalize:
        table = table.div(table.sum(axis=1).replace(0, 1), axis=0)
    n = len(labels)
    fig, ax = axes_or_new(ax, figsize or (1.8 + 0.75 * n, 1.5 + 0.65 * n))
    sns.heatmap(
        table, annot=True, fmt=".2f" if normalize else "d", cmap=cmap, cbar=False, ax=ax, vmin=0, vmax=1 if normalize else None,
        square=True, linewidths=0.5, linecolor="white", annot_kws={"fontsize": 8 if n > 6 else 9},
    )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_xticklabels(ax.get_xticklabels(), rotation=40, ha="right", rotation_mode="anchor")
    ax.set_yticklabels(ax.get_yticklabels(), rotation=0)
    ax.tick_params(length=0)
    ax.set_title(title or "")
    return finish(fig, ax, return_fig)


@inject_docs
def predicted_vs_true(
    sdata: SpatialData,
    *,
    predicted_key: str = PREDICTED_PROPORTIONS_KEY,
    true_key: str = "true_proportions",
    spots_table_key: str | None = None,
    axes: Sequence[plt.Axes] | None = None,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    return_fig: bool = False,
):
    """One scatter per cell type: predicted vs true spot proportions with Pearson r.

    Every panel shows [0, 1] × [0, 1] with equal aspect and the diagonal, so the cell types compare.

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
        Matplotlib Axes to draw on, one per cell type (a sequence or array; the only plot that draws
        several panels); None: a new row of panels in a figure of ``figsize`` (constrained layout).
    title
        Title of the figure (above the panels, whose titles name the cell types); None: none.
    {figsize}
        Default 2.3 in per cell type by 2.6 in.
    {return_fig}

    Returns
    -------
    numpy.ndarray or matplotlib.figure.Figure
        The axes drawn on, one per cell type (their figure with ``return_fig=True``).
    """
    table = sdata.tables[resolve_key(sdata, "tables", key=spots_table_key, default="table")]
    for key in (predicted_key, true_key):
        if key not in table.obsm:
            raise InvalidInputError(f"The spots table has no obsm[{key!r}].")
    predicted = table.obsm[predicted_key]
    missing = [c for c in predicted.columns if c not in table.obsm[true_key].columns]
    if missing:
        raise InvalidInputError(f"obsm[{true_key!r}] has no columns {missing}.")
    true = table.obsm[true_key].reindex(columns=predicted.columns)
    keep = predicted.notna().all(axis=1).to_numpy()
    n = len(predicted.columns)
    if axes is None:
        fig, grid = new_figure(figsize or (2.3 * n, 2.6), 1, n, sharex=True, sharey=True)
        axes = grid[0]
    else:
        axes = np.asarray(axes, dtype=object).ravel()
        if len(axes) < n or not all(isinstance(a, plt.Axes) for a in axes):
            raise InvalidInputError(f"axes must hold one matplotlib Axes per cell type ({n}), got {len(axes)}.")
        fig = axes[0].figure
    for ax, column in zip(axes, predicted.columns):
        x, y = true[column].to_numpy()[keep], predicted[column].to_numpy()[keep]
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, zorder=1)
        ax.scatter(x, y, s=8, alpha=0.6, zorder=2, clip_on=False)
        r = np.corrcoef(x, y)[0, 1] if x.std() > 0 and y.std() > 0 else np.nan
        ax.set_title(f"{column}\nr = {r:.2f}", fontsize=9)
        ax.set_xlim(-0.03, 1.03)
        ax.set_ylim(-0.03, 1.03)
        ax.set_aspect("equal", adjustable="box")
        ax.set_xticks([0, 0.5, 1])
        ax.set_yticks([0, 0.5, 1])
        ax.set_xlabel("true")
    axes[0].set_ylabel("predicted")
    if title:
        fig.suptitle(title)
    finish(fig, axes[0], False)
    return fig if return_fig else axes[:n]


@inject_docs
def cell_types(
    sdata: SpatialData,
    *,
    color: str = CELL_TYPE_KEY,
    nuclei_table_key: str = HISTOCELL_KEY,
    nuclei_key: str | None = None,
    image_key: str | None = None,
    extent: tuple[float, float, float, float] | None = None,
    palette: Sequence[str] | None = None,
    groups: Sequence[str] | None = None,
    fill_alpha: float = 0.75,
    outline_width: float = 0.6,
    scale_bar_um: float | str | None = "auto",
    ax: plt.Axes | None = None,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    return_fig: bool = False,
):
    """Nuclei coloured by a column of the nuclei table (predicted cell type by default) over the H&E.

    The colours are the ones stored with the predictions (``uns[f"{color}_colors"]``, the package palette
    that stays visible on hematoxylin and eosin), the same in every plot and in spatialdata-plot; the
    legend sits right of the axes.

    Parameters
    ----------
    sdata
        The sample (read only).
    color
        ``obs`` column of the nuclei table to colour by (categorical), e.g. ``"cell_state"``.
    {nuclei_table_key}
    {nuclei_key}
        None: the shapes element the nuclei table annotates.
    {image_key}
    {extent}
    palette
        Colours of the categories in order; default: ``uns[f"{color}_colors"]`` of the nuclei table
        (the colours :func:`~histocell_sd.tl.predict` stores), else the package palette.
    groups
        Categories to draw (the others are not drawn); default: all.
    fill_alpha
        Opacity of the nucleus fill.
    outline_width
        Width of the dark outline of each nucleus (points); 0: none.
    {scale_bar_um}
    {ax}
    {title}
        Default ``color``.
    {figsize}
        Default (6.5, 5).
    {return_fig}

    Returns
    -------
    matplotlib.axes.Axes or matplotlib.figure.Figure
        The axes drawn on (its figure with ``return_fig=True``).
    """
    extent = check_extent(extent)
    check_look(fill_alpha=fill_alpha, scale_bar_um=scale_bar_um)
    if nuclei_table_key not in sdata.tables:
        raise InvalidInputError(f"No table {nuclei_table_key!r}; it has {list(sdata.tables)}.")
    image_key = resolve_key(sdata, "images", key=segmented_image_key(sdata, sdata.tables[nuclei_table_key], image_key), default=IMAGE_KEY)
    if color not in sdata.tables[nuclei_table_key].obs:
        raise InvalidInputError(f"No obs[{color!r}] in table {nuclei_table_key!r}; run hc.tl.predict first.")
    nuclei_key = annotated_shapes(sdata, nuclei_table_key, nuclei_key)
    table = sdata.tables[nuclei_table_key]
    column = table.obs[color]
    if not hasattr(column, "cat"):
        raise InvalidInputError(f"obs[{color!r}] of table {nuclei_table_key!r} must be categorical.")
    categories = [str(c) for c in column.cat.categories]
    shown = categories if groups is None else [str(g) for g in groups]
    unknown = sorted(set(shown) - set(categories))
    if unknown:
        raise InvalidInputError(f"Unknown groups {unknown}; obs[{color!r}] has {categories}.")
    colours = dict(zip(categories, category_colors(table, color, categories, palette)))
    check_drawable(sdata, [image_key, nuclei_key])
    view = SpatialData(images={image_key: sdata.images[image_key]}, shapes={nuclei_key: sdata.shapes[nuclei_key]}, tables={nuclei_table_key: table})
    bounds = image_bounds(sdata, image_key)
    if extent is not None:
        view = crop(view, extent)
    fig, ax = axes_or_new(ax, figsize or (6.5, 5))
    present = set(view.tables[nuclei_table_key].obs[color].dropna().astype(str))
    drawn = [g for g in shown if g in present]
    render = view.pl.render_images(image_key)
    if drawn:
        render = render.pl.render_shapes(
            nuclei_key, color=color, table_name=nuclei_table_key, groups=drawn, palette=[colours[g] for g in drawn],
            fill_alpha=fill_alpha, outline_width=outline_width or None, outline_color="#202020" if outline_width else None,
            outline_alpha=0.9 if outline_width else None, na_color=None,
        )
    render.pl.show(coordinate_systems=COORDINATE_SYSTEM, ax=ax, title=title or color, legend_loc=None, colorbar=False)
    limits = view_limits(ax, extent, bounds)
    handles = [Patch(facecolor=colours[g], edgecolor="#202020", linewidth=0.6, label=g) for g in shown]
    legend_outside(ax, handles, shown, title=color)
    scale_bar(ax, sdata, scale_bar_um, limits)
    return finish(fig, ax, return_fig)
