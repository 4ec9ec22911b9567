"""Spot deconvolution against a single-cell reference: Tangram (cluster mode, CPU) or a Poisson mixture."""

from __future__ import annotations

import contextlib
import logging
import warnings

import anndata as ad
import numpy as np
import pandas as pd
from scipy import sparse
from spatialdata import SpatialData

from ..._constants import (
    CELL_TYPE_KEY,
    PROPORTIONS_KEY,
    SPOTS_OBSM_LAYOUT,
    STATE_PROPORTIONS_KEY,
    TABLE_KEY,
)
from ..._device import resolve_device
from ..._docs import inject_docs
from ..._errors import InvalidInputError
from ..._utils import check_key_added, check_storable_names, check_whole_number, copy_for_writing, progress_bar
from ...io import check_proportions, resolve_key
from ...io._elements import annotated_regions
from ...io._spots import SIDE_KEY, SQUARE, spot_geometry
from .poisson import composition_em, type_signatures
from .pooling import pool_low_counts

__all__ = ["deconvolve", "reference_counts", "shared_data"]

_METHODS = ("tangram", "poisson")
MIN_SHARED_GENES = 20
_INTEGER_TOLERANCE = 1e-6


@inject_docs
def deconvolve(
    sdata: SpatialData,
    reference: ad.AnnData,
    *,
    cell_type_key: str = CELL_TYPE_KEY,
    state_key: str | None = None,
    method: str = "tangram",
    key_added: str = PROPORTIONS_KEY,
    spots_table_key: str | None = None,
    n_markers: int = 100,
    epochs: int = 500,
    learning_rate: float = 0.1,
    min_shared_genes: int = MIN_SHARED_GENES,
    min_counts: float = 0,
    seed: int = 0,
    progress: bool = True,
    device: str | None = None,
    copy: bool = False,
) -> SpatialData | None:
    """Deconvolve the Visium spots into cell-type proportions (cell fractions per spot).

    Marker genes are the top ``n_markers`` per cell type of :func:`scanpy.tl.rank_genes_groups`
    (t-test) on the log-normalised reference, restricted to genes measured in the spots. Then

    * ``method="tangram"`` (default): Tangram maps each cell type's summed reference expression
      onto the spots (``mode="clusters"``, uniform density prior, on ``device``); the share of type
      ``c`` in spot ``s`` is ``M[c, s] · n_c`` normalised over types, ``M`` the mapping (each type's
      distribution over spots) and ``n_c`` the type's share of reference cells, i.e. Tangram's own
      cluster density.
    * ``method="poisson"``: the spot's marker counts are a Poisson mixture of the types' reference
      signatures, weighted by cell fraction × the type's RNA content (mean reference library size),
      with one platform factor per gene fitted across the spots; the maximum-likelihood fractions
      are found by EM (see ``histocell_sd.tl._deconvolution.poisson``). It is the expression half of
      :func:`refine_deconvolution`'s ``expression="counts"`` model.

    Parameters
    ----------
    sdata
        Sample whose spots table holds raw counts in ``X`` (genes in ``var_names``).
    reference
        Single-cell reference with raw counts: integer ``X``, or ``layers["counts"]``, or
        ``reference.raw``; cell types in ``obs[cell_type_key]``.
    cell_type_key
        ``reference.obs`` column with the cell types.
    state_key
        ``reference.obs`` column with cell states (sub-types); when given, state proportions are
        estimated the same way and stored in ``obsm["state_proportions"]``.
    method
        ``"tangram"`` or ``"poisson"``.
    {key_added}
        the ``obsm`` key of the spot proportions in the spots table (DataFrame, columns = cell types). Replacing proportions
        that no deconvolve call wrote (e.g. imported with :func:`~histocell_sd.io.read_proportions`) warns.
    {spots_table_key}
        Read (raw counts in ``X``) and written.
    n_markers
        Marker genes per cell type (union over types, shared with the spots).
    epochs, learning_rate
        Tangram optimiser settings (ignored by ``"poisson"``).
    min_shared_genes
        Fewest genes the reference and the spots must share.
    min_counts
        Square bins (Visium HD) with fewer counts (over the shared genes) are deconvolved from the pooled
        counts of the smallest window of bins centred on them that holds ``min_counts`` (3 × 3, 5 × 5, at
        most 7 × 7 bins): sparse low-count bins borrow their neighbours' evidence, the others keep their own
        counts. Their proportions are those of their pool; ``obs[key_added + "_pool_bins"]`` records the
        bins pooled (1 = own counts). A bin whose largest window holds no count (an empty area) gets uniform
        proportions, counted in ``uns["deconvolution"]["n_empty"]``. 0 (default): no pooling; spots
        without counts get uniform proportions (with a warning for circles; ``HistoCell.fit`` skips spots
        without counts). Circles (Visium spots) are never pooled. Measured on synthetic 8 µm bins, pooling
        (30) lowered nucleus macro-F1 (``benchmarks/measured/visium_hd.json``), hence the default.
    {seed}
        Here Tangram's initialisation and optimiser (``"poisson"`` is deterministic).
    {progress}
    {device}
        Tangram's (``"poisson"`` runs in numpy).
    {copy}

    Returns
    -------
    SpatialData or None
        None: writes ``sdata.tables[spots_table_key].obsm[key_added]`` (and ``obsm["state_proportions"]``)
        and records the settings and marker genes in ``uns["deconvolution"]``. With ``copy=True``, a
        SpatialData holding them (tables copied, other elements shared with ``sdata``).
    """
    if method not in _METHODS:
        raise InvalidInputError(f"method must be one of {_METHODS}, got {method!r}.")
    for name, value in (("n_markers", n_markers), ("epochs", epochs), ("min_shared_genes", min_shared_genes)):
        check_whole_number(name, value, 1)
    if not (np.isfinite(learning_rate) and learning_rate > 0):
        raise InvalidInputError(f"learning_rate must be a positive number, got {learning_rate!r}.")
    check_key_added(key_added, SPOTS_OBSM_LAYOUT, "obsm")
    check_reference(reference)
    torch_device = str(resolve_device(device))
    spots_table_key = resolve_key(sdata, "tables", key=spots_table_key, default=TABLE_KEY)
    if copy:
        sdata = copy_for_writing(sdata)
    table = sdata.tables[spots_table_key]
    labels = {"cell types": _labels(reference, cell_type_key)}
    if state_key is not None:
        labels["states"] = _labels(reference, state_key)

    if not (np.isfinite(min_counts) and min_counts >= 0):
        raise InvalidInputError(f"min_counts must be a non-negative number of counts, got {min_counts!r}.")
    pool_key = f"{key_added}_pool_bins"
    geometry = _square_bins(sdata, table, spots_table_key) if min_counts > 0 else None
    steps = progress_bar(total=1 + len(labels), desc="deconvolve", disable=not progress)
    # Empty bins are common on Visium HD (fat, lumen) and HistoCell.fit skips spots without counts: no warning for squares.
    ref, sp = shared_data(table, spots_table_key, reference, min_shared_genes, warn_empty=geometry is None and not _annotates_squares(sdata, table))
    pool_bins = None
    if geometry is not None:
        pooled, pool_bins = pool_low_counts(sp.X, geometry, min_counts)
        sp = ad.AnnData(pooled, obs=sp.obs, var=sp.var)
    n_empty = int((np.asarray(sp.X.sum(axis=1)).ravel() == 0).sum())  # no counts (within 3 rings when pooled): uniform proportions
    per_type = pd.Series(np.asarray(ref.X.sum(axis=1)).ravel()).groupby(labels["cell types"].to_numpy()).sum()
    silent = sorted(per_type.index[per_type == 0])
    if silent:
        warnings.warn(f"The reference cells of {silent} have no counts on the {ref.n_vars} genes shared with the spots: "
                      "deconvolution cannot see these types (their proportions come out 0).", UserWarning, stacklevel=2)
    log_ref = _log_normalise(ref)
    steps.update()
    results, markers_used = {}, {}
    for what, label in labels.items():
        markers = _markers(log_ref, label, n_markers)
        if method == "tangram":
            results[what] = _tangram(ref, sp, label, markers, epochs, learning_rate, seed, torch_device)
        else:
            results[what] = _poisson(ref, sp, label, markers)
        markers_used[what] = markers
        steps.update()
    steps.close()

    earlier = table.uns.get("deconvolution") or {}
    checked = {what: check_proportions(frame, spot_ids=table.obs_names, name=f"{method} {what} proportions") for what, frame in results.items()}
    written = list(earlier.get("proportions_keys", [earlier["key_added"]] if "key_added" in earlier else []))
    if key_added in table.obsm and key_added not in written:
        warnings.warn(f"Replaced obsm[{key_added!r}], which tl.deconvolve did not write (e.g. proportions read with "
                      "io.read_proportions or the labels a model was trained on); pass key_added= to keep both.", UserWarning, stacklevel=2)
    table.obsm[key_added] = checked["cell types"]
    if pool_bins is not None:
        table.obs[pool_key] = pool_bins
    elif pool_key in table.obs:  # the pools of the proportions just replaced
        del table.obs[pool_key]
    # which proportions obsm["state_proportions"] were estimated with (kept across calls that estimate no states)
    states_of = earlier.get("state_proportions_of", earlier.get("key_added") if earlier.get("state_key") is not None else None)
    if state_key is not None:
        table.obsm[STATE_PROPORTIONS_KEY] = checked["states"]
        states_of = key_added
    elif STATE_PROPORTIONS_KEY in table.obsm and states_of == key_added:
        del table.obsm[STATE_PROPORTIONS_KEY]  # the states of the proportions just replaced would disagree with the new ones
        states_of = None
        warnings.warn(f"Removed obsm[{STATE_PROPORTIONS_KEY!r}], estimated with the obsm[{key_added!r}] this call replaced; "
                      "pass state_key= to estimate states again.", UserWarning, stacklevel=2)
    table.uns["deconvolution"] = {
        "method": method,
        "mode": "clusters" if method == "tangram" else "mixture",
        "key_added": key_added,
        "proportions_keys": sorted({*written, key_added}),  # every obsm key a deconvolve call wrote
        "cell_type_key": cell_type_key,
        "state_key": state_key,
        "state_proportions_of": states_of,
        "n_shared_genes": int(ref.n_vars),
        "markers": list(markers_used["cell types"]),
        "epochs": int(epochs),
        "seed": int(seed),
        "min_counts": float(min_counts),
        "n_pooled": int((pool_bins > 1).sum()) if pool_bins is not None else 0,
        "n_empty": n_empty,
    }
    return sdata if copy else None


