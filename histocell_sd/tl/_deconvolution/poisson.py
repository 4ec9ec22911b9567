"""Spot composition as a Poisson mixture of reference signatures, optionally joined with nucleus likelihoods.

The model
---------
Each cell type ``k`` has a signature ``μ_k`` (its pooled reference counts over the genes used,
normalised to sum to 1) and an RNA content ``ρ_k`` (its mean reference library size, relative to the
other types). A spot holding cell fractions ``π_s`` draws its UMIs from the mixture
``Σ_k w_sk μ_k`` with ``w_sk ∝ π_sk ρ_k`` (a cell contributes UMIs in proportion to its RNA), and
each of its nuclei has a type ``z_i ~ Cat(π_s)`` seen through the image likelihood ``ℓ_i``.
The MAP composition maximises ``τ Σ_g y_sg log Σ_k w_sk μ_kg + Σ_i log Σ_k π_sk ℓ_ik``, where
``τ`` (``umi_weight``) tempers the expression evidence. EM alternates

* E-step: expected UMIs per type ``U_sk = Σ_g y_sg w_sk μ_kg / Σ_j w_sj μ_jg`` and nucleus
  posteriors ``q_i ∝ π_s ∘ ℓ_i`` (``N_s = Σ_{i∈s} q_i``);
* M-step, the stationary point of the Lagrangian (its multiplier is the nucleus count ``n_s``):
  ``π_sk ∝ (τ U_sk + N_sk) / (n_s + τ U_s ρ_k / Σ_j π_sj ρ_j)``.

Gene-wise platform effects (a single-cell reference and Visium capture genes differently) are fitted
as one factor ``γ_g`` per gene shared by all spots: the signatures become ``μ_kg γ_g`` renormalised
(and ``ρ_k`` the RNA they capture), with ``γ`` updated after each M-step so that the spots' pooled
counts match the model's, as RCTD does. The EM is accelerated by SQUAREM (:func:`.squarem.squarem`), which
reaches the same fixed point in a third to a tenth of the steps. Without nuclei this is a Poisson regression on the
signatures (the likelihood of RCTD or stereoscope). A type with ``ρ_k = 0`` (absent from the
reference) takes no UMIs; its share comes from the nuclei alone.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import sparse

from ..._errors import InvalidInputError
from .squarem import squarem

_TINY = 1e-300
_LOG_TINY = np.log(_TINY)


def type_signatures(counts: sparse.spmatrix, labels: np.ndarray, types: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Signatures ``μ`` (types × genes, rows sum to 1) and relative RNA content ``ρ`` (mean 1 over present types).

    Types without a reference cell get a zero row and ``ρ = 0``.
    """
    counts = sparse.csr_matrix(counts, dtype=np.float64)
    mu = np.zeros((len(types), counts.shape[1]))
    rho = np.zeros(len(types))
    for k, t in enumerate(types):
        rows = counts[np.flatnonzero(labels == t)]
        if rows.shape[0] == 0:
            continue
        pooled = np.asarray(rows.sum(axis=0)).ravel()
        mu[k] = pooled / max(pooled.sum(), _TINY)
        rho[k] = pooled.sum() / rows.shape[0]
    present = rho > 0
    rho[present] /= rho[present].mean()
    return mu, rho


