"""The tables histocell-sd writes, as spatialdata-style models: ``parse`` builds one, ``validate`` checks one.

Every producer (reading Visium or arrays, segmentation, reading nuclei, prediction, refinement and the
stand-ins in :mod:`histocell_sd.datasets`) builds its table through these models, so the layouts they
document (:class:`SpotsTableModel`, :class:`NucleiTableModel`, :class:`ExpressionTableModel`, the metadata of
:data:`~histocell_sd.io._schema.METADATA`) are the ones a user can rely on.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
from spatialdata.models import TableModel

from .._constants import (
    CELL_TYPE_KEY,
    HISTOCELL_KEY,
    NUCLEUS_ID_KEY,
    PALETTE,
    PREDICTED_PROPORTIONS_KEY,
    PROPORTIONS_KEY,
    REGION_KEY,
    SPATIAL_KEY,
    SPATIAL_UM_KEY,
    SPOT_ID_KEY,
    SPOTS_KEY,
)
from .._errors import InvalidInputError
from ._schema_checks import (
    REFINED_TYPE_KEY,
    annotation,
    check_categorical,
    check_predictions,
    check_rows,
    check_spot_ids,
    check_xy,
)

__all__ = ["METADATA", "ExpressionTableModel", "NucleiTableModel", "SpotsTableModel", "merge_metadata", "set_categorical", "spot_id_column"]

IMPUTATION_KEY = "imputation"

METADATA = {
    "mpp": "µm per pixel of the image the nuclei were measured on (required)",
    "method": "how the nuclei were made: 'learnt', 'classical', 'imported (geojson)', 'truth', ...",
    "features": "definition of each morphology feature in X, in the order of var_names",
    "labels_key": "the label raster written beside the polygons, or None",
    "cell_types": "every cell type the model predicts, also those absent from obs['cell_type']",
    "states": "every cell state the model predicts",
    "compartments": "every tissue compartment the model predicts",
    "encoder": "the nucleus encoder the predictions came from (a list: those of an ensemble's models)",
    "ensemble_size": "how many models' probabilities were averaged (1: one model)",
}
"""Keys of a nuclei table's ``uns["histocell"]``; producers merge into it and never replace it."""

# --------------------------------------------------------------------------------------------- helpers
def merge_metadata(table: ad.AnnData, **values) -> None:
    """Merge ``values`` into ``table.uns["histocell"]`` (what is not named stays)."""
    table.uns[HISTOCELL_KEY] = {**dict(table.uns.get(HISTOCELL_KEY, {})), **values}


def set_categorical(table: ad.AnnData, key: str, labels, codes, *, all_labels=None) -> None:
    """Write ``obs[key]`` = ``labels[codes]`` holding only the labels present, and ``uns[f"{key}_colors"]``.

    Categories keep the order of ``labels``; each label keeps its colour from its place in ``all_labels``
    (default ``labels``: e.g. every type the model predicts), so a type has the same colour in every table
    and plot whether or not the others occur (squidpy fails on empty categories).
    """
    labels = np.asarray([str(label) for label in labels], dtype=object)
    palette_order = [str(label) for label in (labels if all_labels is None else all_labels)]
    codes = np.asarray(codes, dtype=np.int64)
    present = np.flatnonzero(np.bincount(codes, minlength=len(labels)) > 0)
    slots = [palette_order.index(label) if label in palette_order else len(palette_order) + i for i, label in enumerate(labels[present])]
    table.obs[key] = pd.Categorical(labels[codes], categories=list(labels[present]))
    table.uns[f"{key}_colors"] = [PALETTE[slot % len(PALETTE)] for slot in slots]


def spot_id_column(spot_ids) -> pd.Categorical:
    """``obs["spot_id"]`` from barcodes (None/NaN outside every spot): categorical, so a missing spot stays
    missing through zarr and h5ad (an object column comes back as the string ``"nan"``)."""
    values = pd.Series(np.asarray(spot_ids, dtype=object))
    missing = values.isna().to_numpy()
    values = values.astype(object).where(missing, values.astype(str))
    return pd.Categorical(values.to_numpy(), categories=sorted(values.dropna().unique()))


