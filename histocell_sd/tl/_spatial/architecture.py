"""Tissue architecture: niches from each nucleus's neighbourhood composition."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from spatialdata import SpatialData
from spatialdata.models import ShapesModel

from ..._constants import (
    CELL_TYPE_KEY,
    HISTOCELL_KEY,
    NUCLEI_OBS_LAYOUT,
    PALETTE,
    SPATIAL_KEY,
)
from ..._docs import inject_docs
from ..._errors import InvalidInputError
from ..._utils import check_key_added, check_storable_names, check_whole_number, copy_for_writing
from ...io._elements import pixel_transformations
from ...io._schema import set_categorical
from .graph import get_table, radius_adjacency, require_obs, table_mpp

__all__ = ["tissue_architecture"]

_DOMINANT = 0.5  # a niche is "<type>-rich" when that type makes at least half its neighbourhoods


@inject_docs
def tissue_architecture(
    sdata: SpatialData,
    *,
    nuclei_table_key: str = HISTOCELL_KEY,
    cluster_key: str = CELL_TYPE_KEY,
    radius_um: float = 30.0,
    n_niches: int | None = None,
    smooth: int = 1,
    key_added: str = "niche",
    method: str = "kmeans",
    region_buffer_um: float | None = None,
    simplify_um: float = 5.0,
    max_niches: int = 8,
    seed: int = 0,
    copy: bool = False,
) -> SpatialData | None:
    """Annotate tissue niches from each nucleus's neighbourhood composition.

    Each nucleus gets the fraction of each cell type among the nuclei within ``radius_um``
    (itself included), averaged ``smooth`` times over the same neighbourhoods (a smoother
    field, fewer speckles at boundaries). The composition vectors are clustered (KMeans with a fixed seed, or
    scanpy's leiden) into niches, named by their dominant composition (``"tumor-rich"``, or
    ``"fibroblast+lymphocyte-mixed"`` when no type reaches half; names hold no ``/``, which zarr keys cannot).

    Parameters
    ----------
    sdata
        The sample with the nuclei table ``nuclei_table_key`` (prediction layout) and ``attrs["mpp"]``.
    {nuclei_table_key}
        Read (``obsm["spatial"]``, ``obs[cluster_key]``) and written (see ``key_added``).
    {cluster_key}
    radius_um
        Neighbourhood radius, µm.
    smooth
        Extra averaging passes of the compositions over each neighbourhood (0 = raw fractions).
    n_niches
        Number of niches (KMeans). None picks 2–``max_niches`` by the silhouette score on a
        subsample. Ignored by ``method="leiden"``.
    {key_added}
        writes ``obs[key_added]`` (categorical niche per nucleus), ``obsm[f"{key_added}_composition"]``
        (DataFrame, neighbourhood fractions) and ``uns[key_added]`` (parameters and the mean
        composition per niche) of the nuclei table, and the shapes element ``f"{key_added}_regions"``
        (one (multi)polygon per niche, in ``global`` pixels, column ``key_added``).
    method
        ``"kmeans"`` or ``"leiden"`` (on a kNN graph of the compositions).
    region_buffer_um
        Radius of the discs around nuclei whose union forms the region polygons (default
        ``radius_um / 3``).
    simplify_um
        Tolerance of the polygon simplification, µm.
    max_niches
        Upper bound of the automatic choice.
    {seed}
        Here of the clustering.
    {copy}

    Returns
    -------
    SpatialData or None
        None: the niches are written into ``sdata`` (see ``key_added``). With ``copy=True``, a
        SpatialData holding them (tables copied, other elements shared with ``sdata``).
    """
    if not isinstance(sdata, SpatialData):
        raise InvalidInputError(f"tissue_architecture needs a SpatialData (to store region polygons), got {type(sdata).__name__}.")
    if method not in ("kmeans", "leiden"):
        raise InvalidInputError(f"Unknown niche method {method!r}; choose 'kmeans' or 'leiden'.")
    if not np.isfinite(radius_um) or radius_um <= 0:
        raise InvalidInputError(f"radius_um must be a positive number of µm, got {radius_um!r}.")
    if region_buffer_um is not None and not (np.isfinite(region_buffer_um) and region_buffer_um > 0):
        raise InvalidInputError(f"region_buffer_um must be a positive number of µm, got {region_buffer_um!r}.")
    if not (np.isfinite(simplify_um) and simplify_um >= 0):
        raise InvalidInputError(f"simplify_um must be a non-negative number of µm, got {simplify_um!r}.")
    for name, value in (("smooth", smooth), ("n_niches", n_niches)):
        if value is not None:
            check_whole_number(name, value, 0)
    if copy:
        sdata = copy_for_writing(sdata)
    table = get_table(sdata, nuclei_table_key)
    require_obs(table, cluster_key, "column of cell types")
    # the nuclei table's own columns and the cell types read here are not niches to overwrite
    earlier = table.uns.get(key_added) if isinstance(key_added, str) else None
    ours = isinstance(earlier, dict) and "composition" in earlier  # an earlier tissue_architecture wrote it
    check_key_added(key_added, {cluster_key, *NUCLEI_OBS_LAYOUT} | (set() if ours else set(table.obs.columns)), "obs")
    mpp = table_mpp(sdata)
    labels = table.obs[cluster_key]
    types = list(labels.cat.categories) if isinstance(labels.dtype, pd.CategoricalDtype) else sorted(labels.dropna().astype(str).unique())
    check_storable_names(types, f"The cell types in obs[{cluster_key!r}]")  # they name the composition's columns
    codes = pd.Categorical(labels.astype(object), categories=types).codes
    if table.n_obs < 10:
        raise InvalidInputError(f"Too few nuclei ({table.n_obs}) to find niches.")
    if n_niches is not None and not 1 <= int(n_niches) <= table.n_obs:
        raise InvalidInputError(f"n_niches must be between 1 and the number of nuclei, got {n_niches!r}.")
    xy_px = np.asarray(table.obsm[SPATIAL_KEY], dtype=np.float64)[:, :2]
    comp = neighbourhood_composition(xy_px * mpp, codes, len(types), radius_um, smooth=int(smooth))
    niche_idx = _cluster(comp, n_niches, method, max_niches, seed)
    names, mean_comp = _names(comp, niche_idx, types)
    cats = list(dict.fromkeys(names[i] for i in np.unique(niche_idx)))
    set_categorical(table, key_added, cats, pd.Index(cats).get_indexer(names[niche_idx]))
    table.uns[f"{key_added}_colors"] = _niche_colours(table, cluster_key, cats, types)
    table.obsm[f"{key_added}_composition"] = pd.DataFrame(comp, index=table.obs_names, columns=[str(t) for t in types])
    table.uns[key_added] = {
        "radius_um": float(radius_um),
        "method": method,
        "smooth": int(smooth),
        "n_niches": len(cats),
        "cluster_key": cluster_key,
        "composition": {names[i]: dict(zip(map(str, types), map(float, mean_comp[i]))) for i in np.unique(niche_idx)},
    }
    buffer_px = (radius_um / 3 if region_buffer_um is None else region_buffer_um) / mpp
    sdata.shapes[f"{key_added}_regions"] = _regions(xy_px, table.obs[key_added], buffer_px, simplify_um / mpp, key_added, mpp)
    return sdata if copy else None


def neighbourhood_composition(xy_um: np.ndarray, codes: np.ndarray, n_types: int, radius_um: float, smooth: int = 0) -> np.ndarray:
    """Fraction of each type among the nuclei within ``radius_um`` of each nucleus (itself included).

    ``smooth`` further passes replace each vector by the mean over the same neighbourhood.
    """
    adj = radius_adjacency(xy_um, radius_um, include_self=True)
    onehot = np.zeros((len(codes), n_types), dtype=np.float32)
    valid = codes >= 0
    onehot[np.flatnonzero(valid), codes[valid]] = 1.0
    counts = np.asarray(adj @ onehot)
    comp = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)
    degree = np.asarray(adj.sum(axis=1)).ravel()
    for _ in range(max(int(smooth), 0)):
        comp = np.asarray(adj @ comp) / np.maximum(degree, 1.0)[:, None]
    return comp


def _cluster(comp: np.ndarray, n_niches, method: str, max_niches: int, seed: int) -> np.ndarray:
    if method == "leiden":
        import anndata as ad
        import scanpy as sc

        tmp = ad.AnnData(comp.astype(np.float32))
        sc.pp.neighbors(tmp, n_neighbors=15, use_rep="X", random_state=seed)
        sc.tl.leiden(tmp, resolution=0.3, random_state=seed, flavor="igraph", n_iterations=2, directed=False)
        return tmp.obs["leiden"].astype(int).to_numpy()
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    if n_niches is None:
        rng = np.random.default_rng(seed)
        sub = comp[rng.choice(len(comp), min(len(comp), 3000), replace=False)]
        best, best_k = -np.inf, 2
        for k in range(2, max(2, min(max_niches, len(sub) - 1)) + 1):
            lab = KMeans(k, n_init=4, random_state=seed).fit_predict(sub)
            if len(np.unique(lab)) < 2:
                continue
            score = silhouette_score(sub, lab)
            if score > best + 0.01:  # prefer fewer niches unless clearly better
                best, best_k = score, k
        n_niches = best_k
    return KMeans(int(n_niches), n_init=10, random_state=seed).fit_predict(comp)


def _names(comp: np.ndarray, idx: np.ndarray, types: list) -> tuple[np.ndarray, np.ndarray]:
    """A readable name per cluster from its mean composition (made unique with a suffix)."""
    k = int(idx.max()) + 1
    mean = np.stack([comp[idx == i].mean(axis=0) if (idx == i).any() else np.zeros(comp.shape[1]) for i in range(k)])
    names, seen = [], {}
    for row in mean:
        order = np.argsort(row)[::-1]
        name = f"{types[order[0]]}-rich" if row[order[0]] >= _DOMINANT or len(order) < 2 else f"{types[order[0]]}+{types[order[1]]}-mixed"
        seen[name] = seen.get(name, 0) + 1
        names.append(name if seen[name] == 1 else f"{name} {seen[name]}")
    return np.asarray(names, dtype=object), mean


def _niche_colours(table, cluster_key: str, niches: list[str], types: list) -> list[str]:
    """A niche rich in one cell type takes that type's colour (``uns[f"{cluster_key}_colors"]``, else the package
    palette in type order), so maps of niches and of cell types read alike; the others take colours no type has."""
    stored = table.uns.get(f"{cluster_key}_colors")
    if stored is not None and len(stored) == len(types):
        type_colour = {str(t): str(c) for t, c in zip(types, stored)}
    else:
        type_colour = {str(t): PALETTE[i % len(PALETTE)] for i, t in enumerate(types)}
    spare = [c for c in PALETTE if c not in type_colour.values()] or list(PALETTE)
    colours, k = [], 0
    for name in niches:
        rich = type_colour.get(name.removesuffix("-rich")) if name.endswith("-rich") else None
        if rich is None or rich in colours:
            rich, k = spare[k % len(spare)], k + 1
        colours.append(rich)
    return colours


def _regions(xy_px: np.ndarray, niche: pd.Series, buffer_px: float, simplify_px: float, key: str, mpp: float) -> gpd.GeoDataFrame:
    """One simplified (multi)polygon per niche: union of discs around its nuclei."""
    geoms, names = [], []
    for name in niche.cat.categories:
        pts = xy_px[(niche == name).to_numpy()]
        if not len(pts):
            continue
        union = shapely.union_all(shapely.buffer(shapely.points(pts), buffer_px, quad_segs=2))
        geoms.append(shapely.simplify(union, simplify_px))
        names.append(name)
    gdf = gpd.GeoDataFrame({key: pd.Categorical(names, categories=list(niche.cat.categories))}, geometry=geoms, index=pd.Index(names, name=key).astype(str))
    gdf.index = pd.RangeIndex(len(gdf))
    return ShapesModel.parse(gdf, transformations=pixel_transformations(mpp))