def shared_data(table: ad.AnnData, table_key: str, reference: ad.AnnData, min_shared_genes: int = MIN_SHARED_GENES,
                warn_empty: bool = True) -> tuple[ad.AnnData, ad.AnnData]:
    """Raw counts of the reference and of the spots on their shared genes (``ref``, ``sp``), same gene order."""
    spots = _spot_counts(table, table_key, warn_empty)
    counts = reference_counts(reference)
    shared = _shared_genes(reference.var_names, spots.var_names, min_shared_genes)
    ref = ad.AnnData(counts[:, shared["reference"]], obs=pd.DataFrame(index=reference.obs_names.astype(str)))
    sp = ad.AnnData(spots.X[:, shared["spots"]], obs=pd.DataFrame(index=spots.obs_names))
    ref.var_names = sp.var_names = shared["names"]
    return ref, sp


def check_reference(reference) -> None:
    """Refuse a single-cell reference that is not an AnnData (e.g. a genes × cells DataFrame)."""
    if not isinstance(reference, ad.AnnData):
        hint = (" Wrap a cells × genes count table as anndata.AnnData(df, obs=cell_annotations)."
                if isinstance(reference, pd.DataFrame) else "")
        raise InvalidInputError(
            f"reference must be an AnnData (cells × genes, raw counts, cell types in obs), got {type(reference).__name__}.{hint}"
        )


