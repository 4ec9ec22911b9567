"""SQUAREM: extrapolated EM for the spot compositions (Varadhan & Roland 2008, scheme S3)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["squarem"]

_TINY = 1e-300

EMStep = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def squarem(em_step: EMStep, pi: np.ndarray, log_scale: np.ndarray, max_iter: int, tol: float) -> tuple[np.ndarray, int, float]:
    """Run ``em_step`` to its fixed point with SQUAREM extrapolation.

    ``em_step(π, log_scale)`` maps spot compositions (rows on the simplex) and a vector of slide-wide
    log factors to their next values. Each cycle takes two EM steps, extrapolates along them (``π`` in
    the simplex, the factors on the log scale; the step is halved towards plain EM until every fraction
    stays non-negative) and takes one EM step from there; the cycle keeps plain EM's two steps when that
    step moves more than the first one did. Converged when an EM step changes ``π`` by less than ``tol``.

    Returns
    -------
    tuple
        ``π``, the EM steps taken and the change of the last one (``max |Δπ|``).
    """
    n_iter, change = 0, np.inf
    state = (pi, log_scale)
    while n_iter < max_iter:
        first = em_step(*state)
        n_iter, first_change = n_iter + 1, _max_change(first[0], state[0])
        if first_change < tol or n_iter == max_iter:
            return first[0], n_iter, first_change
        second = em_step(*first)
        n_iter, change = n_iter + 1, _max_change(second[0], first[0])
        if change < tol or n_iter == max_iter:
            return second[0], n_iter, change
        r = [a - b for a, b in zip(first, state)]
        v = [c - 2 * a + b for c, a, b in zip(second, first, state)]
        alpha = -np.sqrt(sum(float((x**2).sum()) for x in r) / max(sum(float((x**2).sum()) for x in v), _TINY))
        alpha = min(alpha, -1.0)
        while True:  # alpha = -1 is the second EM step, always feasible
            jump = [s - 2 * alpha * a + alpha**2 * b for s, a, b in zip(state, r, v)]
            if alpha == -1.0 or jump[0].min() >= 0:
                break
            alpha = min((alpha - 1.0) / 2, -1.0) if alpha < -1.01 else -1.0
        if alpha == -1.0:
            state = second
            continue
        jump[0] /= np.maximum(jump[0].sum(axis=1, keepdims=True), _TINY)
        third = em_step(*jump)
        n_iter, change = n_iter + 1, _max_change(third[0], jump[0])
        state = third if change <= first_change else second
        if state is third and change < tol:
            return third[0], n_iter, change
    return state[0], n_iter, change


def _max_change(new: np.ndarray, old: np.ndarray) -> float:
    """``max |new - old|`` (0 for empty arrays)."""
    return float(np.abs(new - old).max()) if new.size else 0.0
