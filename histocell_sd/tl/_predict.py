"""Write HistoCell predictions into a SpatialData (nuclei table and spots table)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from spatialdata import SpatialData
from spatialdata.models import get_table_keys

from .._constants import (
    CELL_STATE_KEY,
    CELL_STATE_PROBA_KEY,
    CELL_TYPE_KEY,
    CELL_TYPE_PROBA_KEY,
    COMPARTMENT_KEY,
    EMBEDDING_KEY,
    ENTROPY_KEY,
    HISTOCELL_KEY,
    PREDICTED_PROPORTIONS_KEY,
    SPOT_ID_KEY,
    TABLE_KEY,
)
from .._errors import InvalidInputError
from ..io import resolve_key
from ..models import HistoCell


def predict(
    sdata: SpatialData,
    model: HistoCell,
    key_added: str = HISTOCELL_KEY,
    *,
    image_key: str | None = None,
    spots_table_key: str | None = None,
    mc_samples: int = 0,
    progress: bool = True,
) -> None:
    """Predict cell type, state and compartment of every nucleus and store them in place.

    Works on any H&E with segmented nuclei, with or without spots. The model runs in eval mode,
    so the same model and data give the same predictions.

    Parameters
    ----------
    sdata
        Sample with a nuclei table ``key_added`` (from :func:`histocell_sd.pp.segment_nuclei` or
        :func:`histocell_sd.io.read_nuclei`).
    model
        A trained :class:`~histocell_sd.models.HistoCell`.
    key_added
        The nuclei table that receives ``obs["cell_type"]``, ``obsm["cell_type_proba"]``,
        ``obs["cell_type_entropy"]``, ``obs["cell_state"]``, ``obsm["cell_state_proba"]``,
        ``obs["compartment"]``, ``obsm["compartment_proba"]`` and ``obsm["histocell_embedding"]``.
    image_key
        The H&E (default ``"he"`` or the only image).
    spots_table_key
        Spots table that receives the mean predicted proportions of its nuclei in
        ``obsm["histocell_proportions"]`` (default ``"table"`` when it exists; skipped without spots).
    mc_samples
        Monte-Carlo dropout passes for an uncertainty estimate (``obs["cell_type_mc_std"]``); 0 = off.
    progress
        Show progress bars.
    """
    if not isinstance(model, HistoCell):
        raise InvalidInputError(f"model must be a HistoCell, got {type(model).__name__}.")
    if not model.training_summary_:
        raise InvalidInputError("The model is untrained: call model.fit(...) or HistoCell.load(path) first.")
    if key_added not in sdata.tables:
        raise InvalidInputError(f"No nuclei table {key_added!r}; segment nuclei first (hc.pp.segment_nuclei).")
    inputs = model._inputs(sdata, image_key=image_key, table_key=key_added, progress=progress)
    out = model.predict_inputs(inputs, mc_samples=mc_samples, progress=progress)
    table = sdata.tables[key_added]
    type_proba = pd.DataFrame(out["type"], index=table.obs_names, columns=model.cell_types)
    table.obsm[CELL_TYPE_PROBA_KEY] = type_proba
    table.obs[CELL_TYPE_KEY] = pd.Categorical(np.asarray(model.cell_types)[out["type"].argmax(1)], categories=model.cell_types)
    table.obs[ENTROPY_KEY] = -(out["type"] * np.log(np.clip(out["type"], 1e-12, None))).sum(1)
    table.obsm[CELL_STATE_PROBA_KEY] = pd.DataFrame(out["state"], index=table.obs_names, columns=model.state_names)
    table.obs[CELL_STATE_KEY] = pd.Categorical(np.asarray(model.state_names)[out["state"].argmax(1)], categories=model.state_names)
    table.obsm[f"{COMPARTMENT_KEY}_proba"] = pd.DataFrame(out["compartment"], index=table.obs_names, columns=model.compartment_labels)
    table.obs[COMPARTMENT_KEY] = pd.Categorical(
        np.asarray(model.compartment_labels)[out["compartment"].argmax(1)], categories=model.compartment_labels
    )
    table.obsm[EMBEDDING_KEY] = out["embedding"]
    if "type_std" in out:
        table.obs["cell_type_mc_std"] = out["type_std"]
    table.uns["histocell"] = {"cell_types": model.cell_types, "states": model.state_names, "compartments": model.compartment_labels}
    _aggregate_to_spots(sdata, table, type_proba, spots_table_key, key_added)


def _aggregate_to_spots(sdata, nuclei_table, type_proba: pd.DataFrame, spots_table_key, nuclei_key) -> None:
    if SPOT_ID_KEY not in nuclei_table.obs or nuclei_table.obs[SPOT_ID_KEY].isna().all():
        return
    if spots_table_key is None and (TABLE_KEY not in sdata.tables or nuclei_key == TABLE_KEY):
        return
    spots_table_key = resolve_key(sdata, "tables", spots_table_key, TABLE_KEY)
    spots_table = sdata.tables[spots_table_key]
    if "spatialdata_attrs" not in spots_table.uns or get_table_keys(spots_table)[0] == get_table_keys(nuclei_table)[0]:
        raise InvalidInputError(f"Table {spots_table_key!r} does not annotate spots.")
    means = type_proba.groupby(nuclei_table.obs[SPOT_ID_KEY].to_numpy()).mean()
    spots_table.obsm[PREDICTED_PROPORTIONS_KEY] = means.reindex(spots_table.obs_names)  # NaN for spots without nuclei
    spots_table.obs["n_nuclei"] = nuclei_table.obs[SPOT_ID_KEY].value_counts().reindex(spots_table.obs_names).fillna(0).astype(int).to_numpy()