def reference_counts(reference: ad.AnnData) -> sparse.csr_matrix:
    """The reference's raw counts (cells × ``reference.var_names``) as a float32 CSR matrix.

    Looks at ``layers["counts"]``, then ``X``, then ``reference.raw`` (its genes must include the
    reference's); raises :class:`InvalidInputError` when none holds non-negative integers.
    """
    check_reference(reference)
    if reference.n_obs == 0 or reference.n_vars == 0:
        raise InvalidInputError(f"reference is empty ({reference.n_obs} cells × {reference.n_vars} genes).")
    candidates = []
    if "counts" in reference.layers:
        candidates.append(("layers['counts']", reference.layers["counts"]))
    candidates.append(("X", reference.X))
    if reference.raw is not None and reference.var_names.isin(reference.raw.var_names).all():
        idx = reference.raw.var_names.get_indexer(reference.var_names)
        candidates.append(("raw.X", reference.raw.X[:, idx]))
    problems = []
    for name, matrix in candidates:
        problem = _count_problem(matrix)
        if problem is None:
            return sparse.csr_matrix(matrix, dtype=np.float32)
        problems.append(f"{name} {problem}")
    raise InvalidInputError(
        "reference has no raw counts: " + "; ".join(problems) + ". Pass un-normalised UMI counts in X, "
        "layers['counts'] or reference.raw (scanpy's normalize_total/log1p make them unusable)."
    )