# ---------------------------------------------------------------------------------------------- models
class SpotsTableModel:
    """The spots table: one row per spot (row name = barcode), annotating the spots element.

    The spots are circles (Visium: points with a ``radius`` column, px) or squares (Visium HD bins: 4-corner
    polygons along the bin grid with a ``side`` column, px; a point on an edge shared by two bins belongs to
    the one on its +x / +y side). ``obs["region"]`` and ``obs["spot_id"]`` (= the row name) link rows to the
    shapes; ``obsm["spatial"]``
    holds the spot centres (x, y, ``global`` px) and ``obsm["spatial_um"]`` the same in µm; ``obsm["proportions"]`` (spot cell-type proportions, rows
    summing to 1) and ``obsm["histocell_proportions"]`` (mean nucleus predictions, NaN rows for spots without
    nuclei) are checked when present.

    Attributes
    ----------
    instance_key
        The ``obs`` column naming the spot of each row.
    """

    instance_key = SPOT_ID_KEY

    @classmethod
    def parse(cls, adata: ad.AnnData, *, region: str = SPOTS_KEY, centers=None, mpp: float | None = None) -> ad.AnnData:
        """Make ``adata`` a spots table (modified in place and returned, validated).

        Parameters
        ----------
        adata
            Rows named by spot barcode (counts in ``X``, if any).
        region
            Name of the spots element (circles or squares in ``sdata.shapes``) the table annotates.
        centers
            ``(n, 2)`` spot centres (x, y in ``global`` pixels) stored in ``obsm["spatial"]``; None keeps
            what ``adata`` holds.
        mpp
            µm per pixel: ``obsm["spatial_um"]`` = the centres in µm (for squidpy's ``spatial_key``).

        Returns
        -------
        anndata.AnnData
            The table, parsed by :class:`spatialdata.models.TableModel`.
        """
        adata.obs_names = adata.obs_names.astype(str)
        adata.uns.pop("spatialdata_attrs", None)
        adata.obs[REGION_KEY] = pd.Categorical([region] * adata.n_obs, categories=[region])
        adata.obs[SPOT_ID_KEY] = adata.obs_names.to_numpy()
        if centers is not None:
            adata.obsm[SPATIAL_KEY] = np.asarray(centers, dtype=np.float64).reshape(-1, 2)
        if mpp is not None and SPATIAL_KEY in adata.obsm:
            adata.obsm[SPATIAL_UM_KEY] = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)[:, :2] * float(mpp)
        adata = TableModel.parse(adata, region=region, region_key=REGION_KEY, instance_key=SPOT_ID_KEY)
        cls.validate(adata)
        return adata

    @classmethod
    def validate(cls, table: ad.AnnData, name: str = "The spots table") -> None:
        """Raise :class:`~histocell_sd.InvalidInputError` naming the problem when ``table`` breaks the layout.

        Parameters
        ----------
        table
            The table to check (nothing is changed).
        name
            How the message names the table.

        Returns
        -------
        None
        """
        annotation(table, name, SPOT_ID_KEY)
        if not (table.obs[SPOT_ID_KEY].astype(str).to_numpy() == table.obs_names.to_numpy()).all():
            raise InvalidInputError(f"{name}: obs[{SPOT_ID_KEY!r}] must equal the row names (the barcodes).")
        check_xy(table, name, required=False)
        if PROPORTIONS_KEY in table.obsm:
            check_rows(table.obsm[PROPORTIONS_KEY], table, f"{name}.obsm[{PROPORTIONS_KEY!r}]")
        if PREDICTED_PROPORTIONS_KEY in table.obsm:
            check_rows(table.obsm[PREDICTED_PROPORTIONS_KEY], table, f"{name}.obsm[{PREDICTED_PROPORTIONS_KEY!r}]", missing_rows=True)


