"""Check that a SpatialData follows the histocell-sd data model."""

from __future__ import annotations

import pandas as pd
from spatialdata import SpatialData, get_extent
from spatialdata.models import get_table_keys

from .._constants import COORDINATE_SYSTEM, HISTOCELL_KEY, IMAGE_KEY, NUCLEI_KEY, PROPORTIONS_KEY, SPOT_ID_KEY, SPOTS_KEY, TABLE_KEY
from .._docs import inject_docs
from .._errors import InvalidInputError
from ._elements import annotated_regions, check_in_global, get_mpp, get_rgb_image, resolve_key
from ._schema import NucleiTableModel, SpotsTableModel
from ._schema_checks import check_nuclei_mpp, check_rows
from ._spots import annotated_spots, spot_geometry


@inject_docs
def validate(
    sdata: SpatialData,
    *,
    image_key: str | None = None,
    spots_key: str | None = None,
    spots_table_key: str | None = None,
    nuclei_key: str | None = None,
    nuclei_table_key: str | None = None,
    proportions_key: str = PROPORTIONS_KEY,
    require_spots: bool = False,
) -> None:
    """Raise :class:`~histocell_sd.InvalidInputError` naming the element and the problem if ``sdata`` breaks the data model.

    Checks ``attrs["mpp"]``; the RGB uint8 image; that every element lives in the ``global``
    coordinate system; spot circles or squares (their centres) inside the image; the spots table's annotation and proportions
    (finite, non-negative, rows summing to 1); nuclei polygons and their table when present; each table
    against its layout (:class:`SpotsTableModel`, :class:`NucleiTableModel`).

    Parameters
    ----------
    sdata
        The sample to check (nothing is written).
    {image_key}
    {spots_key}
        Spots are checked when given, when ``"spots"`` exists, when the spots table annotates circles or squares,
        or with ``require_spots``.
    {spots_table_key}
    {nuclei_key}
        Checked when given, when ``"nuclei"`` exists, or as the shapes the nuclei table annotates.
    {nuclei_table_key}
        None: ``"histocell"`` when present, else the only table. Checked when given or present.
    {proportions_key}
        Checked when present.
    require_spots
        Refuse a sample without spots.

    Returns
    -------
    None
        Raises :class:`~histocell_sd.InvalidInputError` at the first problem.
    """
    mpp = get_mpp(sdata)
    image_key = resolve_key(sdata, "images", key=image_key, default=IMAGE_KEY)
    _check_image_element(sdata, image_key)
    if spots_key is None and SPOTS_KEY not in sdata.shapes:
        spots_key = annotated_spots(sdata)  # e.g. spatialdata-io's Visium circles, named after the dataset
    if spots_key is not None or SPOTS_KEY in sdata.shapes or require_spots:
        spots_key = resolve_key(sdata, "shapes", key=spots_key, default=SPOTS_KEY)
        _check_spots(sdata, spots_key, image_key)
        spots_table_key = resolve_key(sdata, "tables", key=spots_table_key, default=TABLE_KEY)
        _check_annotating_table(sdata, spots_table_key, spots_key)
        table = sdata.tables[spots_table_key]
        SpotsTableModel.validate(table, name=f"tables[{spots_table_key!r}]")  # checks obsm["proportions"]
        if proportions_key != PROPORTIONS_KEY and proportions_key in table.obsm:
            check_rows(table.obsm[proportions_key], table, f"tables[{spots_table_key!r}].obsm[{proportions_key!r}]")
    if nuclei_key is None and (nuclei_table_key is not None or HISTOCELL_KEY in sdata.tables):
        nuclei_table_key = resolve_key(sdata, "tables", key=nuclei_table_key, default=HISTOCELL_KEY)
        regions = annotated_regions(sdata.tables[nuclei_table_key])  # e.g. segment_nuclei(key_added="cellpose")
        lacking = [r for r in regions if r not in sdata.shapes]
        if lacking:
            raise InvalidInputError(
                f"tables[{nuclei_table_key!r}] annotates the shapes {lacking}, which the SpatialData lacks (shapes: "
                f"{sorted(sdata.shapes)}); restore them or re-run pp.segment_nuclei."
            )
        nuclei_key = regions[0] if len(regions) == 1 else None
    if nuclei_key is not None or NUCLEI_KEY in sdata.shapes:
        nuclei_key = resolve_key(sdata, "shapes", key=nuclei_key, default=NUCLEI_KEY)
        _check_in_global(sdata, nuclei_key)
        nuclei_table_key = resolve_key(sdata, "tables", key=nuclei_table_key, default=HISTOCELL_KEY)
        _check_annotating_table(sdata, nuclei_table_key, nuclei_key)
        nuclei_table = sdata.tables[nuclei_table_key]
        NucleiTableModel.validate(nuclei_table, name=f"tables[{nuclei_table_key!r}]")
        check_nuclei_mpp(nuclei_table, mpp, f"tables[{nuclei_table_key!r}]")
        if spots_key is not None and SPOT_ID_KEY in nuclei_table.obs:
            _check_nuclei_spots(nuclei_table, sdata.tables[spots_table_key], nuclei_table_key, spots_table_key)


