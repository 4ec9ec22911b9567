"""Stand-ins for ``tl.predict`` on synthetic slides: the truth (or noisy, or confused probabilities) in the
prediction layout (:class:`~histocell_sd.io.NucleiTableModel`), to test downstream analysis apart from the model."""

from __future__ import annotations

import anndata as ad
import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from spatialdata import SpatialData
from spatialdata.models import ShapesModel

from .._constants import (
    CELL_STATE_KEY,
    CELL_TYPE_KEY,
    CELL_TYPE_PROBA_KEY,
    COMPARTMENT_KEY,
    EMBEDDING_KEY,
    HISTOCELL_KEY,
    NUCLEI_KEY,
    NUCLEUS_ID_KEY,
    PREDICTED_PROPORTIONS_KEY,
    SPATIAL_KEY,
    SPOT_ID_KEY,
    TABLE_KEY,
)
from .._docs import inject_docs
from .._errors import InvalidInputError
from ..io._elements import pixel_transformations
from ..io._schema import NucleiTableModel, set_categorical
from ._synthetic import TRUTH_TABLE_KEY
from ._synthetic_cells import CELL_STATES, CELL_TYPES, COMPARTMENTS

__all__ = ["EMBEDDING_DIM", "NUCLEUS_RADIUS_UM", "confused_probabilities", "prediction_table", "truth_as_predictions"]

EMBEDDING_DIM = 16
NUCLEUS_RADIUS_UM = 3.5
_LOOK_ALIKE = {"fibroblast": "endothelial", "endothelial": "fibroblast", "lymphocyte": "macrophage", "macrophage": "lymphocyte", "tumor": "macrophage"}


def nucleus_circles(xy_px: np.ndarray, radius_px: np.ndarray, mpp: float) -> gpd.GeoDataFrame:
    names = pd.Index([f"nucleus_{i}" for i in range(1, len(xy_px) + 1)], name=NUCLEUS_ID_KEY)
    polys = shapely.buffer(shapely.points(xy_px), radius_px, quad_segs=3)
    return ShapesModel.parse(gpd.GeoDataFrame(geometry=gpd.GeoSeries(polys, index=names)), transformations=pixel_transformations(mpp))


def prediction_table(
    rng, xy_px, cell_type, cell_state, compartment, states, centres, region: str, *, mpp: float, method: str, type_noise: float = 0.0,
    spot_ids=None, proba: pd.DataFrame | None = None,
) -> ad.AnnData:
    """A nuclei table in the prediction layout from known labels (``type_noise``: share randomised; ``proba``:
    type probabilities to store instead, ``cell_type`` becoming their argmax)."""
    n = len(xy_px)
    cell_type = np.asarray(cell_type, dtype=object).copy()
    cell_state = np.asarray(cell_state, dtype=object).copy()
    if type_noise > 0:
        flip = rng.random(n) < type_noise
        cell_type[flip] = rng.choice(np.asarray(CELL_TYPES, dtype=object), flip.sum())
        for i in np.flatnonzero(flip):
            if cell_state[i] not in CELL_STATES[cell_type[i]]:
                cell_state[i] = CELL_STATES[cell_type[i]][rng.integers(len(CELL_STATES[cell_type[i]]))]
    onehot = (cell_type[:, None] == np.asarray(CELL_TYPES, dtype=object)[None, :]).astype(float)
    noise = rng.dirichlet(np.ones(len(CELL_TYPES)), n)
    s_idx = pd.Categorical(cell_state, categories=states).codes
    emb = centres[s_idx] + rng.normal(0, 0.6, (n, centres.shape[1]))
    obs_names = [f"nucleus_{i}" for i in range(1, n + 1)]
    if proba is None:
        proba = pd.DataFrame(0.7 * onehot + 0.3 * noise, index=obs_names, columns=list(CELL_TYPES))
    else:
        proba = proba.set_axis(obs_names)
        cell_type = np.asarray(CELL_TYPES, dtype=object)[proba.to_numpy().argmax(axis=1)]
    adata = ad.AnnData(
        obs=pd.DataFrame(index=obs_names),
        obsm={SPATIAL_KEY: np.asarray(xy_px, dtype=np.float64), CELL_TYPE_PROBA_KEY: proba, EMBEDDING_KEY: emb.astype(np.float32)},
    )
    for key, labels, values in (
        (CELL_TYPE_KEY, list(CELL_TYPES), cell_type), (CELL_STATE_KEY, list(states), cell_state), (COMPARTMENT_KEY, list(COMPARTMENTS), compartment),
    ):
        set_categorical(adata, key, labels, pd.Categorical(np.asarray(values, dtype=object), categories=labels).codes)
    return NucleiTableModel.parse(
        adata, region=region, mpp=mpp, method=method, spot_ids=spot_ids,
        cell_types=list(CELL_TYPES), states=list(states), compartments=list(COMPARTMENTS),
    )


