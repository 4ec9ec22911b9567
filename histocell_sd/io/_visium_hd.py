"""Read a 10x Visium HD Space Ranger output folder (one bin size) into the histocell-sd data model."""

from __future__ import annotations

import json
import re
import warnings
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd
from spatialdata import SpatialData

from .._constants import COORDINATE_SYSTEM, IMAGE_KEY, SPATIAL_KEY, SPOTS_KEY, TABLE_KEY
from .._errors import InvalidInputError
from ._elements import add_micron_system, check_mpp
from ._schema import SpotsTableModel
from ._spots import square_spots_element
from ._validate import validate
from ._visium import _check_full_resolution, _default_name, _he_image

BINNED_OUTPUTS = "binned_outputs"
_BIN_DIR = re.compile(r"square_(\d{3})um")
_COUNTS_FILES = ("filtered_feature_bc_matrix.h5", "raw_feature_bc_matrix.h5")  # what spatialdata-io can read
_POSITIONS_FILE = "tissue_positions.parquet"
_SCALEFACTORS_FILE = "scalefactors_json.json"
_FEATURE_SLICE_FILE = "feature_slice.h5"
_ALIGNMENT_KEYS = ("microns_per_pixel", "spot_diameter_fullres", "bin_size_um")


def read_visium_hd(
    path: str | PathLike,
    *,
    bin_size_um: int = 8,
    fullres_image_file: str | PathLike | None = None,
    dataset_id: str | None = None,
    counts_file: str = "filtered_feature_bc_matrix.h5",
    sample_id: str | None = None,
    **kwargs,
) -> SpatialData:
    """Read one bin size of a Visium HD Space Ranger output folder with :func:`spatialdata_io.visium_hd`.

    Parameters
    ----------
    path
        The Space Ranger ``outs`` folder: ``binned_outputs/square_<XXX>um/`` (counts file,
        ``spatial/tissue_positions.parquet``, ``spatial/scalefactors_json.json``) and ``feature_slice.h5``.
    bin_size_um
        Side of the bins to read, µm (2, 8 or 16 in Space Ranger's outputs; the folder must have it).
    fullres_image_file
        The full-resolution H&E given to Space Ranger (relative to ``path`` or absolute); None: the only
        file of ``microscope_image/`` or ``[<dataset_id>_]tissue_image.*``, as spatialdata-io looks for it.
    dataset_id
        Name used by the reader (the prefix of ``<dataset_id>_feature_slice.h5``, if any); default: that
        prefix, else the folder name.
    counts_file
        ``"filtered_feature_bc_matrix.h5"`` (bins under tissue) or ``"raw_feature_bc_matrix.h5"``.
    sample_id
        Stored in ``sdata.attrs["sample_id"]``; default ``dataset_id``.
    **kwargs
        Passed to :func:`spatialdata_io.visium_hd` (e.g. ``imread_kwargs``, ``image_models_kwargs``).

    Returns
    -------
    SpatialData with the full-resolution image ``"he"``, the bins as square spots ``"spots"`` (4-corner
    polygons along the bin grid, column ``side`` = bin side in full-res px, index = barcodes), the counts
    table ``"table"`` annotating them (:class:`SpotsTableModel`, sparse ``X``, ``obs`` ``array_row``,
    ``array_col``, ``in_tissue``), the reader's hires/lowres images, ``attrs["mpp"]`` (the scale factors'
    ``microns_per_pixel``) and ``attrs["bin_size_um"]``. Coordinate system ``"global"`` is full-resolution
    pixels, ``"um"`` the same in µm.
    """
    from spatialdata_io import visium_hd

    path = Path(path)
    if not path.is_dir():
        raise InvalidInputError(f"Visium HD folder {path} does not exist or is not a directory.")
    if counts_file not in _COUNTS_FILES:
        raise InvalidInputError(f"counts_file must be one of {list(_COUNTS_FILES)}, got {counts_file!r}.")
    bin_size_um = _check_bin_size(bin_size_um)
    bin_dir = _bin_folder(path, bin_size_um)
    for needed in (bin_dir / counts_file, bin_dir / "spatial" / _POSITIONS_FILE):
        if not needed.is_file():
            raise InvalidInputError(f"The {bin_size_um} µm bins have no {needed.relative_to(path)} in {path}.")
    scalefactors_path = bin_dir / "spatial" / _SCALEFACTORS_FILE
    mpp, side_px = _alignment(scalefactors_path, bin_size_um, path)
    prefix = _feature_slice_prefix(path, dataset_id)
    fullres = _fullres_image(path, fullres_image_file, prefix)
    if dataset_id is None:
        dataset_id = prefix or _default_name(path)
    dataset_id = str(dataset_id)

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Converting `region_key", category=UserWarning)
            raw = visium_hd(path, dataset_id=dataset_id, filtered_counts_file=counts_file == _COUNTS_FILES[0],
                            load_segmentations_only=False, bin_size=bin_size_um, bins_as_squares=False,
                            fullres_image_file=fullres, **kwargs)
    except (ValueError, KeyError, OSError, AssertionError, RuntimeError) as error:
        raise InvalidInputError(f"spatialdata-io could not read the Visium HD folder {path}: {error!r}") from error

    bins_name = f"square_{bin_size_um:03d}um"
    full_key, shapes_key = f"{dataset_id}_full_image", f"{dataset_id}_{bins_name}"
    if full_key not in raw.images:
        raise InvalidInputError(f"Full-resolution image {fullres} could not be read.")
    table = raw.tables[bins_name]
    xy = np.asarray(table.obsm[SPATIAL_KEY], dtype=np.float64)
    _check_bins(table, xy, path / BINNED_OUTPUTS / bins_name)
    _check_full_resolution(raw.images[full_key], fullres, scalefactors_path, xy)

    barcodes = table.obs_names.astype(str)
    angle = grid_angle(table.obs["array_col"].to_numpy(), table.obs["array_row"].to_numpy(), xy)
    spots = square_spots_element(xy, side_px, barcodes, mpp=mpp, angle=angle)
    del raw.tables[bins_name]  # the table is adopted, not copied: a full capture area has ~650k bins
    table.uns.pop("spatialdata_attrs", None)
    table.obs = table.obs.drop(columns=["location_id"], errors="ignore")
    table.obs_names = barcodes
    table = SpotsTableModel.parse(table, region=SPOTS_KEY, mpp=mpp)

    images = {IMAGE_KEY: _he_image(raw.images[full_key], fullres)}
    images.update({k: v for k, v in raw.images.items() if k != full_key})
    shapes = {k: v for k, v in raw.shapes.items() if k != shapes_key}
    attrs = dict(raw.attrs)
    attrs.update(mpp=mpp, bin_size_um=bin_size_um, sample_id=str(sample_id if sample_id is not None else dataset_id))
    sdata = SpatialData(images=images, shapes=shapes, tables=dict(raw.tables), labels=dict(raw.labels), points=dict(raw.points), attrs=attrs)
    if dataset_id != COORDINATE_SYSTEM:
        sdata.rename_coordinate_systems({dataset_id: COORDINATE_SYSTEM})
    sdata.shapes[SPOTS_KEY] = spots  # already in global and um
    sdata.tables[TABLE_KEY] = table
    add_micron_system(sdata, mpp)
    validate(sdata)
    return sdata


def grid_angle(col: np.ndarray, row: np.ndarray, xy: np.ndarray) -> float:
    """Angle (radians, from +x in pixel axes) of the bin grid's column axis: least squares of the pixel centres
    on ``(array_col, array_row)``; 0 when the bins do not span two dimensions."""
    design = np.column_stack([np.asarray(col, np.float64), np.asarray(row, np.float64), np.ones(len(xy))])
    if len(xy) < 3 or np.linalg.matrix_rank(design[: min(len(xy), 100_000)]) < 3:
        return 0.0
    coef = np.linalg.lstsq(design, xy, rcond=None)[0]  # rows: d(x, y)/d col, d(x, y)/d row, offset
    angle = float(np.arctan2(coef[0, 1], coef[0, 0]))
    return 0.0 if abs(angle) < 1e-9 else angle


def _check_bin_size(bin_size_um) -> int:
    if isinstance(bin_size_um, bool) or not isinstance(bin_size_um, (int, float, np.number)) or not np.isfinite(bin_size_um) \
            or bin_size_um <= 0 or float(bin_size_um) != int(bin_size_um):
        raise InvalidInputError(f"bin_size_um must be a positive whole number of µm (e.g. 8), got {bin_size_um!r}.")
    return int(bin_size_um)


def available_bin_sizes(path: str | PathLike) -> list[int]:
    """Bin sizes (µm) of a Visium HD folder: the ``binned_outputs/square_<XXX>um`` folders."""
    root = Path(path) / BINNED_OUTPUTS
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _BIN_DIR.fullmatch(p.name)))


def _bin_folder(path: Path, bin_size_um: int) -> Path:
    sizes = available_bin_sizes(path)
    if not sizes:
        raise InvalidInputError(f"{path} has no Visium HD bins: expected {BINNED_OUTPUTS}/square_<XXX>um/ folders.")
    if bin_size_um not in sizes:
        raise InvalidInputError(f"{path} has no {bin_size_um} µm bins; it has bin sizes {sizes} µm.")
    return path / BINNED_OUTPUTS / f"square_{bin_size_um:03d}um"


def _alignment(scalefactors_path: Path, bin_size_um: int, path: Path) -> tuple[float, float]:
    """``(mpp, bin side in px)`` from the bins' scale factors: the bins' alignment to the full-resolution image."""
    if not scalefactors_path.is_file():
        raise InvalidInputError(
            f"The {bin_size_um} µm bins of {path} have no image alignment: {scalefactors_path.relative_to(path)} is missing "
            "(run Space Ranger with the H&E image, so that the bins have full-resolution pixel positions)."
        )
    try:
        factors = json.loads(scalefactors_path.read_text())
        values = {key: float(factors[key]) for key in _ALIGNMENT_KEYS}
    except (ValueError, KeyError, TypeError) as error:
        raise InvalidInputError(
            f"{scalefactors_path} has no image alignment ({', '.join(_ALIGNMENT_KEYS)} needed): {error!r}."
        ) from None
    if values["bin_size_um"] != bin_size_um:
        raise InvalidInputError(f"{scalefactors_path}: bin_size_um is {values['bin_size_um']:g}, not {bin_size_um} as its folder says.")
    mpp = check_mpp(values["microns_per_pixel"])
    side = values["spot_diameter_fullres"]
    if not np.isfinite(side) or side <= 0 or not np.isclose(bin_size_um / side, mpp, rtol=1e-3):
        raise InvalidInputError(
            f"{scalefactors_path}: spot_diameter_fullres ({side:g} px) is not bin_size_um / microns_per_pixel "
            f"({bin_size_um} / {mpp:g}); the alignment is inconsistent."
        )
    return mpp, side


def _feature_slice_prefix(path: Path, dataset_id: str | None) -> str:
    """The ``<dataset_id>`` of ``<dataset_id>_feature_slice.h5`` ('' without a prefix); the reader needs the file."""
    if (path / _FEATURE_SLICE_FILE).is_file():
        return ""
    found = sorted(p.name[: -len(_FEATURE_SLICE_FILE) - 1] for p in path.glob(f"*_{_FEATURE_SLICE_FILE}") if p.is_file())
    if dataset_id is not None and str(dataset_id) in found:
        return str(dataset_id)
    if len(found) == 1 and dataset_id is None:
        return found[0]
    raise InvalidInputError(
        f"{path} has no {_FEATURE_SLICE_FILE} (or <dataset_id>_{_FEATURE_SLICE_FILE}) for dataset_id={dataset_id!r}; "
        f"found {found}. spatialdata-io reads the slide layout from it."
    )


def _fullres_image(path: Path, fullres_image_file, prefix: str) -> Path:
    if fullres_image_file is not None:
        fullres = path / Path(fullres_image_file)
        if not fullres.is_file():
            raise InvalidInputError(f"Full-resolution image file {fullres} does not exist.")
        return fullres
    microscope = path / "microscope_image"
    found = sorted(p for p in microscope.iterdir() if p.is_file()) if microscope.is_dir() else []
    found = found or sorted(p for p in path.glob(f"{prefix + '_' if prefix else ''}tissue_image.*") if p.is_file())
    if len(found) != 1:
        raise InvalidInputError(
            f"The bins of {path} have no full-resolution H&E to align to ({'several candidates ' + str([p.name for p in found]) if found else 'none found'} "
            "in microscope_image/ or tissue_image.*): pass fullres_image_file='<image given to Space Ranger>.tif'. HistoCell "
            "segments nuclei, which the hires/lowres images cannot resolve."
        )
    return found[0]


def _check_bins(table, xy: np.ndarray, bin_dir: Path) -> None:
    if table.n_obs == 0:
        raise InvalidInputError(f"{bin_dir} holds no bins.")
    if not np.isfinite(xy).all():
        missing = table.obs_names[~np.isfinite(xy).all(axis=1)]
        raise InvalidInputError(f"{len(missing)} bins have no position in {bin_dir / 'spatial' / _POSITIONS_FILE}, e.g. {missing[:3].tolist()}.")
    total = table.X.sum()
    if not np.isfinite(total) or total <= 0:
        raise InvalidInputError(f"The bins of {bin_dir} have zero counts everywhere (total {total:g}); nothing to learn from.")
    if pd.Index(table.obs_names).has_duplicates:
        raise InvalidInputError(f"{bin_dir}: duplicate bin barcodes.")
