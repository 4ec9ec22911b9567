"""Write HistoCell predictions into a SpatialData (nuclei table and spots table)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from spatialdata import SpatialData
from spatialdata.models import get_table_keys

from ..._constants import (
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
from ..._device import resolve_device
from ..._docs import inject_docs
from ..._errors import InvalidInputError
from ..._utils import check_whole_number, copy_for_writing
from ...io import resolve_key
from ...io._schema import NucleiTableModel, merge_metadata, set_categorical
from ...models import HistoCell


@inject_docs
def predict(
    sdata: SpatialData,
    model: HistoCell | Sequence[HistoCell],
    *,
    nuclei_table_key: str = HISTOCELL_KEY,
    image_key: str | None = None,
    spots_table_key: str | None = None,
    mc_samples: int = 0,
    progress: bool = True,
    device: str | None = None,
    copy: bool = False,
) -> SpatialData | None:
    """Predict cell type, state and compartment of every nucleus and store them in place.

    Works on any H&E with segmented nuclei, with or without spots. The model runs in eval mode,
    so the same model and data give the same predictions.

    Parameters
    ----------
    sdata
        Sample with a nuclei table ``nuclei_table_key`` (from :func:`histocell_sd.pp.segment_nuclei` or
        :func:`histocell_sd.io.read_nuclei`).
    model
        A trained :class:`~histocell_sd.models.HistoCell`, or several with the same cell types, states
        and compartments (e.g. fitted with different seeds): an ensemble, whose probabilities are the
        mean of theirs. Each member's embedding is kept, side by side, in ``obsm["histocell_embedding"]``,
        and ``obs["cell_type_ensemble_std"]`` receives how much the members disagree (standard deviation
        of ``cell_type_proba`` over the members, averaged over types); ``mc_samples`` applies to each member.
        Cell states are written only when every member's state heads were trained.
    {nuclei_table_key}
        Read (morphology features, centroids, ``obs["spot_id"]``) and written: it receives
        ``obs["cell_type"]``, ``obsm["cell_type_proba"]``, ``obs["cell_type_entropy"]``,
        ``obs["cell_state"]``, ``obsm["cell_state_proba"]``, ``obs["compartment"]``,
        ``obsm["compartment_proba"]`` and ``obsm["histocell_embedding"]`` (an earlier model's
        outputs are removed first).
    {image_key}
    spots_table_key
        Name of the spots table (``sdata.tables``) that receives the mean predicted proportions of its
        nuclei in ``obsm["histocell_proportions"]`` and their count in ``obs["n_nuclei"]``: by default
        ``"table"`` when it exists; skipped when no nucleus lies in a spot.
    mc_samples
        Monte-Carlo dropout passes for an uncertainty estimate (``obs["cell_type_mc_std"]``); 0 = off.
    {progress}
    {device}
    {copy}

    Returns
    -------
    SpatialData or None
        None: the predictions are written into ``sdata`` as described above. With ``copy=True``, a
        SpatialData holding them (tables copied, other elements shared with ``sdata``).
    """
    if not isinstance(sdata, SpatialData):
        raise InvalidInputError(f"sdata must be a SpatialData sample, got {type(sdata).__name__}.")
    members = _ensemble_members(model)
    model = members[0]
    if nuclei_table_key not in sdata.tables:
        raise InvalidInputError(f"No nuclei table {nuclei_table_key!r}; segment nuclei first (hc.pp.segment_nuclei).")
    check_whole_number("mc_samples", mc_samples, 0)
    resolve_device(device)  # an unusable device is refused before anything is written
    spots_table_key = _spots_table(sdata, sdata.tables[nuclei_table_key], spots_table_key, nuclei_table_key)  # validated before anything is written
    if copy:
        sdata = copy_for_writing(sdata)
    table = sdata.tables[nuclei_table_key]
    out = _ensemble_outputs(members, sdata, image_key, nuclei_table_key, mc_samples, progress, device)
    for key in [k for k in table.obs if k in _OBS_WRITTEN]:
        del table.obs[key]  # an earlier model's outputs (e.g. MC dropout, states) never linger
    for key in [k for k in table.obsm if k in _OBSM_WRITTEN]:
        del table.obsm[key]
    for key in [k for k in table.uns if k.removesuffix("_colors") in _OBS_WRITTEN and k.endswith("_colors")]:
        del table.uns[key]
    type_proba = pd.DataFrame(out["type"], index=table.obs_names, columns=model.cell_types)
    table.obsm[CELL_TYPE_PROBA_KEY] = type_proba
    set_categorical(table, CELL_TYPE_KEY, model.cell_types, out["type"].argmax(1))
    table.obs[ENTROPY_KEY] = -(out["type"] * np.log(np.clip(out["type"], 1e-12, None))).sum(1)
    untrained = [i for i, m in enumerate(members) if not m.training_summary_.get("states_trained", True)]
    if not untrained or len(model.state_names) == len(model.cell_types):
        table.obsm[CELL_STATE_PROBA_KEY] = pd.DataFrame(out["state"], index=table.obs_names, columns=model.state_names)
        set_categorical(table, CELL_STATE_KEY, model.state_names, out["state"].argmax(1))
    else:  # one untrained head would mix random state probabilities into the ensemble's
        who = "The model's state heads were" if len(members) == 1 else f"The state heads of ensemble members {untrained} were"
        warnings.warn(f"{who} not trained (no state proportions at fit): no cell states written.", UserWarning, stacklevel=2)
    table.obsm[f"{COMPARTMENT_KEY}_proba"] = pd.DataFrame(out["compartment"], index=table.obs_names, columns=model.compartment_labels)
    set_categorical(table, COMPARTMENT_KEY, model.compartment_labels, out["compartment"].argmax(1))
    table.obsm[EMBEDDING_KEY] = out["embedding"]
    if "type_std" in out:
        table.obs["cell_type_mc_std"] = out["type_std"]
    if "type_ensemble_std" in out:
        table.obs["cell_type_ensemble_std"] = out["type_ensemble_std"]
    # merged, never replaced: segmentation's mpp, method and feature definitions stay
    sources = [m.preprocessing["encoder"]["source"] for m in members]
    merge_metadata(
        table, cell_types=list(model.cell_types), states=list(model.state_names), compartments=list(model.compartment_labels),
        encoder=sources[0] if len(set(sources)) == 1 else sources, ensemble_size=len(members),
    )
    NucleiTableModel.validate(table, name=f"tables[{nuclei_table_key!r}]")
    if spots_table_key is not None:
        _aggregate_to_spots(sdata.tables[spots_table_key], table, type_proba)
    return sdata if copy else None


_OBS_WRITTEN = {CELL_TYPE_KEY, ENTROPY_KEY, CELL_STATE_KEY, COMPARTMENT_KEY, "cell_type_mc_std", "cell_type_ensemble_std"}
_OBSM_WRITTEN = {CELL_TYPE_PROBA_KEY, CELL_STATE_PROBA_KEY, f"{COMPARTMENT_KEY}_proba", EMBEDDING_KEY}


def _ensemble_members(model) -> list[HistoCell]:
    """``model`` as a list of trained models with the same outputs, or an :class:`InvalidInputError` naming the problem."""
    members = list(model) if isinstance(model, Sequence) and not isinstance(model, str) else [model]
    if not members:
        raise InvalidInputError("model is an empty list: give a trained HistoCell or several.")
    for i, member in enumerate(members):
        which = "model" if len(members) == 1 else f"model[{i}]"
        if not isinstance(member, HistoCell):
            raise InvalidInputError(f"{which} must be a HistoCell, got {type(member).__name__}.")
        if not member.training_summary_:
            raise InvalidInputError(f"{which} is untrained: call .fit(...) or HistoCell.load(path) first.")
        for name in ("cell_types", "state_names", "compartment_labels"):
            if list(getattr(member, name)) != list(getattr(members[0], name)):
                raise InvalidInputError(
                    f"The models of an ensemble must predict the same {name.replace('_', ' ')}: "
                    f"model[{i}] has {list(getattr(member, name))}, model[0] {list(getattr(members[0], name))}."
                )
    return members


def _ensemble_outputs(members, sdata, image_key, nuclei_table_key, mc_samples, progress, device) -> dict[str, np.ndarray]:
    """The members' outputs averaged (embeddings side by side); the inputs are built once per input settings."""
    outputs, inputs, settings = [], None, None
    for member in members:
        if member.settings.input_settings != settings:
            settings = member.settings.input_settings
            inputs = member.sample_inputs(sdata, image_key=image_key, nuclei_table_key=nuclei_table_key, progress=progress, crops_on_demand=True)
        outputs.append(member.predict_inputs(inputs, mc_samples=mc_samples, progress=progress, device=device))
    if len(outputs) == 1:
        return outputs[0]
    out = {key: np.mean([o[key] for o in outputs], axis=0) for key in ("type", "state", "compartment")}
    out["embedding"] = np.concatenate([o["embedding"] for o in outputs], axis=1)
    out["type_ensemble_std"] = np.std([o["type"] for o in outputs], axis=0).mean(1)
    if mc_samples > 0:
        out["type_std"] = np.mean([o["type_std"] for o in outputs], axis=0)
    return out


