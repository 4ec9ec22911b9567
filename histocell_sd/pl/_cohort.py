"""Cohort plots: Kaplan–Meier curves at a median split and example crops of a screened population."""

from __future__ import annotations

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from .._docs import inject_docs
from .._errors import InvalidInputError
from ._utils import axes_or_new, finish, legend_outside

__all__ = ["kaplan_meier", "screen_crops"]


@inject_docs
def kaplan_meier(
    indicators: ad.AnnData | pd.DataFrame,
    *,
    indicator: str,
    duration_key: str = "duration",
    event_key: str = "event",
    clinical: pd.DataFrame | None = None,
    ax: plt.Axes | None = None,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    return_fig: bool = False,
):
    """Kaplan–Meier curves of the samples above / at-or-below the median of an indicator.

    The title gives the log-rank p of the two groups (lifelines).

    Parameters
    ----------
    indicators
        Samples × indicators (clinical columns in ``obs``) or a DataFrame with both.
    indicator
        The indicator to split on.
    duration_key, event_key
        Clinical columns of follow-up time and event.
    clinical
        Clinical DataFrame indexed by sample id, used instead of ``indicators.obs``.
    {ax}
    {title}
        Default: the indicator; the log-rank p is added below it.
    {figsize}
        Default (5.8, 3.5); the legend is right of the axes.
    {return_fig}

    Returns
    -------
    matplotlib.axes.Axes or matplotlib.figure.Figure
        The axes drawn on, ``ax.logrank_p`` holding the p-value (its figure with ``return_fig=True``).
    """
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import logrank_test

    from ..tl._cohort.stats import _cohort_frame, survival_columns

    values, clin = _cohort_frame(indicators, [duration_key, event_key], clinical, [indicator])
    x = values[indicator]
    ok = x.notna().to_numpy()
    x, clin = x[ok], clin[ok]
    high = (x > x.median()).to_numpy()
    if high.all() or not high.any():
        raise InvalidInputError(f"Indicator {indicator!r} cannot be split at its median (too few distinct values).")
    duration, event = survival_columns(clin, duration_key, event_key)
    fig, ax = axes_or_new(ax, figsize or (5.8, 3.5))
    for mask, label, color in ((~high, "≤ median", "tab:blue"), (high, "> median", "tab:red")):
        KaplanMeierFitter(label=f"{label} (n={mask.sum()})").fit(duration[mask], event[mask]).plot_survival_function(ax=ax, ci_show=True, color=color)
    p = logrank_test(duration[high], duration[~high], event[high], event[~high]).p_value
    ax.set_title(f"{title or indicator}\nlog-rank p = {p:.2g}", fontsize=9)
    ax.set_xlabel(duration_key)
    ax.set_ylabel("survival probability")
    ax.set_ylim(0, 1.05)
    handles, labels = ax.get_legend_handles_labels()
    legend_outside(ax, handles, labels)
    ax.logrank_p = float(p)
    return finish(fig, ax, return_fig)


@inject_docs
def screen_crops(
    result,
    *,
    n: int = 8,
    ax: plt.Axes | None = None,
    title: str | None = None,
    figsize: tuple[float, float] | None = None,
    return_fig: bool = False,
):
    """Show the example crops of the top population of a :func:`~histocell_sd.tl.screen_phenotype` result.

    Parameters
    ----------
    result
        A :class:`~histocell_sd.tl.PhenotypeScreen` with crops.
    n
        Number of crops shown (side by side).
    {ax}
    {title}
        Default: the population, its dominant cell state and p.
    {figsize}
        Default 1.2 in per crop by 1.6 in.
    {return_fig}

    Returns
    -------
    matplotlib.axes.Axes or matplotlib.figure.Figure
        The axes drawn on (its figure with ``return_fig=True``).
    """
    if not all(hasattr(result, name) for name in ("crops", "table")):
        raise InvalidInputError(f"result must be what tl.screen_phenotype returns, got {type(result).__name__}.")
    if result.crops is None:
        raise InvalidInputError("The screen has no crops (the samples have no image).")
    crops = result.crops[:n]
    row = result.table.iloc[0]
    if n < 1:
        raise InvalidInputError(f"n must be at least 1, got {n!r}.")
    fig, ax = axes_or_new(ax, figsize or (max(1.2 * len(crops), 3.0), 1.6))
    ax.imshow(np.concatenate(list(crops), axis=1))
    ax.set_axis_off()
    ax.set_title(title or f"{result.top}: {row['dominant_cell_state']} (p = {row['p']:.2g})", fontsize=9)
    return finish(fig, ax, return_fig)