def composition_em(
    Y: np.ndarray,
    mu: np.ndarray,
    rho: np.ndarray,
    umi_weight: float = 1.0,
    likelihood: np.ndarray | None = None,
    spot_of: np.ndarray | None = None,
    max_iter: int = 1000,
    tol: float = 1e-5,
    platform_effects: bool = True,
) -> tuple[np.ndarray, np.ndarray | None, int]:
    """MAP cell fractions of the spots (module docstring); returns ``π``, the nucleus posteriors and the iterations.

    Parameters
    ----------
    Y
        Spot counts (spots × genes) on the genes of ``mu``, dense or sparse (kept sparse: the E-step visits only
        the non-zero counts, in blocks of spots, so memory grows with the counts, not spots × genes).
    mu, rho
        From :func:`type_signatures`.
    umi_weight
        ``τ``; 1 is the plain Poisson likelihood.
    likelihood
        Image likelihoods ``ℓ`` (nuclei × types), or None for expression alone.
    spot_of
        Row in ``Y`` of each nucleus' spot, -1 outside every spot; the posterior of a nucleus outside
        is its normalised ``ℓ``.
    max_iter, tol
        Stop when no ``π_sk`` moves more than ``tol``.
    platform_effects
        Also fit one factor per gene shared by all spots (``μ_kg → μ_kg γ_g``, renormalised), so
        that the spots' pooled counts match the model's (the gene-wise platform effect between a
        single-cell reference and Visium).
    """
    if max_iter < 1:
        raise InvalidInputError(f"max_iter must be at least 1, got {max_iter}.")
    n_spots, n_types = Y.shape[0], mu.shape[0]
    if sparse.issparse(Y):
        Y = sparse.csr_matrix(Y, dtype=np.float64)
        Y.sum_duplicates()
    umis = np.asarray(Y.sum(axis=1)).ravel()
    pi = np.full((n_spots, n_types), 1.0 / n_types)
    if likelihood is not None:
        inside = spot_of >= 0
        rows, observed = spot_of[inside], likelihood[inside]
        members = sparse.csr_matrix((np.ones(len(rows)), (rows, np.arange(len(rows)))), shape=(n_spots, len(rows)))
        n_nuclei = np.asarray(members.sum(axis=1)).ravel()
    else:
        n_nuclei = np.zeros(n_spots)
    base_mu, base_rho = mu, rho
    ratio_times_mu = _RatioTimesMu(Y)
    pooled = np.asarray(Y.sum(axis=0)).ravel()

    def em_step(pi: np.ndarray, log_gamma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mu, rho = _scaled(base_mu, base_rho, np.exp(log_gamma)) if platform_effects else (base_mu, base_rho)
        w = pi * rho
        w /= np.maximum(w.sum(axis=1, keepdims=True), _TINY)
        U = w * ratio_times_mu(w, mu)
        N = np.zeros_like(pi)
        if likelihood is not None:
            N = np.asarray(members @ nucleus_posterior(observed, pi[rows]))
        content = np.maximum((pi * rho).sum(axis=1, keepdims=True), _TINY)
        numerator = umi_weight * U + N
        denominator = n_nuclei[:, None] + umi_weight * umis[:, None] * rho[None, :] / content
        new = np.divide(numerator, denominator, out=np.zeros_like(pi), where=denominator > 0)
        totals = new.sum(axis=1, keepdims=True)
        new = np.where(totals > 0, new / np.maximum(totals, _TINY), pi)  # no UMI and no nucleus: unchanged
        if platform_effects:
            w = new * rho
            w /= np.maximum(w.sum(axis=1, keepdims=True), _TINY)
            expected = (umis @ w) @ mu  # never the dense spots × genes rates
            ratio = np.where(expected > 0, pooled / np.maximum(expected, _TINY), 1.0)
            log_gamma = np.maximum(log_gamma + np.log(np.maximum(ratio, _TINY)), _LOG_TINY)  # a gene without counts: γ → 0
            log_gamma = log_gamma - log_gamma.mean()
        return new, log_gamma

    pi, n_iter, change = squarem(em_step, pi, np.zeros(Y.shape[1]), max_iter, tol)
    if change >= tol:
        warnings.warn(f"The composition EM stopped after max_iter={max_iter} iterations, still moving by {change:.2g} (tol {tol:g}).", stacklevel=3)
    if likelihood is None:
        return pi, None, n_iter
    Q = likelihood / np.maximum(likelihood.sum(axis=1, keepdims=True), _TINY)
    Q[inside] = nucleus_posterior(observed, pi[rows])
    return pi, Q, n_iter


class _RatioTimesMu:
    """``(Y / (w @ mu)) @ mu.T`` (spots × types) for fixed counts ``Y``; sparse ``Y`` is visited over its non-zero
    entries only (their layout read once; the rates computed in blocks of spots, so memory stays bounded)."""

    _BLOCK_ROWS = 32768  # spots per block

    def __init__(self, Y):
        self.Y = Y
        if sparse.issparse(Y):
            self.per_row = np.diff(Y.indptr)
            self.ratio = sparse.csr_matrix((Y.data.copy(), Y.indices, Y.indptr), shape=Y.shape)

    def __call__(self, w: np.ndarray, mu: np.ndarray) -> np.ndarray:
        if not sparse.issparse(self.Y):
            return (self.Y / np.maximum(w @ mu, _TINY)) @ mu.T
        mu_t = np.ascontiguousarray(mu.T)
        Y, out = self.Y, self.ratio.data
        for first in range(0, Y.shape[0], self._BLOCK_ROWS):
            rows = slice(first, first + self._BLOCK_ROWS)
            part = slice(Y.indptr[first], Y.indptr[min(first + self._BLOCK_ROWS, Y.shape[0])])
            # np.repeat and take read in order: about twice as fast as fancy indexing here
            rate = np.einsum("nk,nk->n", np.repeat(w[rows], self.per_row[rows], axis=0), mu_t.take(Y.indices[part], axis=0))
            out[part] = Y.data[part] / np.maximum(rate, _TINY)
        return np.asarray(self.ratio @ mu_t)


def _scaled(mu: np.ndarray, rho: np.ndarray, gamma: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Signatures seen through the gene factors ``γ`` (rows renormalised) and the RNA content they capture."""
    captured = mu @ gamma
    safe = np.maximum(captured, _TINY)
    return mu * gamma / safe[:, None], rho * captured


def nucleus_posterior(likelihood: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Type posteriors of nuclei, ``q_i ∝ ℓ_i ∘ π_s(i)`` (rows of ``prior`` aligned to the nuclei)."""
    q = likelihood * prior
    q /= np.maximum(q.sum(axis=1, keepdims=True), _TINY)
    return q

