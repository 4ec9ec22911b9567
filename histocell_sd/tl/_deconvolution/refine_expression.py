"""Refinement's imputed expression: each nucleus matched to a reference cell of its refined type."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse

from ..._constants import HISTOCELL_KEY, NUCLEUS_ID_KEY, SPATIAL_KEY, SPOT_ID_KEY
from ..._errors import InvalidInputError
from ...io._schema import REFINED_TYPE_KEY, ExpressionTableModel, set_categorical
from .deconvolve import _shared_genes, reference_counts

__all__ = ["imputed_expression"]

_EPS = 1e-9


def imputed_expression(nuclei, reference, cell_type_key, types, assigned, spot_of, spots, match, top_k, seed) -> ad.AnnData:
    """Nuclei × reference genes: the raw counts of a reference cell of each nucleus' refined type."""
    counts = reference_counts(reference)
    if cell_type_key not in reference.obs:
        raise InvalidInputError(f"reference.obs has no column {cell_type_key!r}; it has {list(reference.obs.columns)}.")
    labels = reference.obs[cell_type_key].astype(str).to_numpy()
    used = [types[c] for c in np.unique(assigned)]
    absent = [t for t in used if t not in set(labels)]
    if absent:
        raise InvalidInputError(
            f"Cell types {absent} of the nucleus predictions are absent from reference.obs[{cell_type_key!r}] "
            f"({sorted(set(labels))}); no reference cell can be matched to those nuclei. Pass expression_key=None "
            "to skip the imputed expression."
        )
    rng = np.random.default_rng(seed)
    matched = np.empty(len(assigned), dtype=np.int64)
    scores = _spot_reference_correlation(spots, reference, counts) if match == "correlation" else None
    for code in np.unique(assigned):
        cells = np.flatnonzero(labels == types[code])
        these = np.flatnonzero(assigned == code)
        matched[these] = cells[rng.integers(0, len(cells), len(these))]
        if scores is None:
            continue
        in_spot = these[spot_of[these] >= 0]
        k = min(top_k, len(cells))
        for chunk in np.array_split(in_spot, max(1, len(in_spot) // 20000)):
            if not len(chunk):
                continue
            corr = scores(spot_of[chunk], cells)
            best = np.argpartition(-corr, k - 1, axis=1)[:, :k]
            pick = best[np.arange(len(chunk)), rng.integers(0, k, len(chunk))]
            matched[chunk] = cells[pick]
    region = nuclei.uns.get("spatialdata_attrs", {}).get("region", "nuclei")
    obs = pd.DataFrame(index=nuclei.obs_names.copy())
    obs[NUCLEUS_ID_KEY] = nuclei.obs[NUCLEUS_ID_KEY].to_numpy() if NUCLEUS_ID_KEY in nuclei.obs else obs.index.to_numpy()
    obs[SPOT_ID_KEY] = nuclei.obs[SPOT_ID_KEY].to_numpy()
    obs["matched_cell"] = reference.obs_names.to_numpy()[matched]
    adata = ad.AnnData(counts[matched], obs=obs, var=pd.DataFrame(index=reference.var_names.copy()))
    set_categorical(adata, REFINED_TYPE_KEY, types, assigned, all_labels=nuclei.uns.get(HISTOCELL_KEY, {}).get("cell_types"))
    if SPATIAL_KEY in nuclei.obsm:
        adata.obsm[SPATIAL_KEY] = np.asarray(nuclei.obsm[SPATIAL_KEY])
    return ExpressionTableModel.parse(adata, region=region, imputation={"match": match, "top_k": int(top_k), "seed": int(seed)})


def _spot_reference_correlation(spots: ad.AnnData, reference: ad.AnnData, counts: sparse.csr_matrix):
    """A function ``(spot rows, reference cells) -> correlation`` of log-normalised expression on shared genes."""
    try:
        shared = _shared_genes(reference.var_names, spots.var_names.astype(str), 2)
    except InvalidInputError:
        shared = None
    if shared is None or spots.n_vars == 0:
        return lambda rows, cells: np.zeros((len(rows), len(cells)))

    def standardise(X):
        X = sparse.csr_matrix(X, dtype=np.float64)
        totals = np.asarray(X.sum(axis=1)).ravel()
        X = sparse.diags(1e4 / np.maximum(totals, 1)) @ X
        X = np.log1p(X.toarray())
        X -= X.mean(axis=1, keepdims=True)
        return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), _EPS)

    spot_z = standardise(sparse.csr_matrix(spots.X)[:, shared["spots"]])
    ref_z = standardise(counts[:, shared["reference"]])
    return lambda rows, cells: spot_z[rows] @ ref_z[cells].T
