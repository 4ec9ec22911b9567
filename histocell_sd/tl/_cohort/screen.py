"""Image-based phenotype screening: which cell population's abundance drives a phenotype."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
from spatialdata import SpatialData

from ..._constants import CELL_STATE_KEY, CELL_TYPE_KEY, CELL_TYPE_PROBA_KEY, EMBEDDING_KEY, HISTOCELL_KEY, NUCLEI_OBS_LAYOUT, SPATIAL_KEY
from ..._docs import inject_docs
from ..._errors import InvalidInputError
from ..._utils import check_key_added, progress_bar, user_stacklevel
from .._spatial.graph import get_table
from .stats import _associate, _response_kind

__all__ = ["PhenotypeScreen", "screen_phenotype"]

CROP_MPP = 0.5  # µm/px of the example crops, whatever the slides' µm/px


@dataclass(kw_only=True)
class PhenotypeScreen:
    """Result of :func:`screen_phenotype`.

    Attributes
    ----------
    table
        One row per population, ranked (see :func:`screen_phenotype`).
    abundance
        AnnData samples × populations: ``X`` the fraction of each sample's nuclei in each population,
        ``obs`` the phenotype.
    attention
        Per pooled nucleus: ``sample``, ``population``, ``attention`` (MIL attention × bag size,
        1 = uniform), or None without MIL.
    crops
        Array ``(n, side, side, 3)`` uint8 of example nuclei of the top population (``side`` =
        ``crop_um`` / 0.5 µm/px), or None
        when the samples have no image.
    crop_info
        ``sample``, ``nucleus`` and centre ``x``/``y`` (px) of each crop.
    mil
        MIL training summary (``seeds``, final ``loss`` per seed, ``kind``).
    """

    table: pd.DataFrame
    abundance: ad.AnnData
    attention: pd.DataFrame | None = None
    crops: np.ndarray | None = None
    crop_info: pd.DataFrame | None = None
    mil: dict = field(default_factory=dict)

    @property
    def top(self) -> str:
        """Name of the top-ranked population."""
        return str(self.table.index[0])

    def __repr__(self) -> str:
        crops = "no crops" if self.crops is None else f"{len(self.crops)} crops"
        return f"PhenotypeScreen({len(self.table)} populations, top {self.top!r}, {self.abundance.n_obs} samples, {crops})"


@inject_docs
def screen_phenotype(
    samples: Mapping[str, SpatialData | ad.AnnData] | Sequence[SpatialData],
    *,
    phenotype_key: str,
    clinical: pd.DataFrame | None = None,
    nuclei_table_key: str = HISTOCELL_KEY,
    use_rep: str = EMBEDDING_KEY,
    resolution: float = 0.5,
    n_neighbors: int = 15,
    n_cells_per_sample: int = 200,
    key_added: str | None = "population",
    mil: bool = True,
    mil_seeds: Sequence[int] = (0, 1, 2),
    mil_epochs: int = 100,
    mil_bag_size: int = 64,
    rank_by: str = "p",
    n_crops: int = 16,
    crop_um: float = 16.0,
    image_key: str | None = None,
    seed: int = 0,
    progress: bool = True,
    crop_px: int | None = None,
) -> PhenotypeScreen:
    """Screen the cell populations whose abundance is associated with a phenotype.

    1. **Populations**: ``n_cells_per_sample`` nuclei per sample (seeded subsample) are pooled over
       the cohort; their representation ``obsm[use_rep]`` (HistoCell's embedding; the cell-type
       probabilities when absent) is clustered on a kNN graph (scanpy ``neighbors`` then
       ``leiden``). Every
       nucleus of every sample is then assigned the population of its nearest pooled neighbours.
       Each population is described by its dominant predicted ``cell_type`` and ``cell_state``.
    2. **Association**: each population's per-sample abundance (fraction of nuclei) against the
       phenotype: AUC + Mann–Whitney (binary) or Spearman (continuous), Benjamini–Hochberg FDR.
    3. **Attention MIL** (``mil=True``): a gated-attention MIL model (Ilse et al., 2018) reads each
       sample as a bag of its pooled nuclei and predicts the phenotype; trained on CPU from fixed
       seeds (deterministic), its mean attention per population (× bag size: 1 = uniform) is a
       second, nucleus-level ranking.

    Parameters
    ----------
    samples
        Dict sample id → SpatialData (or nuclei table) in the prediction layout, or a list
        (named by ``attrs["sample_id"]``).
    phenotype_key
        Clinical column of the phenotype (binary or continuous).
    clinical
        Clinical DataFrame indexed by sample id.
    {nuclei_table_key}
        Read in each sample (and written, see ``key_added``).
    use_rep
        ``obsm`` key of the representation, with the same columns in every sample. With the default, when no
        sample has ``obsm["histocell_embedding"]``, all are clustered on ``obsm["cell_type_proba"]``.
    resolution, n_neighbors
        Clustering resolution and kNN graph size.
    n_cells_per_sample
        Nuclei per sample pooled for the clustering and as the MIL bag.
    {key_added}
        when set, every nucleus's population is written to ``obs[key_added]`` of its nuclei table
        (in place; None writes nothing), so :func:`~histocell_sd.tl.spatial_indicators` with ``cluster_key=key_added``
        gives per-population spatial indicators; written once the screen has succeeded. The data model's
        columns (``cell_type``, ``cell_state``, ``compartment``, ``spot_id``, ...) are refused.
    mil, mil_seeds, mil_epochs, mil_bag_size
        Train the attention-MIL model, its seeds (attention averaged), epochs and nuclei per bag
        (the first ``mil_bag_size`` pooled nuclei of each sample, a random subsample).
    rank_by
        ``"p"`` (association test; ties by attention) or ``"mil_attention"``.
    n_crops, crop_um, image_key
        Example image crops of the top population: ``crop_um`` µm square around each nucleus, at
        0.5 µm/px whatever the slides' µm/px (skipped when the samples have no image).
    {seed}
        Here of the subsampling and clustering.
    {progress}
    crop_px
        Deprecated (it counted each slide's own pixels): read as ``crop_um = crop_px × 0.5``; use ``crop_um``.

    Returns
    -------
    PhenotypeScreen
        A :class:`PhenotypeScreen` whose ``table`` is indexed by ``population`` with
        ``dominant_cell_type``, ``dominant_cell_state``, ``purity`` (share of the dominant state),
        ``n_nuclei`` (pooled), ``mean_abundance``, ``effect`` (AUC or Spearman rho), ``direction``,
        ``p``, ``fdr`` and ``mil_attention``; ``table.attrs`` ``kind`` and ``effect``.
    """
    named = _named(samples)
    if crop_px is not None:  # it meant the slides' own pixels; crop_px elsewhere means pixels at a model's canonical µm/px
        warnings.warn("screen_phenotype(crop_px=...) is deprecated; use crop_um (µm).", FutureWarning, stacklevel=2)
        crop_um = crop_px * CROP_MPP
    if not (np.isfinite(crop_um) and crop_um > 0):
        raise InvalidInputError(f"crop_um must be a positive number of µm, got {crop_um!r}.")
    if rank_by not in ("p", "mil_attention"):
        raise InvalidInputError(f"rank_by must be 'p' or 'mil_attention', got {rank_by!r}.")
    if rank_by == "mil_attention" and not mil:
        raise InvalidInputError("rank_by='mil_attention' needs mil=True.")
    if key_added is not None:
        check_key_added(key_added, NUCLEI_OBS_LAYOUT, "obs")
    y = _phenotype(named, phenotype_key, clinical)
    kind, target = _response_kind(y, phenotype_key)
    rng = np.random.default_rng(seed)
    tables = {name: get_table(data, nuclei_table_key) for name, data in named.items()}
    rep_key, columns = _representation_key(tables, use_rep)
    reps, pooled = {}, []
    for name, table in tables.items():
        reps[name] = _representation(table, rep_key, name, columns)
        take = rng.choice(table.n_obs, size=min(n_cells_per_sample, table.n_obs), replace=False)
        pooled.append(pd.DataFrame({"sample": name, "row": take}))
    pooled = pd.concat(pooled, ignore_index=True)
    x_pool = np.vstack([reps[s][g["row"].to_numpy()] for s, g in pooled.groupby("sample", sort=False)])
    labels = _cluster(x_pool, n_neighbors, resolution, seed)
    pooled["population"] = labels
    names = [f"P{i}" for i in range(labels.max() + 1)]
    pooled["population"] = pd.Categorical(np.asarray(names, dtype=object)[labels], categories=names)
    # Abundance of every population in every sample (all nuclei, assigned by kNN vote).
    from sklearn.neighbors import KNeighborsClassifier

    knn = KNeighborsClassifier(n_neighbors=min(n_neighbors, len(x_pool))).fit(x_pool, labels)
    abundance, assigned = {}, {}
    for name in progress_bar(named, desc="population abundance", disable=not progress):
        assigned[name] = knn.predict(reps[name])
        abundance[name] = np.bincount(assigned[name], minlength=len(names)) / len(assigned[name])
    ab = pd.DataFrame.from_dict(abundance, orient="index", columns=names)
    table = _describe(pooled, tables, names)
    table["mean_abundance"] = ab.mean().to_numpy()
    assoc = _associate(ab, y, phenotype_key)
    effect = assoc.attrs["effect"]
    table["effect"] = assoc[effect].reindex(table.index)
    for col in ("direction", "p", "fdr"):
        table[col] = assoc[col].reindex(table.index)
    attention, mil_summary = None, {}
    table["mil_attention"] = np.nan
    if mil:
        in_bag = pooled.groupby("sample", sort=False).cumcount().to_numpy() < mil_bag_size  # rows are in random order
        bag_rows = pooled[in_bag]
        bags = [reps[s][g["row"].to_numpy()] for s, g in bag_rows.groupby("sample", sort=False)]
        att, mil_summary = _train_mil(bags, target.astype(np.float32), kind, list(mil_seeds), mil_epochs, progress)
        pooled["attention"] = np.nan
        pooled.loc[in_bag, "attention"] = np.concatenate(att)
        attention = pooled[in_bag].rename(columns={"row": "nucleus_row"}).reset_index(drop=True)
        table["mil_attention"] = pooled.groupby("population", observed=False)["attention"].mean().reindex(table.index).to_numpy()
    if rank_by == "p":
        table = table.assign(_a=-table["mil_attention"].fillna(0)).sort_values(["p", "_a"], kind="stable").drop(columns="_a")
    else:
        table = table.sort_values("mil_attention", ascending=False, kind="stable")
    table.attrs = {"kind": kind, "effect": effect, "phenotype_key": phenotype_key, "use_rep": rep_key}
    obs = pd.DataFrame({phenotype_key: y.to_numpy()}, index=ab.index)
    var = table.reindex(names)[["dominant_cell_type", "dominant_cell_state"]].astype(str)
    result = PhenotypeScreen(
        table=table,
        abundance=ad.AnnData(X=ab.to_numpy(dtype=np.float64), obs=obs, var=var),
        attention=attention,
        mil=mil_summary,
    )
    result.crops, result.crop_info = _crops(named, tables, pooled, result.top, n_crops, crop_um, image_key, seed)
    if key_added is not None:  # written last: a screen that fails changes no sample
        for name, rows in assigned.items():
            tables[name].obs[key_added] = pd.Categorical(np.asarray(names, dtype=object)[rows], categories=names)
    return result


# ---------------------------------------------------------------------------- helpers
def _named(samples) -> dict:
    if isinstance(samples, Mapping):
        named = {str(k): v for k, v in samples.items()}
    elif isinstance(samples, Sequence) and not isinstance(samples, str):
        ids = [getattr(s, "attrs", {}).get("sample_id") if isinstance(s, SpatialData) else None for s in samples]
        named = {str(i) if i is not None and len(set(ids)) == len(ids) else f"sample_{k}": s for k, (i, s) in enumerate(zip(ids, samples))}
    else:
        raise InvalidInputError(f"samples must be a dict sample id → SpatialData or a list, got {type(samples).__name__}.")
    if len(named) < 4:
        raise InvalidInputError(f"A phenotype screen needs at least 4 samples, got {len(named)}.")
    return named


def _phenotype(named: dict, key: str, clinical: pd.DataFrame | None) -> pd.Series:
    if clinical is None:
        raise InvalidInputError("screen_phenotype needs clinical (a DataFrame indexed by sample id with the phenotype column).")
    if key not in clinical.columns:
        raise InvalidInputError(f"Phenotype {key!r} not in clinical columns {list(clinical.columns)}.")
    clin = clinical.copy()
    clin.index = clin.index.astype(str)
    missing = [s for s in named if s not in clin.index]
    if missing:
        raise InvalidInputError(f"clinical has no row for samples {missing[:5]}.")
    return clin.loc[list(named), key]


def _representation_key(tables: dict[str, ad.AnnData], use_rep: str) -> tuple[str, list | None]:
    """One ``obsm`` key for every sample (``use_rep``, or the type probabilities where no sample has the default
    embedding) with the same layout in all: its columns (a DataFrame's, in the first sample's order) or its width."""
    if use_rep == EMBEDDING_KEY and not any(use_rep in t.obsm for t in tables.values()):
        use_rep = CELL_TYPE_PROBA_KEY  # predictions of a model without an embedding
    lacking = [name for name, t in tables.items() if use_rep not in t.obsm]
    if lacking:
        raise InvalidInputError(
            f"{len(lacking)} of {len(tables)} samples have no obsm[{use_rep!r}], e.g. {lacking[:3]}; every sample must be "
            "clustered on the same representation (run tl.predict with one model on all, or choose use_rep=)."
        )

    def layout(rep):
        return sorted(map(str, rep.columns)) if isinstance(rep, pd.DataFrame) else f"{np.shape(rep)[1]} columns"

    first, *_ = tables
    differ = [name for name, t in tables.items() if layout(t.obsm[use_rep]) != layout(tables[first].obsm[use_rep])]
    if differ:
        raise InvalidInputError(
            f"obsm[{use_rep!r}] of {len(differ)} samples, e.g. {differ[:3]}, has other columns than sample {first!r}'s "
            f"({layout(tables[differ[0]].obsm[use_rep])} against {layout(tables[first].obsm[use_rep])}): predict every sample with one model."
        )
    rep = tables[first].obsm[use_rep]
    return use_rep, (list(rep.columns) if isinstance(rep, pd.DataFrame) else None)


def _representation(table: ad.AnnData, use_rep: str, name: str, columns: list | None = None) -> np.ndarray:
    rep = table.obsm[use_rep]
    rep = np.asarray(rep[columns] if columns is not None else rep, dtype=np.float32)
    if not np.isfinite(rep).all():
        raise InvalidInputError(f"Sample {name!r}: the representation has NaN or infinite values.")
    if table.n_obs < 2:
        raise InvalidInputError(f"Sample {name!r} has fewer than 2 nuclei.")
    return rep


def _cluster(x: np.ndarray, n_neighbors: int, resolution: float, seed: int) -> np.ndarray:
    """Leiden (scanpy) on a symmetric kNN graph.

    The graph is built with scikit-learn (exact kNN, Euclidean, unit weights, symmetrised).
    Labels are numbered by decreasing population size.
    """
    import scipy.sparse as sp
    from sklearn.neighbors import NearestNeighbors

    k = min(n_neighbors, len(x) - 1)
    graph = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors_graph(x, mode="connectivity")
    graph.setdiag(0)
    graph = sp.csr_matrix(graph.maximum(graph.T))
    graph.eliminate_zeros()
    adata = ad.AnnData(X=x)
    sc.tl.leiden(adata, resolution=resolution, random_state=seed, adjacency=graph, flavor="igraph", n_iterations=2, directed=False)
    labels = adata.obs["leiden"].astype(int).to_numpy()
    sizes = np.bincount(labels)
    order = np.argsort(-sizes, kind="stable")
    return np.argsort(order)[labels]


def _describe(pooled: pd.DataFrame, tables: dict, names: list[str]) -> pd.DataFrame:
    """Dominant predicted type and state of every population."""
    cols = {}
    for key in (CELL_TYPE_KEY, CELL_STATE_KEY):
        vals = []
        for s, g in pooled.groupby("sample", sort=False):
            obs = tables[s].obs
            vals.append(obs[key].astype(str).to_numpy()[g["row"].to_numpy()] if key in obs else np.full(len(g), "NA", dtype=object))
        cols[key] = np.concatenate(vals)
    order = pd.concat([g for _, g in pooled.groupby("sample", sort=False)])
    frame = pd.DataFrame({"population": order["population"].to_numpy(), **cols})
    rows = {}
    for pop in names:
        sub = frame[frame["population"] == pop]
        states = sub[CELL_STATE_KEY].value_counts()
        rows[pop] = {
            "dominant_cell_type": sub[CELL_TYPE_KEY].value_counts().index[0],
            "dominant_cell_state": states.index[0],
            "purity": float(states.iloc[0] / len(sub)),
            "n_nuclei": len(sub),
        }
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.name = "population"
    return out


def _train_mil(bags: list[np.ndarray], y: np.ndarray, kind: str, seeds: list[int], epochs: int, progress: bool):
    """Gated-attention MIL (Ilse et al., 2018), full batch; attention × bag size averaged over seeds."""
    import torch

    n_max = max(len(b) for b in bags)
    dim = bags[0].shape[1]
    x = np.zeros((len(bags), n_max, dim), np.float32)
    mask = np.zeros((len(bags), n_max), bool)
    for i, b in enumerate(bags):
        x[i, : len(b)], mask[i, : len(b)] = b, True
    mu, sd = x[mask].mean(0), x[mask].std(0) + 1e-6
    xt, mt = torch.from_numpy((x - mu) / sd * mask[..., None]), torch.from_numpy(mask)
    target = torch.from_numpy(y if kind == "binary" else (y - y.mean()) / (y.std() + 1e-9)).float()
    total = np.zeros((len(bags), n_max))
    losses = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, and the same on every machine
    try:
        _fit_mil_seeds(xt, mt, target, kind, seeds, epochs, dim, progress, total, losses)
    finally:
        torch.set_num_threads(threads)
    total /= len(seeds)
    summary = {"seeds": list(seeds), "epochs": int(epochs), "loss": losses, "kind": kind}
    return [total[i, : len(b)] for i, b in enumerate(bags)], summary


def _fit_mil_seeds(xt, mt, target, kind, seeds, epochs, dim, progress, total, losses) -> None:
    import torch

    mask = mt.numpy()
    for s in progress_bar(seeds, desc="attention MIL", disable=not progress):
        torch.manual_seed(s)
        net = _gated_attention_mil(dim)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
        loss_fn = torch.nn.BCEWithLogitsLoss() if kind == "binary" else torch.nn.MSELoss()
        net.train()
        for _ in range(epochs):
            opt.zero_grad()
            out, _ = net(xt, mt)
            loss = loss_fn(out, target)
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            out, att = net(xt, mt)
            losses.append(float(loss_fn(out, target)))
        total += att.numpy() * mask.sum(1, keepdims=True)


def _crops(named, tables, pooled, top, n_crops, crop_um, image_key, seed):
    """Example crops (RGB uint8, ``crop_um`` at ``CROP_MPP``) of the top population's nuclei, highest attention first."""
    if n_crops <= 0:
        return None, None
    from ...io._elements import get_mpp, get_rgb_image, resolve_key
    from ...pp._resample import rescale_uint8

    side = max(int(round(crop_um / CROP_MPP)), 1)
    cand = pooled[pooled["population"] == top]
    cand = cand.sort_values("attention", ascending=False, na_position="last") if "attention" in cand else cand.sample(frac=1.0, random_state=seed)
    crops, info, images = [], [], {}
    for _, row in cand.iterrows():
        data = named[row["sample"]]
        if not isinstance(data, SpatialData) or not data.images:
            continue
        try:
            key = resolve_key(data, "images", key=image_key, default="he")
        except InvalidInputError:
            continue
        if row["sample"] not in images:
            try:
                images[row["sample"]] = get_rgb_image(data, image_key=key)
            except InvalidInputError as error:
                images[row["sample"]] = None
                warnings.warn(f"No example crops from sample {row['sample']!r}: {error}", stacklevel=user_stacklevel())
        image, mpp = images[row["sample"]], get_mpp(data)
        if image is None:
            continue
        native = max(int(round(crop_um / mpp)), 1)  # the crop's side in this slide's pixels
        half = native // 2
        table = tables[row["sample"]]
        x, y = np.asarray(table.obsm[SPATIAL_KEY])[row["row"]]
        xi, yi = int(round(x)), int(round(y))
        h, w = image.shape[1:]
        if not (half <= xi < w - half and half <= yi < h - half):
            continue
        patch = np.asarray(image[:3, yi - half : yi - half + native, xi - half : xi - half + native]).transpose(1, 2, 0).astype(np.uint8)
        if native != side:
            patch = rescale_uint8(patch, side / native)[:side, :side]
            patch = np.pad(patch, ((0, side - patch.shape[0]), (0, side - patch.shape[1]), (0, 0)), mode="edge")
        crops.append(patch)
        info.append({"sample": row["sample"], "nucleus": table.obs_names[row["row"]], "x": x, "y": y})
        if len(crops) >= n_crops:
            break
    if not crops:
        return None, None
    return np.stack(crops), pd.DataFrame(info)


def _gated_attention_mil(dim: int, hidden: int = 32, attention_dim: int = 16):
    """Gated attention MIL network: a(k) ∝ exp(wᵀ(tanh(V h_k) ⊙ sigmoid(U h_k))), bag = Σ a(k) h_k."""
    import torch
    from torch import nn

    class GatedAttentionMIL(nn.Module):
        def __init__(self):
            super().__init__()
            self.encode = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU())
            self.v = nn.Linear(hidden, attention_dim)
            self.u = nn.Linear(hidden, attention_dim)
            self.w = nn.Linear(attention_dim, 1)
            self.head = nn.Linear(hidden, 1)

        def forward(self, x, mask):
            h = self.encode(x)
            scores = self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h))).squeeze(-1)
            att = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=1)
            bag = (att.unsqueeze(-1) * h).sum(1)
            return self.head(bag).squeeze(-1), att

    return GatedAttentionMIL()
