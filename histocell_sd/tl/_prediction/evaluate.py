"""Score predictions against ground truth nuclei (synthetic slides, annotated tiles)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from spatialdata import SpatialData

from ..._constants import HISTOCELL_KEY, SPATIAL_KEY, TABLE_KEY
from ..._docs import inject_docs
from ..._errors import InvalidInputError
from ..._utils import mean_per_type_pearson
from ...io import get_mpp, resolve_key
from ...pp import detection_scores, match_points


@inject_docs
def transfer_truth(
    sdata: SpatialData,
    *,
    truth_table_key: str = "truth_nuclei",
    columns: Sequence[str] = ("cell_type", "cell_state", "compartment"),
    nuclei_table_key: str = HISTOCELL_KEY,
    max_distance_um: float = 3.0,
    prefix: str = "true_",
) -> dict[str, float]:
    """Match nuclei one-to-one to truth nuclei within ``max_distance_um`` and copy their labels.

    Parameters
    ----------
    sdata
        A sample with segmented nuclei and annotated truth nuclei (e.g. a
        :func:`~histocell_sd.datasets.synthetic_visium` slide).
    truth_table_key
        Name of the table of truth nuclei in ``sdata.tables`` (read: ``obsm["spatial"]`` and the
        ``columns``).
    columns
        ``obs`` columns of the truth table copied to the nuclei.
    {nuclei_table_key}
        Read (``obsm["spatial"]``) and written: ``obs[prefix + column]`` for each of ``columns``
        (missing where a nucleus has no match).
    max_distance_um
        Largest centroid distance of a match, µm.
    prefix
        Prefix of the columns written.

    Returns
    -------
    dict
        The detection scores of the matching (``precision``, ``recall``, ``f1``, counts), from
        :func:`~histocell_sd.pp.detection_scores`.
    """
    for key in (truth_table_key, nuclei_table_key):
        if key not in sdata.tables:
            raise InvalidInputError(f"No table {key!r} in the SpatialData.")
    truth, table = sdata.tables[truth_table_key], sdata.tables[nuclei_table_key]
    missing = [c for c in columns if c not in truth.obs]
    if missing:
        raise InvalidInputError(f"Truth table {truth_table_key!r} lacks the columns {missing}.")
    max_px = max_distance_um / get_mpp(sdata)
    pred_idx, true_idx = match_points(table.obsm[SPATIAL_KEY], truth.obsm[SPATIAL_KEY], max_dist=max_px)
    for column in columns:
        values = pd.Series(pd.NA, index=table.obs_names, dtype=object)
        values.iloc[pred_idx] = truth.obs[column].astype(str).to_numpy()[true_idx]
        categories = truth.obs[column].cat.categories if hasattr(truth.obs[column], "cat") else None
        table.obs[prefix + column] = pd.Categorical(values, categories=categories)
    return detection_scores(table.obsm[SPATIAL_KEY], truth.obsm[SPATIAL_KEY], max_dist=max_px)


def paired_labels(y_true, y_pred) -> tuple[pd.Series, pd.Series]:
    """``y_true`` and ``y_pred`` as object Series paired nucleus by nucleus.

    Two Series indexed by the same nuclei in another order are paired by index; anything else by position.
    """
    if (isinstance(y_true, pd.Series) and isinstance(y_pred, pd.Series) and not y_true.index.equals(y_pred.index)
            and y_true.index.is_unique and y_pred.index.is_unique and set(y_true.index) == set(y_pred.index)):
        y_pred = y_pred.reindex(y_true.index)
    y_true, y_pred = pd.Series(np.asarray(y_true, dtype=object)), pd.Series(np.asarray(y_pred, dtype=object))
    if y_true.ndim != 1 or len(y_true) != len(y_pred):
        raise InvalidInputError(f"y_true has {len(y_true)} labels and y_pred {len(y_pred)}.")
    return y_true, y_pred


def classification_scores(y_true, y_pred, *, labels: Sequence[str] | None = None) -> dict[str, float]:
    """Accuracy, macro-F1 and weighted-F1 over the nuclei whose truth is known.

    Parameters
    ----------
    y_true
        True labels, missing (NaN / None) where unknown; e.g. ``obs["true_cell_type"]``.
    y_pred
        Predicted labels of the same nuclei; e.g. ``obs["cell_type"]`` (two Series whose indexes hold the same nuclei are paired by index).
    labels
        The classes averaged over by the F1 scores; default: those occurring in ``y_true``.

    Returns
    -------
    dict
        ``n`` (nuclei with a known label), ``accuracy``, ``macro_f1``, ``weighted_f1``.
    """
    from sklearn.metrics import accuracy_score, f1_score

    y_true, y_pred = paired_labels(y_true, y_pred)
    known = y_true.notna().to_numpy()
    if not known.any():
        raise InvalidInputError("No nucleus has a known true label.")
    t, p = y_true[known].astype(str), y_pred[known].astype(str)
    labels = list(labels) if labels is not None else sorted(set(t))
    return {
        "n": int(known.sum()),
        "accuracy": float(accuracy_score(t, p)),
        "macro_f1": float(f1_score(t, p, labels=labels, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(t, p, labels=labels, average="weighted", zero_division=0)),
    }


@inject_docs
def spot_pearson(
    sdata: SpatialData,
    *,
    predicted_key: str = "histocell_proportions",
    true_key: str = "true_proportions",
    spots_table_key: str | None = None,
) -> float:
    """Spot agreement: the mean over cell types of the Pearson r across spots with nuclei.

    Pooling all (spot, type) pairs into one r would be inflated by the differences between the type
    means; types constant across spots are skipped.

    Parameters
    ----------
    sdata
        The sample (read only).
    predicted_key
        ``obsm`` key of the predicted spot proportions in the spots table (NaN rows = spots without
        nuclei, skipped), e.g. written by :func:`~histocell_sd.tl.predict`.
    true_key
        ``obsm`` key of the true spot proportions.
    {spots_table_key}

    Returns
    -------
    float
        The mean per-type Pearson r (NaN when every type is constant).
    """
    if not isinstance(sdata, SpatialData):
        raise InvalidInputError(f"sdata must be a SpatialData sample, got {type(sdata).__name__}.")
    spots_table_key = resolve_key(sdata, "tables", key=spots_table_key, default=TABLE_KEY)
    table = sdata.tables[spots_table_key]
    for key in (predicted_key, true_key):
        if key not in table.obsm:
            raise InvalidInputError(f"Spots table {spots_table_key!r} has no obsm[{key!r}].")
    predicted = table.obsm[predicted_key]
    true = table.obsm[true_key][predicted.columns]
    keep = predicted.notna().all(axis=1).to_numpy()
    return mean_per_type_pearson(predicted.to_numpy()[keep], true.to_numpy()[keep])