def _count_problem(matrix) -> str | None:
    """Why ``matrix`` is not raw counts, or None when it is."""
    if matrix is None:
        return "is missing"
    values = matrix.data if sparse.issparse(matrix) else np.asarray(matrix).ravel()
    if values.size and not np.isfinite(values).all():
        return "has NaN or infinite values"
    if values.size and values.min() < 0:
        return "has negative values (scaled data?)"
    if values.size == 0 or values.max() == 0:
        return "is all zero"
    fractional = np.abs(values - np.round(values)) > _INTEGER_TOLERANCE
    if fractional.any():
        hint = " and looks log-transformed" if values.max() < 20 else ""
        return f"holds non-integer values (e.g. {values[fractional][0]:.3g}){hint}"
    return None


def _square_bins(sdata: SpatialData, table: ad.AnnData, table_key: str):
    """The geometry of the square bins the spots table annotates, in its row order (pooling needs their grid)."""
    regions = annotated_regions(table)
    if len(regions) != 1 or regions[0] not in sdata.shapes:
        raise InvalidInputError(f"min_counts pools neighbouring bins: spots table {table_key!r} must annotate one shapes element, got {regions}.")
    region = regions[0]
    spots = sdata.shapes[region]
    rows = spots.index.get_indexer(table.obs_names)
    if (rows < 0).any():
        raise InvalidInputError(f"{(rows < 0).sum()} spots of table {table_key!r} are not in shapes {region!r}.")
    geometry = spot_geometry(spots.iloc[rows], region)
    if geometry.shape != SQUARE:
        raise InvalidInputError(f"min_counts pools neighbouring square bins (Visium HD); the spots {region!r} are circles (pass min_counts=0).")
    return geometry


def _annotates_squares(sdata: SpatialData, table: ad.AnnData) -> bool:
    """Does ``table`` annotate square spots (Visium HD bins)?"""
    regions = annotated_regions(table)
    return len(regions) == 1 and regions[0] in sdata.shapes and SIDE_KEY in sdata.shapes[regions[0]].columns


def _warn_empty(empty: np.ndarray, stacklevel: int) -> None:
    """Warn (at the caller of the public function ``stacklevel - 1`` frames up) about spots without counts."""
    if empty.any():
        warnings.warn(f"{empty.sum()} spots have no counts; they get uninformative (uniform) proportions.", stacklevel=stacklevel)