def _spots_table(sdata, nuclei_table, spots_table_key, nuclei_key) -> str | None:
    """The spots table that receives the spot means, checked before anything is written (None: none to write)."""
    if SPOT_ID_KEY not in nuclei_table.obs or nuclei_table.obs[SPOT_ID_KEY].isna().all():
        if spots_table_key is not None:
            raise InvalidInputError(f"spots_table_key={spots_table_key!r} was given but no nucleus of {nuclei_key!r} lies in a spot.")
        return None
    if spots_table_key is None and (TABLE_KEY not in sdata.tables or nuclei_key == TABLE_KEY):
        return None
    spots_table_key = resolve_key(sdata, "tables", key=spots_table_key, default=TABLE_KEY)
    spots_table = sdata.tables[spots_table_key]
    if "spatialdata_attrs" not in spots_table.uns or get_table_keys(spots_table)[0] == get_table_keys(nuclei_table)[0]:
        raise InvalidInputError(f"Table {spots_table_key!r} does not annotate spots.")
    return spots_table_key


def _aggregate_to_spots(spots_table, nuclei_table, type_proba: pd.DataFrame) -> None:
    means = type_proba.groupby(nuclei_table.obs[SPOT_ID_KEY].to_numpy()).mean()
    spots_table.obsm[PREDICTED_PROPORTIONS_KEY] = means.reindex(spots_table.obs_names)  # NaN for spots without nuclei
    spots_table.obs["n_nuclei"] = nuclei_table.obs[SPOT_ID_KEY].value_counts().reindex(spots_table.obs_names).fillna(0).astype(int).to_numpy()
