"""Refinement's composition EM (proportions prior) and the count-respecting assignment of nuclei to types."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from ..._utils import progress_bar
from .poisson import nucleus_posterior
from .squarem import squarem

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
    """MAP-EM of the spot compositions; returns ``π`` (spots × types), ``q`` (nuclei × types), EM steps.

    With ``recalibrate`` the expression proportions are also reweighted by a slide-wide factor per
    type, ``e_s ∝ b ∘ e_s``, fitted so that the expression view's type totals match the nucleus
    posteriors' (a deconvolution's bias, e.g. from RNA content, is shared by all spots). Accelerated by
    SQUAREM (:func:`.squarem.squarem`): the same fixed point in fewer steps.
    """
    inside = spot_of >= 0
    rows, observed, members = spot_of[inside], likelihood[inside], members[:, np.flatnonzero(inside)]
    empty, recalibrating = n_nuclei == 0, recalibrate and n_nuclei.sum() > 0
    weight = np.maximum(strength + n_nuclei, _EPS)[:, None]

    def reweighted(log_bias: np.ndarray) -> np.ndarray:
        out = E * np.exp(log_bias)
        return out / out.sum(axis=1, keepdims=True)

    def em_step(pi: np.ndarray, log_bias: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        posterior_counts = members @ nucleus_posterior(observed, pi[rows])
        if recalibrating:
            expected = np.maximum((n_nuclei[:, None] * reweighted(log_bias)).sum(axis=0), _EPS)
            log_bias = log_bias + np.log(np.maximum(posterior_counts.sum(axis=0), 1e-300) / expected)
            log_bias = log_bias - np.log(np.exp(log_bias).mean())
        prior = reweighted(log_bias)
        new = (strength * prior + posterior_counts) / weight
        new[empty] = prior[empty]
        return new, log_bias

    pi, n_iter, _ = squarem(em_step, E.copy(), np.zeros(E.shape[1]), max_iter, tol)
    pi = np.maximum(pi, 0)
    pi /= pi.sum(axis=1, keepdims=True)
    Q = np.zeros_like(likelihood)
    Q[inside] = nucleus_posterior(observed, pi[rows])
    return pi, Q, n_iter


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