def _check_nuclei_spots(nuclei_table, spots_table, nuclei_table_key: str, spots_table_key: str) -> None:
    """Every spot a nucleus names must be a row of the spots table (else it was assigned to other spots)."""
    named = pd.Index(nuclei_table.obs[SPOT_ID_KEY].dropna().astype(str).unique())
    unknown = named.difference(spots_table.obs_names.astype(str))
    if len(unknown):
        raise InvalidInputError(
            f"tables[{nuclei_table_key!r}].obs['spot_id'] names {len(unknown)} spots that are not rows of tables[{spots_table_key!r}], "
            f"e.g. {unknown[:3].tolist()}: the nuclei were assigned to another sample's spots; re-run hc.pp.store_nuclei."
        )


def _check_in_global(sdata: SpatialData, key: str) -> None:
    check_in_global(sdata, key, "all elements must share the full-resolution pixel system 'global'.")


def _check_image_element(sdata: SpatialData, key: str) -> None:
    _check_in_global(sdata, key)
    get_rgb_image(sdata, image_key=key)


def _check_spots(sdata: SpatialData, spots_key: str, image_key: str) -> None:
    _check_in_global(sdata, spots_key)
    spots = sdata.shapes[spots_key]
    centers = spot_geometry(spots, spots_key).centers  # circles (Visium) or squares (Visium HD bins)
    if spots.index.has_duplicates:
        raise InvalidInputError(f"Shapes {spots_key!r} has duplicate spot barcodes.")
    extent = get_extent(sdata.images[image_key], coordinate_system=COORDINATE_SYSTEM)
    x, y = centers[:, 0], centers[:, 1]
    outside = (x < extent["x"][0]) | (x > extent["x"][1]) | (y < extent["y"][0]) | (y > extent["y"][1])
    if outside.any():
        raise InvalidInputError(f"{outside.sum()} spots of {spots_key!r} lie outside image {image_key!r}.")


def _check_annotating_table(sdata: SpatialData, table_key: str, region: str) -> None:
    table = sdata.tables[table_key]
    if "spatialdata_attrs" not in table.uns:
        raise InvalidInputError(f"Table {table_key!r} does not annotate any element (no spatialdata_attrs).")
    regions, region_key, instance_key = get_table_keys(table)
    regions = [regions] if isinstance(regions, str) else list(regions)
    if region not in regions:
        raise InvalidInputError(f"Table {table_key!r} annotates {regions}, not {region!r}.")
    rows = table.obs[region_key] == region
    ids = pd.Index(table.obs.loc[rows, instance_key].astype(str))
    shapes_ids = sdata.shapes[region].index.astype(str)
    unknown = ids.difference(shapes_ids)
    if len(unknown):
        raise InvalidInputError(f"Table {table_key!r} has {len(unknown)} rows for unknown {region!r} ids, e.g. {unknown[:3].tolist()}.")