class NucleiTableModel:
    """The nuclei table: one row per nucleus, annotating the nuclei shapes; predictions join it.

    ``obs["region"]`` and ``obs["nucleus_id"]`` link rows to the polygons; ``obsm["spatial"]`` holds the
    centroids (x, y, ``global`` px) and ``obsm["spatial_um"]`` the same in µm (squidpy:
    ``spatial_key="spatial_um"``); ``X`` the morphology features named in ``uns["histocell"]["features"]``;
    ``obs["spot_id"]`` (categorical, missing outside every spot); ``uns["histocell"]`` the keys of
    :data:`~histocell_sd.io._schema.METADATA` (``mpp`` required). Predictions (``cell_type``, ``cell_state``, ``compartment``,
    ``refined_cell_type``) are categoricals holding only the labels present, with ``uns["<key>_colors"]``,
    beside ``obsm["<key>_proba"]`` (rows summing to 1).

    Attributes
    ----------
    instance_key
        The ``obs`` column naming the nucleus of each row.
    """

    instance_key = NUCLEUS_ID_KEY

    @classmethod
    def parse(cls, adata: ad.AnnData, *, region: str, mpp: float, method: str, spot_ids=None, **metadata) -> ad.AnnData:
        """Make ``adata`` a nuclei table (modified in place and returned, validated).

        Parameters
        ----------
        adata
            Rows named by nucleus id, centroids (x, y px) in ``obsm["spatial"]``.
        region
            Name of the nuclei shapes element the table annotates.
        mpp
            µm per pixel of the image.
        method
            How the nuclei were made (``uns["histocell"]["method"]``).
        spot_ids
            Barcode of the spot holding each nucleus (None/NaN outside every spot) → ``obs["spot_id"]``.
        **metadata
            Further keys of :data:`~histocell_sd.io._schema.METADATA`, merged into ``uns["histocell"]``.

        Returns
        -------
        anndata.AnnData
            The table, parsed by :class:`spatialdata.models.TableModel`.
        """
        adata.obs_names = adata.obs_names.astype(str)
        adata.uns.pop("spatialdata_attrs", None)
        adata.obs[REGION_KEY] = pd.Categorical([region] * adata.n_obs, categories=[region])
        if NUCLEUS_ID_KEY not in adata.obs:
            adata.obs[NUCLEUS_ID_KEY] = adata.obs_names.to_numpy()
        if spot_ids is not None:
            adata.obs[SPOT_ID_KEY] = spot_id_column(spot_ids)
        merge_metadata(adata, mpp=float(mpp), method=str(method), **metadata)
        adata.obsm[SPATIAL_UM_KEY] = np.asarray(adata.obsm[SPATIAL_KEY], dtype=np.float64)[:, :2] * float(mpp)
        adata = TableModel.parse(adata, region=region, region_key=REGION_KEY, instance_key=NUCLEUS_ID_KEY)
        cls.validate(adata)
        return adata

    @classmethod
    def validate(cls, table: ad.AnnData, name: str = "The nuclei table") -> None:
        """Raise :class:`~histocell_sd.InvalidInputError` naming the problem when ``table`` breaks the layout.

        Parameters
        ----------
        table
            The table to check (nothing is changed).
        name
            How the message names the table.

        Returns
        -------
        None
        """
        annotation(table, name, NUCLEUS_ID_KEY)
        check_xy(table, name, required=True)
        meta = table.uns.get(HISTOCELL_KEY)
        if not isinstance(meta, dict):
            raise InvalidInputError(f"{name} has no uns[{HISTOCELL_KEY!r}] metadata.")
        mpp = meta.get("mpp")
        if isinstance(mpp, bool) or not isinstance(mpp, (int, float, np.number)) or not np.isfinite(mpp) or mpp <= 0:
            raise InvalidInputError(f"{name}.uns[{HISTOCELL_KEY!r}]['mpp'] must be a positive number of µm per pixel, got {mpp!r}.")
        features = meta.get("features")
        if features is not None and set(table.var_names) != set(features):  # zarr and h5ad do not keep a dict's order
            raise InvalidInputError(f"{name}: var_names {list(table.var_names)[:4]}... are not the features of uns[{HISTOCELL_KEY!r}].")
        if SPATIAL_UM_KEY in table.obsm:
            um = np.asarray(table.obsm[SPATIAL_UM_KEY], dtype=np.float64)
            if um.shape != (table.n_obs, 2) or not np.allclose(um, np.asarray(table.obsm[SPATIAL_KEY], dtype=np.float64)[:, :2] * mpp, rtol=1e-6):
                raise InvalidInputError(f"{name}.obsm[{SPATIAL_UM_KEY!r}] is not obsm[{SPATIAL_KEY!r}] × mpp ({mpp}).")
        check_spot_ids(table, name)
        check_predictions(table, name)


