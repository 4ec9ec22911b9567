"""Refinement's composition EM (proportions prior) and the count-respecting assignment of nuclei to types."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from ..._utils import progress_bar

__all__ = ["assign_nuclei", "composition_em_proportions", "expression_matrix", "largest_remainder"]

_EPS = 1e-9


def largest_remainder(fractions: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total`` closest to ``total · fractions`` (Hamilton's method).

    Ties in the remainders go to the earlier column, so the result is deterministic.
    """
    fractions = np.asarray(fractions, dtype=np.float64)
    quota = fractions / fractions.sum() * total
    counts = np.floor(quota + 1e-12).astype(np.int64)
    left = int(total - counts.sum())
    if left > 0:
        order = np.lexsort((np.arange(len(quota)), -(quota - counts)))
        counts[order[:left]] += 1
    return counts


def expression_matrix(expression: pd.DataFrame, types: list[str], members, P: np.ndarray, n_nuclei: np.ndarray) -> np.ndarray:
    """Expression proportions in ``types`` order; types missing there filled from the image."""
    missing = [t for t in types if t not in expression.columns]
    E = expression.reindex(columns=types, fill_value=0.0).to_numpy(dtype=np.float64)
    if missing:
        cols = [types.index(t) for t in missing]
        image_mean = np.asarray(members @ P) / np.maximum(n_nuclei, 1)[:, None]
        fill = image_mean[:, cols]
        E *= (1 - fill.sum(axis=1))[:, None]
        E[:, cols] = fill
    E = np.maximum(E, _EPS)
    return E / E.sum(axis=1, keepdims=True)


def composition_em_proportions(E, likelihood, spot_of, members, n_nuclei, strength, max_iter, tol, recalibrate=True):
    """MAP-EM of the spot compositions; returns ``π`` (spots × types), ``q`` (nuclei × types), iterations.

    With ``recalibrate`` the expression proportions are also reweighted by a slide-wide factor per
    type, ``e_s ∝ b ∘ e_s``, fitted so that the expression view's type totals match the nucleus
    posteriors' (a deconvolution's bias, e.g. from RNA content, is shared by all spots).
    """
    inside = spot_of >= 0
    base = E
    bias = np.ones(E.shape[1])
    pi = E.copy()
    Q = np.zeros_like(likelihood)
    n_iter = 0
    for n_iter in range(1, max_iter + 1):  # noqa: B007 (read after the loop)
        q = likelihood[inside] * pi[spot_of[inside]]
        q /= np.maximum(q.sum(axis=1, keepdims=True), 1e-300)
        Q[inside] = q
        posterior_counts = members @ Q
        if recalibrate and n_nuclei.sum() > 0:
            E = base * bias
            E /= E.sum(axis=1, keepdims=True)
            bias = bias * posterior_counts.sum(axis=0) / np.maximum((n_nuclei[:, None] * E).sum(axis=0), _EPS)
            bias /= bias.mean()
            E = base * bias
            E /= E.sum(axis=1, keepdims=True)
        new = (strength * E + posterior_counts) / np.maximum(strength + n_nuclei, _EPS)[:, None]
        new[n_nuclei == 0] = E[n_nuclei == 0]
        change = np.abs(new - pi).max() if len(pi) else 0.0
        pi = new
        if change < tol:
            break
    q = likelihood[inside] * pi[spot_of[inside]]
    Q[inside] = q / np.maximum(q.sum(axis=1, keepdims=True), 1e-300)
    pi = np.maximum(pi, 0)
    return pi / pi.sum(axis=1, keepdims=True), Q, n_iter


def assign_nuclei(Q: np.ndarray, spot_of: np.ndarray, n_nuclei: np.ndarray, pi: np.ndarray, progress: bool) -> np.ndarray:
    """Type codes of the nuclei inside spots: largest-remainder counts, optimal matching on -log q."""
    inside = np.flatnonzero(spot_of >= 0)
    order = inside[np.argsort(spot_of[inside], kind="stable")]
    bounds = np.flatnonzero(np.diff(spot_of[order])) + 1
    groups = np.split(order, bounds) if len(order) else []
    cost = -np.log(np.maximum(Q, 1e-300))
    out = np.empty(len(Q), dtype=np.int64)
    for group in progress_bar(groups, desc="assigning nuclei", disable=not progress):
        s = spot_of[group[0]]
        counts = largest_remainder(pi[s], len(group))
        slots = np.repeat(np.arange(len(counts)), counts)
        rows, cols = linear_sum_assignment(cost[np.ix_(group, slots)])
        out[group[rows]] = slots[cols]
    return out[inside]