@inject_docs
def truth_as_predictions(
    sdata: SpatialData,
    *,
    type_noise: float = 0.0,
    seed: int = 0,
    proba: pd.DataFrame | None = None,
    nuclei_table_key: str = HISTOCELL_KEY,
    key_added: str = NUCLEI_KEY,
) -> None:
    """Write "perfect" (or noisy) predictions of a :func:`synthetic_visium` slide from its truth.

    Stand-in for ``tl.predict`` when testing downstream analysis: nucleus circles
    ``key_added`` at the true centroids and the table ``nuclei_table_key`` in the prediction layout
    with the true ``cell_type``, ``cell_state``, ``compartment`` and ``spot_id``; like ``tl.predict``,
    the spots table gets the mean nucleus probability per spot in ``obsm["histocell_proportions"]``
    (NaN for spots without nuclei).

    Parameters
    ----------
    sdata
        A slide from :func:`~histocell_sd.datasets.synthetic_visium` (needs the ``"truth_nuclei"`` table).
    type_noise
        Share of nuclei whose type (and state) is replaced by a uniformly random one.
    seed
        Seed of the noise, probabilities and embedding.
    proba
        Nucleus type probabilities to write instead (rows = the truth nuclei in order, columns =
        cell types, e.g. :func:`confused_probabilities`); ``cell_type`` becomes their argmax.
    {nuclei_table_key:written}
    {key_added}
        the nucleus circles (``sdata.shapes``).

    Returns
    -------
    None
        Writes ``sdata.shapes[key_added]``, ``sdata.tables[nuclei_table_key]`` and, when the spots
        table ``"table"`` exists, its ``obsm["histocell_proportions"]``.
    """
    if TRUTH_TABLE_KEY not in sdata.tables:
        raise InvalidInputError(f"The SpatialData has no {TRUTH_TABLE_KEY!r} table: truth_as_predictions needs a synthetic_visium slide.")
    if not 0 <= type_noise <= 1:
        raise InvalidInputError(f"type_noise must be in [0, 1], got {type_noise!r}.")
    truth = sdata.tables[TRUTH_TABLE_KEY]
    xy = np.asarray(truth.obsm["spatial"], dtype=np.float64)
    if proba is not None and (proba.shape[0] != len(xy) or list(proba.columns) != list(CELL_TYPES)):
        raise InvalidInputError(f"proba must have one row per truth nucleus ({len(xy)}) and the columns {list(CELL_TYPES)}.")
    mpp = float(sdata.attrs["mpp"])
    rng = np.random.default_rng(seed)
    states = [s for t in CELL_TYPES for s in CELL_STATES[t]]
    centres = np.random.default_rng(12345).normal(0, 1.6, size=(len(states), EMBEDDING_DIM))
    radius = truth.obs["minor_um"].to_numpy(dtype=float) / 2 / mpp if "minor_um" in truth.obs else np.full(len(xy), NUCLEUS_RADIUS_UM / mpp)
    method = "given probabilities" if proba is not None else "truth" if type_noise == 0 else f"truth+{type_noise:g} type noise"
    table = prediction_table(
        rng, xy, truth.obs["cell_type"], truth.obs["cell_state"], truth.obs["compartment"], states, centres, region=key_added,
        mpp=mpp, method=method, type_noise=type_noise, spot_ids=truth.obs["spot_id"].to_numpy(), proba=proba,
    )
    sdata.shapes[key_added] = nucleus_circles(xy, np.maximum(radius, 1.0), mpp)
    sdata.tables[nuclei_table_key] = table
    if TABLE_KEY in sdata.tables:
        spots = sdata.tables[TABLE_KEY]
        probabilities = table.obsm[CELL_TYPE_PROBA_KEY]
        inside = table.obs[SPOT_ID_KEY].notna().to_numpy()
        means = probabilities[inside].groupby(table.obs.loc[inside, SPOT_ID_KEY].to_numpy()).mean()
        spots.obsm[PREDICTED_PROPORTIONS_KEY] = means.reindex(spots.obs_names)


@inject_docs
def confused_probabilities(
    sdata: SpatialData, *, seed: int = 0, signal: float = 2.4, confusion: float = 1.2, noise: float = 1.1
) -> pd.DataFrame:
    """Stand-in nucleus probabilities of a :func:`synthetic_visium` slide: right on average, confused like a real model.

    The softmax of Gaussian logits (sd ``noise``) raised by ``signal`` for each truth nucleus's type
    and by ``confusion`` for its look-alike (fibroblast/endothelial, lymphocyte/macrophage,
    tumour→macrophage); the defaults give ≈ 70 % top-1 accuracy. Rows follow the truth nuclei.

    Parameters
    ----------
    sdata
        A slide from :func:`synthetic_visium` (reads the ``"truth_nuclei"`` table; nothing is written).
    {seed}
    signal, confusion
        Logit added to each nucleus's true type and to its look-alike.
    noise
        Standard deviation of the Gaussian logits.

    Returns
    -------
    pandas.DataFrame
        Truth nuclei × cell types (``CELL_TYPES``), rows summing to 1; pass it to
        :func:`truth_as_predictions` as ``proba``.
    """
    if TRUTH_TABLE_KEY not in sdata.tables:
        raise InvalidInputError(f"The SpatialData has no {TRUTH_TABLE_KEY!r} table: confused_probabilities needs a synthetic_visium slide.")
    types = list(CELL_TYPES)
    truth = sdata.tables[TRUTH_TABLE_KEY].obs
    rng = np.random.default_rng(seed)
    true = pd.Categorical(truth["cell_type"].astype(str), categories=types).codes
    similar = np.array([types.index(_LOOK_ALIKE[t]) for t in types])
    logits = rng.normal(0, noise, (len(true), len(types)))
    logits[np.arange(len(true)), true] += signal
    logits[np.arange(len(true)), similar[true]] += confusion
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return pd.DataFrame(p / p.sum(axis=1, keepdims=True), index=truth.index, columns=types)