class ExpressionTableModel:
    """The imputed expression of the nuclei (nuclei × reference genes), annotating the nuclei shapes.

    Written by :func:`~histocell_sd.tl.refine_deconvolution`: the counts of a matched reference cell per
    nucleus, ``obs["refined_cell_type"]`` (never ``cell_type``, which would shadow the nuclei table's in
    spatialdata-plot), ``obs["matched_cell"]``, ``obs["spot_id"]`` and ``uns["imputation"]`` (how it was
    made; a table with it may be replaced by the next refinement).

    Attributes
    ----------
    instance_key
        The ``obs`` column naming the nucleus of each row.
    """

    instance_key = NUCLEUS_ID_KEY

    @classmethod
    def parse(cls, adata: ad.AnnData, *, region: str, imputation: dict) -> ad.AnnData:
        """Make ``adata`` an expression table (modified in place and returned, validated).

        Parameters
        ----------
        adata
            Nuclei × genes, rows named as the nuclei table's.
        region
            Name of the nuclei shapes element the table annotates.
        imputation
            How the expression was imputed (``uns["imputation"]``).

        Returns
        -------
        anndata.AnnData
            The table, parsed by :class:`spatialdata.models.TableModel`.
        """
        adata.uns.pop("spatialdata_attrs", None)
        adata.obs[REGION_KEY] = pd.Categorical([region] * adata.n_obs, categories=[region])
        if NUCLEUS_ID_KEY not in adata.obs:
            adata.obs[NUCLEUS_ID_KEY] = adata.obs_names.to_numpy()
        if SPOT_ID_KEY in adata.obs:
            adata.obs[SPOT_ID_KEY] = spot_id_column(adata.obs[SPOT_ID_KEY])
        adata.uns[IMPUTATION_KEY] = dict(imputation)
        adata = TableModel.parse(adata, region=region, region_key=REGION_KEY, instance_key=NUCLEUS_ID_KEY)
        cls.validate(adata)
        return adata

    @classmethod
    def validate(cls, table: ad.AnnData, name: str = "The expression table") -> None:
        """Raise :class:`~histocell_sd.InvalidInputError` naming the problem when ``table`` breaks the layout.

        Parameters
        ----------
        table
            The table to check (nothing is changed).
        name
            How the message names the table.

        Returns
        -------
        None
        """
        annotation(table, name, NUCLEUS_ID_KEY)
        if not isinstance(table.uns.get(IMPUTATION_KEY), dict):
            raise InvalidInputError(f"{name} has no uns[{IMPUTATION_KEY!r}] settings.")
        if CELL_TYPE_KEY in table.obs:
            raise InvalidInputError(f"{name} must not hold obs[{CELL_TYPE_KEY!r}] (it would shadow the nuclei table's); use {REFINED_TYPE_KEY!r}.")
        if REFINED_TYPE_KEY in table.obs:
            check_categorical(table, name, REFINED_TYPE_KEY, None)
        check_spot_ids(table, name)
