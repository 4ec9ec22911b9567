"""Weak-supervision losses: bag (spot) means of nucleus probabilities against spot proportions."""

from __future__ import annotations

import torch

EPS = 1e-6


def bag_mean(probabilities: torch.Tensor, bag: torch.Tensor, n_bags: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the rows of ``probabilities`` per bag index (``bag`` in 0..n_bags-1; -1 = no bag), weighted by
    ``weights`` (one per row, ≥ 0; None: 1 each)."""
    keep = bag >= 0
    w = torch.ones_like(bag[keep], dtype=probabilities.dtype) if weights is None else weights[keep].to(probabilities.dtype)
    sums = torch.zeros(n_bags, probabilities.shape[1], dtype=probabilities.dtype, device=probabilities.device)
    sums = sums.index_add(0, bag[keep], probabilities[keep] * w.unsqueeze(1))
    counts = torch.zeros(n_bags, dtype=probabilities.dtype, device=probabilities.device).index_add(0, bag[keep], w)
    return sums / counts.clamp(min=1e-12 if weights is not None else 1).unsqueeze(1)


def symmetric_kl(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Batch mean of KL(target‖predicted) + KL(predicted‖target) between rows of proportions."""
    p = predicted.clamp(min=EPS)
    q = target.clamp(min=EPS)
    p, q = p / p.sum(1, keepdim=True), q / q.sum(1, keepdim=True)
    return ((q - p) * (q.log() - p.log())).sum(1).mean()


def spot_posteriors(probabilities: torch.Tensor, bag: torch.Tensor, targets: torch.Tensor, iterations: int = 10,
                    weights: torch.Tensor | None = None) -> torch.Tensor:
    """Nucleus posteriors given the spot proportions (the E-step of EM for label proportions).

    Each nucleus's probabilities are reweighted per spot and class, ``q ∝ p · f[spot]``, with the
    factors ``f`` fitted (iterative proportional fitting) so that every spot's mean ``q`` equals its
    proportions (the ``weights``-weighted mean, as in :func:`bag_mean`). Nuclei outside any bag (``bag == -1``)
    keep ``p``.
    """
    n_bags = targets.shape[0]
    factors = torch.ones_like(targets)
    inside = bag >= 0
    q = probabilities.clone()
    for _ in range(iterations):
        q[inside] = probabilities[inside] * factors[bag[inside]]
        q = q / q.sum(1, keepdim=True).clamp(min=EPS)
        factors = factors * (targets + EPS) / (bag_mean(q, bag, n_bags, weights) + EPS)
    return q
