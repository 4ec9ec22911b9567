"""Spatial organisation indicators per sample (samples × indicators AnnData)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import anndata as ad
import numpy as np
import pandas as pd
from scipy.spatial import ConvexHull, cKDTree
from spatialdata import SpatialData

from ..._constants import CELL_STATE_KEY, CELL_TYPE_KEY, HISTOCELL_KEY, SPATIAL_KEY
from ..._docs import inject_docs
from ..._errors import InvalidInputError
from ..._utils import check_whole_number, progress_bar
from .graph import delaunay_edges, get_table, require_obs, table_mpp

__all__ = ["INDICATORS", "spatial_indicators"]

INDICATORS = {
    "frac_<type>": "fraction of the sample's nuclei predicted as <type> (obs['cell_type'])",
    "frac_<state>": "fraction of the sample's nuclei in cell state <state> (obs['cell_state']; of all nuclei, not of its type)",
    "density_<type>": "nuclei of <type> per mm² of tissue (tissue area: see area_method)",
    "nhood_z_<a>__<b>": (
        "neighbourhood-enrichment z-score of a–b edges in the Delaunay graph (edges ≤ graph_radius_um), "
        "against n_perms random relabellings (squidpy's nhood_enrichment statistic); symmetric, a ≤ b in type order"
    ),
    "cooc_<a>__<b>_<r>um": (
        "co-occurrence ratio at radius r: share of <b> among the nuclei within r µm of <a> nuclei, "
        "divided by the overall share of <b> (1 = random mixing, > 1 = attraction); squidpy's co_occurrence "
        "divides the same share by <b>'s share among all neighbour pairs instead"
    ),
    "nn_dist_<a>__<b>_um": "mean distance (µm) from each <a> nucleus to its nearest other <b> nucleus",
    "niche_frac_<niche>": "fraction of nuclei in niche <niche> (obs[niche_key], e.g. from tl.tissue_architecture), when present",
    "infiltration_<immune>_in_<tumor>": (
        "fraction of <immune> nuclei (default lymphocyte) whose other nuclei within infiltration_radius_um "
        "are more than half <tumor>; low = immune exclusion from the tumour"
    ),
}
"""Indicator name patterns written by :func:`spatial_indicators`, with their definition."""

DEFAULT_INFILTRATION = ("lymphocyte", "tumor")
"""``(immune, tumour)`` cell types of the infiltration indicator unless given."""

_FAMILIES = {
    "frac_": "fraction",
    "density_": "density",
    "nhood_z_": "nhood_z",
    "cooc_": "cooccurrence",
    "nn_dist_": "nn_distance",
    "niche_frac_": "niche_fraction",
    "infiltration_": "infiltration",
}


@inject_docs
def spatial_indicators(
    samples: SpatialData | ad.AnnData | Sequence | Mapping,
    *,
    nuclei_table_key: str = HISTOCELL_KEY,
    cluster_key: str = CELL_TYPE_KEY,
    state_key: str | None = CELL_STATE_KEY,
    niche_key: str | None = "niche",
    cooc_radius_um: float | Sequence[float] = 30.0,
    graph_radius_um: float | None = 30.0,
    infiltration: tuple[str, str] | None = None,
    infiltration_radius_um: float = 30.0,
    n_perms: int = 100,
    area_method: str = "grid",
    grid_um: float = 50.0,
    mpp: float | None = None,
    seed: int = 0,
    progress: bool = True,
) -> ad.AnnData:
    """Compute spatial organisation indicators for each sample.

    Every name follows a pattern of :data:`INDICATORS` (``frac_<type>``, ``frac_<state>``,
    ``density_<type>``, ``nhood_z_<a>__<b>``, ``cooc_<a>__<b>_<r>um``, ``nn_dist_<a>__<b>_um``,
    ``niche_frac_<niche>``, ``infiltration_lymphocyte_in_tumor``). Types and states are the union
    of the categories over all samples; a fraction or density of an absent type is 0, a
    statistic that needs the type (z-score, ratio, distance) is NaN. A state named like a type (a type
    without states is its own state) gives no ``frac_<state>``: ``frac_<type>`` counts that type.

    Parameters
    ----------
    samples
        One SpatialData, a list of them (named by ``attrs["sample_id"]`` when unique, else
        ``sample_<i>``) or a dict name → SpatialData. Nuclei tables (AnnData) are accepted in place
        of a SpatialData (their mpp from ``mpp`` or ``uns``).
    {nuclei_table_key}
        Read (prediction layout) in each SpatialData; nothing is written into the samples.
    {cluster_key}
    state_key
        ``obs`` column of the cell states (skipped when None, or when the default is absent: a model
        whose states were not trained writes none; another name must exist in some sample).
    niche_key
        ``obs`` column of niches (skipped when None or absent).
    cooc_radius_um
        Radius (or radii) of the co-occurrence ratios, µm.
    graph_radius_um
        Delaunay edges longer than this (µm) are dropped before the enrichment test (None keeps all).
    infiltration
        ``(immune type, tumour type)`` of the infiltration indicator; both must be cell types of the
        samples. Default ``("lymphocyte", "tumor")``, NaN when the samples lack one of them.
    infiltration_radius_um
        Neighbourhood radius of the infiltration indicator, µm.
    n_perms
        Label permutations of the neighbourhood-enrichment z-scores (0: no z-scores, NaN).
    area_method
        Tissue area for the densities: ``"grid"`` (area of the ``grid_um`` × ``grid_um`` squares
        holding at least one nucleus; follows holes and concave outlines) or ``"hull"`` (convex hull
        of the nuclei).
    grid_um
        Square size of ``area_method="grid"``.
    mpp
        µm per pixel of the samples without one (a SpatialData without ``attrs["mpp"]``, an AnnData without it in
        ``uns``); a sample whose own value differs is refused.
    {seed}
        Here of the permutations (the same for every sample, so a sample's values do not depend
        on the others).
    {progress}

    Returns
    -------
    AnnData
        Samples × indicators (new; the samples are not modified): ``X`` (float64), ``obs``
        ``n_nuclei`` and ``tissue_area_mm2``, ``var`` ``family`` and ``description``,
        ``uns["spatial_indicators"]`` the parameters.
    """
    named = _as_samples(samples)
    if area_method not in ("grid", "hull"):
        raise InvalidInputError(f"Unknown area_method {area_method!r}; choose 'grid' or 'hull'.")
    radii = [float(r) for r in np.atleast_1d(cooc_radius_um)]
    checked = [("cooc_radius_um", r) for r in radii] + [("infiltration_radius_um", infiltration_radius_um), ("grid_um", grid_um)]
    for what, r in checked + ([("graph_radius_um", graph_radius_um)] if graph_radius_um is not None else []):
        if not np.isfinite(r) or r <= 0:
            raise InvalidInputError(f"{what} must be a positive number of µm, got {r!r}.")
    check_whole_number("n_perms", n_perms, 0, " (0: no neighbourhood z-scores)")
    tables = {}
    for name, data in named.items():
        table = get_table(data, nuclei_table_key)
        require_obs(table, cluster_key, "column of cell types")
        tables[name] = (table, table_mpp(data, mpp, f"Sample {name!r}"))
    # a model's full list first (tl.predict keeps only the types that occur in obs): absent types count as 0
    types = _categories([*(pd.Series(pd.Categorical([], categories=_model_labels(t, cluster_key))) for t, _ in tables.values()),
                         *(t.obs[cluster_key] for t, _ in tables.values())])
    infiltration = _check_infiltration(infiltration, types, cluster_key)
    if state_key not in (None, CELL_STATE_KEY) and not any(state_key in t.obs for t, _ in tables.values()):
        raise InvalidInputError(f"No sample's nuclei table has obs[{state_key!r}] (state_key); use state_key=None to leave states out.")
    states = _categories([*(pd.Series(pd.Categorical([], categories=_model_labels(t, state_key))) for t, _ in tables.values()),
                          *(t.obs[state_key] for t, _ in tables.values() if state_key in t.obs)]) if state_key else []
    rows, meta = {}, {}
    for name, (table, scale) in progress_bar(tables.items(), desc="spatial indicators", disable=not progress or len(tables) < 2):
        rows[name], meta[name] = _one_sample(
            table, scale, types, states, cluster_key, state_key, niche_key, radii, graph_radius_um,
            infiltration, infiltration_radius_um, n_perms, area_method, grid_um, np.random.default_rng(seed),
        )
    df = pd.DataFrame.from_dict(rows, orient="index")
    niche_cols = [c for c in df.columns if c.startswith("niche_frac_")]
    df[niche_cols] = df[niche_cols].fillna(0.0)
    obs = pd.DataFrame.from_dict(meta, orient="index")
    var = pd.DataFrame(index=df.columns.astype(str))
    var["family"] = [indicator_family(c) for c in var.index]
    var["description"] = [_describe(c) for c in var.index]
    return ad.AnnData(
        X=df.to_numpy(dtype=np.float64),
        obs=obs.set_index(df.index.astype(str)),
        var=var,
        uns={
            "spatial_indicators": {
                "nuclei_table_key": nuclei_table_key, "cluster_key": cluster_key, "state_key": state_key, "niche_key": niche_key,
                "cooc_radius_um": radii, "graph_radius_um": graph_radius_um, "infiltration": list(infiltration),
                "infiltration_radius_um": float(infiltration_radius_um), "n_perms": int(n_perms),
                "area_method": area_method, "grid_um": float(grid_um), "seed": seed,
            }
        },
    )


def _as_samples(samples) -> dict:
    """``{name: SpatialData | AnnData}`` from one sample, a sequence or a mapping."""
    if isinstance(samples, (SpatialData, ad.AnnData)):
        samples = [samples]
    if isinstance(samples, Mapping):
        named = {str(k): v for k, v in samples.items()}
    elif isinstance(samples, Sequence) and not isinstance(samples, str):
        ids = [getattr(s, "attrs", {}).get("sample_id") if isinstance(s, SpatialData) else None for s in samples]
        if all(ids) and len(set(ids)) == len(ids):
            named = {str(i): s for i, s in zip(ids, samples)}
        else:
            named = {f"sample_{i}": s for i, s in enumerate(samples)}
    else:
        raise InvalidInputError(f"samples must be a SpatialData, a list or a dict of them, got {type(samples).__name__}.")
    if not named:
        raise InvalidInputError("samples is empty.")
    return named


def _check_infiltration(infiltration, types: list[str], cluster_key: str) -> tuple[str, str]:
    """The (immune, tumour) pair; an explicit one must name known cell types."""
    if infiltration is None:
        return DEFAULT_INFILTRATION
    if isinstance(infiltration, str) or len(infiltration) != 2:
        raise InvalidInputError(f"infiltration must be a pair (immune type, tumour type), got {infiltration!r}.")
    unknown = [str(t) for t in infiltration if str(t) not in types]
    if unknown:
        raise InvalidInputError(f"infiltration names unknown cell types {unknown}; the cell types in obs[{cluster_key!r}] are {types}.")
    return str(infiltration[0]), str(infiltration[1])


def _model_labels(table, key: str) -> list[str]:
    """The labels a model could predict for ``obs[key]`` (``uns["histocell"]``), or none."""
    meta = table.uns.get("histocell", {})
    return list({"cell_type": meta.get("cell_types", []), "cell_state": meta.get("states", [])}.get(key, []))


def _categories(columns) -> list[str]:
    """Union of the categories (or unique values) of several obs columns, in first-seen order."""
    out: dict[str, None] = {}
    for col in columns:
        values = col.cat.categories if isinstance(col.dtype, pd.CategoricalDtype) else pd.unique(col.dropna())
        out.update(dict.fromkeys(str(v) for v in values))
    return list(out)


def _codes(col: pd.Series, names: list[str]) -> np.ndarray:
    """Index of each value in ``names`` (-1 for missing)."""
    return pd.Categorical(col.astype(object).where(col.notna(), None).map(lambda v: None if v is None else str(v)), categories=names).codes.astype(np.int64)


def tissue_area_mm2(xy_um: np.ndarray, method: str = "grid", grid_um: float = 50.0) -> float:
    """Tissue area (mm²) covered by nuclei at ``xy_um``: occupied ``grid_um`` squares or convex hull."""
    if len(xy_um) == 0:
        return float("nan")
    if method == "hull":
        if len(xy_um) < 3:
            return float("nan")
        try:
            return float(ConvexHull(xy_um).volume) / 1e6
        except Exception:  # noqa: BLE001 - degenerate (collinear) layout
            return float("nan")
    cells = np.unique(np.floor(xy_um / grid_um).astype(np.int64), axis=0)
    return len(cells) * grid_um**2 / 1e6


def _one_sample(table, mpp, types, states, cluster_key, state_key, niche_key, radii, graph_radius_um,
                infiltration, infiltration_radius_um, n_perms, area_method, grid_um, rng) -> tuple[dict, dict]:
    xy = np.asarray(table.obsm[SPATIAL_KEY], dtype=np.float64)[:, :2] * mpp
    t = _codes(table.obs[cluster_key], types)
    ok = t >= 0
    xy, t = xy[ok], t[ok]
    k, n = len(types), len(t)
    out: dict[str, float] = {}
    area = tissue_area_mm2(xy, area_method, grid_um)
    counts = np.bincount(t, minlength=k).astype(float)
    frac = counts / n if n else np.full(k, np.nan)
    for a, name in enumerate(types):
        out[f"frac_{name}"] = frac[a]
    if states:
        s = _codes(table.obs[state_key], states)[ok] if state_key in table.obs else np.full(n, -1)
        sc = np.bincount(s[s >= 0], minlength=len(states)).astype(float)
        for b, name in enumerate(states):
            if name not in types:  # a type without states is its own state: frac_<type> already counts it
                out[f"frac_{name}"] = sc[b] / n if n else np.nan
    for a, name in enumerate(types):
        out[f"density_{name}"] = counts[a] / area if area and np.isfinite(area) else np.nan
    out |= _nhood_z(xy, t, types, graph_radius_um, n_perms, rng, counts)
    r_max = max(radii + [float(infiltration_radius_um)])
    pairs = cKDTree(xy).query_pairs(r_max, output_type="ndarray") if n > 1 else np.zeros((0, 2), dtype=np.int64)
    dist = np.linalg.norm(xy[pairs[:, 0]] - xy[pairs[:, 1]], axis=1)
    for r in radii:
        out |= _cooc(pairs[dist <= r], t, types, frac, counts, r)
    out |= _nn_dist(xy, t, types, counts)
    if niche_key and niche_key in table.obs:
        niches = table.obs[niche_key][ok]
        for name, value in niches.astype(str).where(niches.notna()).value_counts(normalize=False).items():
            out[f"niche_frac_{name}"] = value / n
    out |= _infiltration(pairs[dist <= infiltration_radius_um], t, types, infiltration)
    return out, {"n_nuclei": int(n), "tissue_area_mm2": area}


def _nhood_z(xy, t, types, graph_radius_um, n_perms, rng, counts) -> dict:
    """Neighbourhood-enrichment z-scores of every unordered type pair on the Delaunay graph."""
    k = len(types)
    i, j = delaunay_edges(xy, graph_radius_um) if len(xy) >= 3 else (np.zeros(0, int), np.zeros(0, int))
    src, dst = np.concatenate([i, j]), np.concatenate([j, i])

    def count(labels):
        return np.bincount(labels[src] * k + labels[dst], minlength=k * k).astype(float)

    obs = count(t)
    perms = np.stack([count(rng.permutation(t)) for _ in range(int(n_perms))]) if n_perms > 0 and len(src) else np.zeros((0, k * k))
    with np.errstate(divide="ignore", invalid="ignore"):
        sd = perms.std(axis=0) if len(perms) else np.zeros(k * k)
        z = np.where(sd > 0, (obs - (perms.mean(axis=0) if len(perms) else 0)) / sd, np.nan).reshape(k, k)
    present = counts > 0
    return {
        f"nhood_z_{types[a]}__{types[b]}": (z[a, b] if present[a] and present[b] else np.nan)
        for a in range(k) for b in range(a, k)
    }


def _cooc(pairs, t, types, frac, counts, r) -> dict:
    """Co-occurrence ratios at radius ``r`` from the (unordered) pairs within ``r``."""
    k = len(types)
    a_, b_ = t[pairs[:, 0]], t[pairs[:, 1]]
    m = (np.bincount(a_ * k + b_, minlength=k * k) + np.bincount(b_ * k + a_, minlength=k * k)).reshape(k, k).astype(float)
    row = m.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (m / row) / frac[None, :]
    out = {}
    for a in range(k):
        for b in range(k):
            ok = counts[a] > 0 and counts[b] > 0 and row[a, 0] > 0
            out[f"cooc_{types[a]}__{types[b]}_{r:g}um"] = ratio[a, b] if ok else np.nan
    return out


def _nn_dist(xy, t, types, counts) -> dict:
    """Mean distance from each nucleus of type a to the nearest other nucleus of type b."""
    k = len(types)
    out = {f"nn_dist_{types[a]}__{types[b]}_um": np.nan for a in range(k) for b in range(k)}
    for b in range(k):
        idx_b = np.flatnonzero(t == b)
        if len(idx_b) == 0:
            continue
        kk = 2 if len(idx_b) > 1 else 1
        d, nb = cKDTree(xy[idx_b]).query(xy, k=kk)
        d, nb = d.reshape(len(xy), kk), nb.reshape(len(xy), kk)
        nearest = d[:, 0].copy()
        self_hit = t == b
        nearest[self_hit] = d[self_hit, 1] if kk == 2 else np.nan  # skip the nucleus itself
        sums = np.bincount(t, weights=np.nan_to_num(nearest), minlength=k)
        valid = np.bincount(t, weights=np.isfinite(nearest).astype(float), minlength=k)
        for a in range(k):
            if counts[a] > 0 and valid[a] > 0:
                out[f"nn_dist_{types[a]}__{types[b]}_um"] = sums[a] / valid[a]
    return out


def _infiltration(pairs, t, types, infiltration) -> dict:
    """Fraction of immune nuclei whose other nuclei within the radius are mostly tumour."""
    immune, tumor = infiltration
    name = f"infiltration_{immune}_in_{tumor}"
    if immune not in types or tumor not in types:
        return {name: np.nan}
    ci, ct = types.index(immune), types.index(tumor)
    n = len(t)
    src, dst = np.concatenate([pairs[:, 0], pairs[:, 1]]), np.concatenate([pairs[:, 1], pairs[:, 0]])
    total = np.bincount(src, minlength=n)
    tum = np.bincount(src, weights=(t[dst] == ct).astype(float), minlength=n)
    is_imm = t == ci
    if not is_imm.any():
        return {name: np.nan}
    with np.errstate(divide="ignore", invalid="ignore"):
        inside = (total > 0) & (tum / np.maximum(total, 1) > 0.5)
    return {name: float(inside[is_imm].mean())}


def indicator_family(name: str) -> str:
    for prefix in sorted(_FAMILIES, key=len, reverse=True):
        if name.startswith(prefix):
            return _FAMILIES[prefix]
    return "other"


def _describe(name: str) -> str:
    fam = indicator_family(name)
    pattern = {
        "fraction": "frac_<type>",
        "density": "density_<type>",
        "nhood_z": "nhood_z_<a>__<b>",
        "cooccurrence": "cooc_<a>__<b>_<r>um",
        "nn_distance": "nn_dist_<a>__<b>_um",
        "niche_fraction": "niche_frac_<niche>",
        "infiltration": "infiltration_<immune>_in_<tumor>",
    }.get(fam)
    return INDICATORS.get(pattern, "") if pattern else ""