def _spot_counts(table: ad.AnnData, table_key: str, warn_empty: bool = True) -> ad.AnnData:
    if table.n_vars == 0:
        raise InvalidInputError(f"Spots table {table_key!r} has no genes (no counts in X); deconvolution needs the spot counts.")
    X = table.X
    if X is None:
        raise InvalidInputError(f"Spots table {table_key!r} has no counts in X.")
    X = sparse.csr_matrix(X, dtype=np.float32)
    if X.data.size and not np.isfinite(X.data).all():
        raise InvalidInputError(f"Spots table {table_key!r} has NaN or infinite values in X; raw counts are needed.")
    if X.nnz == 0 or X.sum() == 0:
        raise InvalidInputError(f"Spots table {table_key!r} has only zero counts.")
    if X.data.size and (X.data < 0).any():
        raise InvalidInputError(f"Spots table {table_key!r} has negative values in X; raw counts are needed.")
    problem = _count_problem(X)
    if problem is not None:  # e.g. ambient-corrected counts are fractional, log-normalised ones are wrong
        warnings.warn(f"The X of spots table {table_key!r} {problem}; deconvolution expects raw counts.", UserWarning, stacklevel=5)
    empty = np.asarray(X.sum(axis=1)).ravel() == 0
    if empty.all():
        raise InvalidInputError(f"Spots table {table_key!r} has only zero counts.")
    if warn_empty:
        _warn_empty(empty, stacklevel=5)
    return ad.AnnData(X, obs=pd.DataFrame(index=table.obs_names.astype(str)), var=pd.DataFrame(index=table.var_names.astype(str)))


def _labels(reference: ad.AnnData, key: str) -> pd.Series:
    if key not in reference.obs:
        raise InvalidInputError(f"reference.obs has no column {key!r}; it has {list(reference.obs.columns)}.")
    labels = reference.obs[key]
    if labels.isna().any():
        raise InvalidInputError(f"reference.obs[{key!r}] has {int(labels.isna().sum())} missing labels.")
    labels = labels.astype(str)
    check_storable_names(labels.unique(), f"The labels of reference.obs[{key!r}]")
    if labels.nunique() < 2:
        raise InvalidInputError(f"reference.obs[{key!r}] has fewer than two labels ({labels.unique().tolist()}).")
    small = labels.value_counts()
    small = small[small < 2]
    if len(small):
        raise InvalidInputError(f"reference.obs[{key!r}] has labels with a single cell: {small.index.tolist()}.")
    return pd.Series(pd.Categorical(labels, categories=_ordered(reference.obs[key])), index=reference.obs_names.astype(str))


def _ordered(column: pd.Series) -> list[str]:
    """Categories in their declared order (categorical) or sorted, dropping unused ones."""
    present = set(column.astype(str))
    if isinstance(column.dtype, pd.CategoricalDtype):
        return [str(c) for c in column.cat.categories if str(c) in present]
    return sorted(present)


def _shared_genes(ref_genes: pd.Index, spot_genes: pd.Index, minimum: int) -> dict:
    """Genes in both (case-insensitive, first occurrence), as positions and names."""
    ref_lower = pd.Index([str(g).lower() for g in ref_genes])
    spot_lower = pd.Index([str(g).lower() for g in spot_genes])
    ref_first = ~ref_lower.duplicated()
    spot_pos = pd.Series(np.arange(len(spot_lower)), index=spot_lower)[~spot_lower.duplicated()]
    keep = np.flatnonzero(ref_first & ref_lower.isin(spot_pos.index))
    if len(keep) < minimum:
        raise InvalidInputError(
            f"The reference and the spots share only {len(keep)} genes (of {len(ref_genes)} reference and "
            f"{len(spot_genes)} spot genes; need at least {minimum}). Check that both use the same gene "
            "identifiers (symbols vs Ensembl ids) and species."
        )
    return {
        "reference": keep,
        "spots": spot_pos.loc[ref_lower[keep]].to_numpy(),
        "names": pd.Index([str(g) for g in ref_genes[keep]]),
    }


def _log_normalise(ref: ad.AnnData) -> ad.AnnData:
    import scanpy as sc

    out = ref.copy()
    sc.pp.normalize_total(out, target_sum=1e4)
    sc.pp.log1p(out)
    return out


