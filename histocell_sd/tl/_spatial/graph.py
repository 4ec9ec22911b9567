"""The cell graph of predicted nuclei, built with squidpy (µm aware)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import scipy.sparse as sp
from scipy.spatial import Delaunay
from spatialdata import SpatialData

from ..._constants import CELL_TYPE_KEY, HISTOCELL_KEY, SPATIAL_KEY, SPATIAL_UM_KEY
from ..._docs import inject_docs
from ..._errors import InvalidInputError
from ..._utils import quiet_logger
from ...io._elements import check_mpp, get_mpp

__all__ = ["cell_graph"]

SPATIALDATA_LOGGER = "spatialdata._logging"  # squidpy logs through it

METHODS = ("delaunay", "radius", "knn")


def get_table(data: SpatialData | ad.AnnData, nuclei_table_key: str = HISTOCELL_KEY) -> ad.AnnData:
    """The nuclei table: ``data`` itself when an AnnData, else ``data.tables[nuclei_table_key]``."""
    if isinstance(data, ad.AnnData):
        table = data
    elif isinstance(data, SpatialData):
        if nuclei_table_key not in data.tables:
            raise InvalidInputError(
                f"No table {nuclei_table_key!r} in the SpatialData (it has {sorted(data.tables)}); "
                "run segmentation and tl.predict first or pass nuclei_table_key."
            )
        table = data.tables[nuclei_table_key]
    else:
        raise InvalidInputError(f"Expected a SpatialData or an AnnData, got {type(data).__name__}.")
    if SPATIAL_KEY not in table.obsm:
        raise InvalidInputError(f"The nuclei table has no obsm[{SPATIAL_KEY!r}] (centroids in pixels).")
    return table


def table_mpp(data: SpatialData | ad.AnnData, mpp: float | None = None, name: str = "The sample") -> float:
    """µm per pixel: the sample's own (``sdata.attrs["mpp"]`` or the table's ``uns``), else ``mpp``.

    A given ``mpp`` that disagrees with the sample's own is refused (it would rescale every distance silently).
    """
    given = None if mpp is None else check_mpp(mpp)
    own, source = None, None
    if isinstance(data, SpatialData):
        own, source = (get_mpp(data), "sdata.attrs['mpp']") if given is None or "mpp" in data.attrs else (None, None)
    else:
        uns = data.uns
        histocell = uns.get("histocell") if isinstance(uns.get("histocell"), dict) else {}
        for value, where in ((uns.get("mpp"), "uns['mpp']"), (histocell.get("mpp"), "uns['histocell']['mpp']")):
            if value is not None:
                own, source = check_mpp(value), f"the table's {where}"
                break
    if own is not None and given is not None and not np.isclose(own, given, rtol=1e-6):
        raise InvalidInputError(
            f"{name} declares {own} µm per pixel ({source}), but mpp={given} was given: mpp= is only for samples without one. "
            f"Leave mpp= out, or correct {source}."
        )
    if own is not None or given is not None:
        return own if own is not None else given
    raise InvalidInputError(
        "No µm per pixel for this AnnData: pass mpp=..., or set adata.uns['mpp'] (or adata.uns['histocell']['mpp'])."
    )


def require_obs(table: ad.AnnData, key: str, what: str = "column") -> None:
    """Raise a clear error when ``table.obs[key]`` is missing."""
    if key not in table.obs:
        hint = " (written by tl.predict)" if key == CELL_TYPE_KEY else ""
        raise InvalidInputError(f"The nuclei table has no obs[{key!r}] {what}{hint}; it has {list(table.obs.columns)}.")


@inject_docs
def cell_graph(
    data: SpatialData | ad.AnnData,
    *,
    nuclei_table_key: str = HISTOCELL_KEY,
    method: str = "delaunay",
    radius_um: float | None = 30.0,
    n_neighbors: int = 6,
    mpp: float | None = None,
    spatial_key: str = SPATIAL_KEY,
    key_added: str = "spatial",
    copy: bool = False,
) -> ad.AnnData | None:
    """Build the spatial graph of the nuclei with squidpy, its radius in µm.

    After this, squidpy's graph tools run on the predictions directly, e.g.
    ``sq.gr.nhood_enrichment(sdata, "cell_type", table_key="histocell")``.

    Parameters
    ----------
    data
        A SpatialData holding the nuclei table ``nuclei_table_key``, or the nuclei table (AnnData) itself.
    {nuclei_table_key}
        Read (``obsm["spatial"]``) and written (the graph); ignored for an AnnData.
    method
        ``"delaunay"`` (:func:`squidpy.gr.spatial_neighbors_delaunay`; edges longer than
        ``radius_um`` are pruned unless ``radius_um`` is None), ``"radius"`` (all pairs within
        ``radius_um``, :func:`squidpy.gr.spatial_neighbors_radius`) or ``"knn"`` (``n_neighbors``
        nearest nuclei, :func:`squidpy.gr.spatial_neighbors_knn`; ``radius_um`` ignored).
    radius_um
        Neighbourhood radius in µm (converted to pixels with the sample's mpp).
    {n_neighbors}
        Used by ``method="knn"`` (squidpy's ``n_neighs``).
    {mpp}
    spatial_key
        The centroids the graph is built on: ``"spatial"`` (pixels) or ``"spatial_um"`` (µm, no µm/px needed), which
        are also the units of the distances written.
    {key_added}
        squidpy's key prefix: writes ``obsp[f"{key_added}_connectivities"]``,
        ``obsp[f"{key_added}_distances"]`` (in the units of ``spatial_key``) and ``uns[f"{key_added}_neighbors"]``
        (squidpy's parameters plus ``method``, ``radius_um``, ``n_neighbors``, ``mpp`` and ``distance_unit``).
    {copy}
        The copy is of the nuclei table (an AnnData), also for a SpatialData.

    Returns
    -------
    AnnData or None
        None: the graph is written into the nuclei table. With ``copy=True``, a copy of the nuclei
        table carrying the graph.
    """
    import squidpy as sq

    if method not in METHODS:
        raise InvalidInputError(f"Unknown graph method {method!r}; choose from {list(METHODS)}.")
    table = get_table(data, nuclei_table_key)
    if copy:
        table = table.copy()
    if spatial_key not in (SPATIAL_KEY, SPATIAL_UM_KEY):
        raise InvalidInputError(f"spatial_key must be {SPATIAL_KEY!r} (pixels) or {SPATIAL_UM_KEY!r} (µm), got {spatial_key!r}.")
    if spatial_key not in table.obsm:
        raise InvalidInputError(f"The nuclei table has no obsm[{spatial_key!r}]; run pp.segment_nuclei or io.read_nuclei.")
    scale = table_mpp(data, mpp) if spatial_key == SPATIAL_KEY else None  # centroids in µm need no µm/px
    units = scale or 1.0  # µm per coordinate unit
    if radius_um is not None and (not np.isfinite(radius_um) or radius_um <= 0):
        raise InvalidInputError(f"radius_um must be a positive number of µm, got {radius_um!r}.")
    if method == "radius" and radius_um is None:
        raise InvalidInputError("method='radius' needs radius_um (µm).")
    if method == "knn" and (int(n_neighbors) < 1 or int(n_neighbors) >= table.n_obs):
        raise InvalidInputError(f"n_neighbors must be between 1 and the number of nuclei - 1, got {n_neighbors!r}.")
    if table.n_obs < (4 if method == "delaunay" else 2):
        raise InvalidInputError(f"Too few nuclei ({table.n_obs}) for a {method} graph.")
    radius = None if radius_um is None else float(radius_um) / units
    if method == "delaunay":  # Qhull needs the nuclei to span an area
        xy = np.asarray(table.obsm[spatial_key], dtype=np.float64)[:, :2]
        if np.linalg.matrix_rank(xy - xy.mean(0), tol=1e-9) < 2:
            raise InvalidInputError("The nuclei's centroids all coincide or lie on one line: no Delaunay graph; use method='radius' or 'knn'.")
    with quiet_logger(SPATIALDATA_LOGGER):  # squidpy logs "Creating graph using ..." through spatialdata's logger
        if method == "delaunay":
            sq.gr.spatial_neighbors_delaunay(table, spatial_key=spatial_key, radius=radius, key_added=key_added)
        elif method == "radius":
            sq.gr.spatial_neighbors_radius(table, spatial_key=spatial_key, radius=radius, key_added=key_added)
        else:
            sq.gr.spatial_neighbors_knn(table, spatial_key=spatial_key, n_neighs=int(n_neighbors), key_added=key_added)
    params = table.uns.setdefault(f"{key_added}_neighbors", {})
    squidpy_params = params.get("params", {})
    for name, value in squidpy_params.items():  # squidpy records radius=(0, r) as a tuple, which anndata cannot write
        if isinstance(value, tuple):
            squidpy_params[name] = list(value)
    params["histocell"] = {"method": method, "radius_um": radius_um, "n_neighbors": int(n_neighbors), "mpp": scale,
                           "distance_unit": "px" if spatial_key == SPATIAL_KEY else "um"}
    return table if copy else None


def delaunay_edges(xy: np.ndarray, max_len: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Undirected Delaunay edges ``(i, j)`` (``i < j``, sorted) of points ``xy``, longer than ``max_len`` dropped.

    The edges of :class:`scipy.spatial.Delaunay` (``vertex_neighbor_vertices``), i.e. the graph of
    ``squidpy.gr.spatial_neighbors(delaunay=True)``; fewer than 3 points are all joined, collinear
    points give no edge.
    """
    if len(xy) < 3:
        i, j = np.triu_indices(len(xy), 1)
    else:
        try:
            tri = Delaunay(xy)
        except Exception:  # noqa: BLE001 - collinear points: no triangulation
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        indptr, neighbours = tri.vertex_neighbor_vertices  # scipy's CSR of the triangulation's edges
        src = np.repeat(np.arange(len(xy), dtype=np.int64), np.diff(indptr))
        keep = src < neighbours
        i, j = src[keep], neighbours[keep].astype(np.int64)
        order = np.lexsort((j, i))
        i, j = i[order], j[order]
    if max_len is not None:
        keep = np.linalg.norm(xy[i] - xy[j], axis=1) <= max_len
        i, j = i[keep], j[keep]
    return i.astype(np.int64), j.astype(np.int64)


def radius_adjacency(xy: np.ndarray, radius: float, include_self: bool = False) -> sp.csr_matrix:
    """Symmetric binary adjacency of the points within ``radius`` of each other."""
    from scipy.spatial import cKDTree

    pairs = cKDTree(xy).query_pairs(radius, output_type="ndarray")
    n = len(xy)
    rows = np.concatenate([pairs[:, 0], pairs[:, 1]] + ([np.arange(n)] if include_self else []))
    cols = np.concatenate([pairs[:, 1], pairs[:, 0]] + ([np.arange(n)] if include_self else []))
    return sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(n, n))