def _markers(log_ref: ad.AnnData, labels: pd.Series, n_markers: int) -> list[str]:
    """Union of the top ``n_markers`` genes per label (t-test, positive scores only)."""
    import scanpy as sc

    adata = ad.AnnData(log_ref.X, obs=pd.DataFrame({"label": labels.to_numpy()}, index=log_ref.obs_names), var=log_ref.var)
    sc.tl.rank_genes_groups(adata, "label", method="t-test", n_genes=n_markers, use_raw=False)
    result = adata.uns["rank_genes_groups"]
    genes: list[str] = []
    for group in result["names"].dtype.names:
        names = np.asarray(result["names"][group])
        scores = np.asarray(result["scores"][group])
        genes.extend(str(g) for g, s in zip(names, scores) if np.isfinite(s) and s > 0)
    return list(dict.fromkeys(genes))


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed numpy's global RNG and torch for Tangram on one thread, restoring their state afterwards."""
    import torch

    # Tangram draws from numpy's global RNG: seed it for the call and restore it afterwards
    state = np.random.get_state()  # noqa: NPY002
    torch_state = torch.random.get_rng_state()
    threads = torch.get_num_threads()
    np.random.seed(seed)  # noqa: NPY002
    torch.manual_seed(seed)
    torch.set_num_threads(1)  # the matrices are small; more threads only contend (and vary results)
    try:
        yield
    finally:
        np.random.set_state(state)  # noqa: NPY002
        torch.random.set_rng_state(torch_state)
        torch.set_num_threads(threads)


def _tangram(ref: ad.AnnData, sp: ad.AnnData, labels: pd.Series, markers: list[str], epochs: int, learning_rate: float, seed: int,
             device: str = "cpu") -> pd.DataFrame:
    """Tangram cluster-mode proportions (spots × labels)."""
    import tangram as tg

    sc_data = ad.AnnData(ref.X.copy(), obs=pd.DataFrame({"label": labels.to_numpy()}, index=ref.obs_names), var=ref.var.copy())
    sp_data = sp[:, sp.var_names.isin(markers)].copy()  # tangram reads only the markers: a Visium HD table is not copied whole
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.WARNING)  # tangram logs every step at INFO on the root logger
    try:
        tg.pp_adatas(sc_data, sp_data, genes=markers)
        for adata in (sc_data, sp_data):  # tangram orders genes through a set: fix the order, or results vary by process
            for key in ("training_genes", "overlap_genes"):
                adata.uns[key] = sorted(adata.uns[key])
        if len(sc_data.uns["training_genes"]) < 2:
            raise InvalidInputError(f"Only {len(sc_data.uns['training_genes'])} marker genes are expressed in both the reference and the spots.")
        with _seeded(seed), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mapping = tg.map_cells_to_space(
                sc_data, sp_data, mode="clusters", cluster_label="label",
                # "uniform" as a list: tangram's own is an obs Series, which torch cannot read under pandas 3 (and an
                # array trips tangram's `density_prior == "uniform"` test)
                density_prior=(np.ones(sp_data.n_obs) / sp_data.n_obs).tolist(),
                num_epochs=epochs, learning_rate=learning_rate, device=device, verbose=False,
                random_state=None,
            )
    finally:
        logger.setLevel(level)
    types = mapping.obs["label"].astype(str).to_numpy()
    density = mapping.obs["cluster_density"].to_numpy(dtype=np.float64)
    cells = np.asarray(mapping.X, dtype=np.float64).T * density[None, :]  # spots × types
    frame = pd.DataFrame(cells, index=sp.obs_names, columns=types)
    frame = frame[[c for c in labels.cat.categories if c in frame.columns]]
    totals = frame.sum(axis=1).to_numpy()
    frame = frame.div(np.where(totals > 0, totals, 1.0), axis=0)
    frame[totals <= 0] = 1.0 / frame.shape[1]
    return frame


def _poisson(ref: ad.AnnData, sp: ad.AnnData, labels: pd.Series, markers: list[str]) -> pd.DataFrame:
    """Maximum-likelihood cell fractions (spots × labels) of the Poisson mixture on the marker genes."""
    genes = ref.var_names.get_indexer(markers)
    types = list(labels.cat.categories)
    mu, rho = type_signatures(ref.X[:, genes], labels.to_numpy().astype(str), types)
    Y = sparse.csr_matrix(sp.X, dtype=np.float64)[:, genes]  # stays sparse: a capture area has ~650k bins
    pi, _, _ = composition_em(Y, mu, rho)
    return pd.DataFrame(pi, index=sp.obs_names, columns=types)
