"""Read a 10x Visium Space Ranger output folder into the histocell-sd data model."""

from __future__ import annotations

import json
import re
import warnings
from os import PathLike
from pathlib import Path

import numpy as np
import pandas as pd
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, ShapesModel
from spatialdata.transformations import get_transformation

from .._constants import (
    COORDINATE_SYSTEM,
    IMAGE_KEY,
    SPOT_ID_KEY,
    SPOTS_KEY,
    TABLE_KEY,
    VISIUM_SPOT_DIAMETER_UM,
)
from .._errors import InvalidInputError
from ._elements import add_micron_system
from ._schema import SpotsTableModel
from ._validate import validate

_POSITIONS_FILES = ("tissue_positions_list.csv", "tissue_positions.csv")  # the reader's order
_SCALEFACTORS_FILE = "scalefactors_json.json"


def read_visium(
    path: str | PathLike,
    *,
    dataset_id: str | None = None,
    fullres_image_file: str | PathLike | None = None,
    counts_file: str = "filtered_feature_bc_matrix.h5",
    sample_id: str | None = None,
    **kwargs,
) -> SpatialData:
    """Read a Visium Space Ranger output folder with :func:`spatialdata_io.visium`.

    Parameters
    ----------
    path
        The Space Ranger ``outs`` folder (counts file and ``spatial/``).
    dataset_id
        Name used by the reader; default: the counts file's library prefix, else the folder name.
    fullres_image_file
        The full-resolution H&E given to Space Ranger (relative to ``path`` or absolute). Required:
        HistoCell works on nuclei, which the hires/lowres images cannot resolve.
    counts_file
        Counts file name (``(<library_id>_)filtered_feature_bc_matrix.h5`` by default).
    sample_id
        Stored in ``sdata.attrs["sample_id"]``; default ``dataset_id``.
    **kwargs
        Passed to :func:`spatialdata_io.visium` (e.g. ``imread_kwargs``, ``image_models_kwargs``).

    Returns
    -------
    SpatialData with the full-resolution image ``"he"``, circles ``"spots"`` (radius in full-res
    px, index = barcodes), the counts table ``"table"`` annotating them, the reader's hires/lowres
    images, and ``attrs["mpp"] = 55 / spot_diameter_fullres``. Coordinate system ``"global"`` is
    full-resolution pixels.
    """
    from spatialdata_io import visium

    path = Path(path)
    if not path.is_dir():
        raise InvalidInputError(f"Visium folder {path} does not exist or is not a directory.")
    if fullres_image_file is None:
        raise InvalidInputError(
            "read_visium needs the full-resolution H&E image (HistoCell segments nuclei, which the hires/lowres "
            "PNGs cannot resolve): pass fullres_image_file='<image given to Space Ranger>.tif'."
        )
    fullres = path / Path(fullres_image_file)
    if not fullres.is_file():
        raise InvalidInputError(f"Full-resolution image file {fullres} does not exist.")
    _, library_id = _find_counts(path, counts_file)
    positions = [path / "spatial" / name for name in _POSITIONS_FILES if (path / "spatial" / name).is_file()]
    if not positions:
        raise InvalidInputError(f"No spot positions file in {path / 'spatial'}: expected {' or '.join(_POSITIONS_FILES)}.")
    scalefactors_path = path / "spatial" / _SCALEFACTORS_FILE
    if not scalefactors_path.is_file():
        raise InvalidInputError(f"Scale factors file {scalefactors_path} does not exist.")
    diameter = _spot_diameter(scalefactors_path)
    mpp = VISIUM_SPOT_DIAMETER_UM / diameter

    if dataset_id is None:
        dataset_id = library_id or _default_name(path)
    dataset_id = str(dataset_id)
    try:
        with warnings.catch_warnings():  # the reader's own str -> categorical region column
            warnings.filterwarnings("ignore", message="Converting `region_key", category=UserWarning)
            raw = visium(path, dataset_id=dataset_id, counts_file=counts_file, fullres_image_file=fullres, **kwargs)
    except (ValueError, KeyError, OSError) as error:
        raise InvalidInputError(f"spatialdata-io could not read the Visium folder {path}: {error}") from error

    full_key, shapes_key = f"{dataset_id}_full_image", dataset_id
    if full_key not in raw.images:
        raise InvalidInputError(f"Full-resolution image {fullres} could not be read.")
    _check_full_resolution(raw.images[full_key], fullres, scalefactors_path, raw.tables["table"].obsm["spatial"])
    images = {IMAGE_KEY: _he_image(raw.images[full_key], fullres)}
    images.update({k: v for k, v in raw.images.items() if k != full_key})
    table, spots = _spots_and_table(raw.tables["table"], raw.shapes[shapes_key], positions[0], mpp)
    shapes = {k: v for k, v in raw.shapes.items() if k != shapes_key}
    shapes[SPOTS_KEY] = spots
    tables = {k: v for k, v in raw.tables.items() if k != "table"}
    tables[TABLE_KEY] = table
    attrs = dict(raw.attrs)
    attrs.update(mpp=mpp, sample_id=str(sample_id if sample_id is not None else dataset_id))
    sdata = SpatialData(images=images, shapes=shapes, tables=tables, labels=dict(raw.labels),
                        points=dict(raw.points), attrs=attrs)
    if dataset_id != COORDINATE_SYSTEM:
        sdata.rename_coordinate_systems({dataset_id: COORDINATE_SYSTEM})
    add_micron_system(sdata, mpp)
    validate(sdata)
    return sdata


def _find_counts(path: Path, counts_file: str) -> tuple[Path, str | None]:
    """The counts file and the library id in its ``<library_id>_`` prefix, if any."""
    if (path / counts_file).is_file():
        return path / counts_file, None
    prefixed = sorted(p for p in path.iterdir() if p.name.endswith(f"_{counts_file}") and p.is_file())
    if not prefixed:
        raise InvalidInputError(f"Counts file {path / counts_file} (or <library_id>_{counts_file}) does not exist.")
    if len(prefixed) > 1:
        raise InvalidInputError(f"Several counts files in {path}: {[p.name for p in prefixed]}; pass counts_file.")
    return prefixed[0], prefixed[0].name[: -len(counts_file) - 1]


def _spot_diameter(scalefactors_path: Path) -> float:
    try:
        scalefactors = json.loads(scalefactors_path.read_text())
        diameter = float(scalefactors["spot_diameter_fullres"])
    except (ValueError, KeyError, TypeError) as error:
        raise InvalidInputError(f"{scalefactors_path} has no usable 'spot_diameter_fullres': {error!r}.") from None
    if not np.isfinite(diameter) or diameter <= 0:
        raise InvalidInputError(f"{scalefactors_path}: spot_diameter_fullres must be positive, got {diameter}.")
    return diameter


def _check_full_resolution(image, fullres: Path, scalefactors_path: Path, spots_xy) -> None:
    """Refuse Space Ranger's hires or lowres PNG given as the full-resolution image.

    Such an image is as large as ``tissue_<res>_scalef`` × the full resolution (estimated from the
    PNGs next to the scale factors); without PNGs, when the spots lie outside the image but would fit
    once scaled by that factor.
    """
    from PIL import Image

    level = image["scale0"]["image"] if "scale0" in getattr(image, "children", {}) else image
    size = np.array([level.sizes["x"], level.sizes["y"]], dtype=np.float64)
    factors = {}
    for res, value in json.loads(scalefactors_path.read_text()).items():
        name = re.fullmatch(r"tissue_(\w+)_scalef", res)
        if name and isinstance(value, (int, float)) and 0 < value < 1:
            factors[name.group(1)] = float(value)
    full = None
    for res, factor in factors.items():
        png = scalefactors_path.parent / f"tissue_{res}_image.png"
        if png.is_file():
            with Image.open(png) as img:
                full = np.array(img.size, dtype=np.float64) / factor
            break
    xy = np.asarray(spots_xy, dtype=np.float64)
    xy = xy[np.isfinite(xy).all(axis=1)]
    outside = bool(len(xy)) and bool((xy >= size).any())
    for res, factor in factors.items():
        if full is not None:
            looks_downsampled = bool((np.abs(full * factor - size) <= np.maximum(2, 0.005 * size)).all())
        else:
            looks_downsampled = outside and bool((xy * factor < size).all())
        if looks_downsampled:
            estimate = "" if full is None else f" (~{full[0]:.0f}×{full[1]:.0f} px)"
            raise InvalidInputError(
                f"{fullres.name} ({size[0]:.0f}×{size[1]:.0f} px) looks like Space Ranger's {res} image: its size is "
                f"tissue_{res}_scalef ({factor:g}) × the full-resolution size{estimate}, while the spot positions are "
                "in full-resolution pixels. Pass as fullres_image_file the full-resolution H&E given to Space Ranger "
                "(e.g. the original .tif/.svs), not spatial/tissue_*_image.png."
            )


def _default_name(path: Path) -> str:
    """The folder name (its parent's for Space Ranger's ``outs``), made a valid element name."""
    path = path.resolve()
    name = path.parent.name if path.name == "outs" and path.parent.name else path.name
    return re.sub(r"[^\w.-]", "_", name) or "visium"


def _he_image(image, fullres: Path):
    """The reader's full-resolution image, with RGBA reduced to RGB (the reader keeps every channel)."""
    if "scale0" not in getattr(image, "children", {}):
        return image
    level = image["scale0"]["image"]
    if level.sizes.get("c") != 4:
        return image
    warnings.warn(f"{fullres.name} is RGBA; the alpha channel was dropped.", stacklevel=3)
    return Image2DModel.parse(
        level.data[:3],
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=[2] * (len(image.children) - 1) or None,
        transformations=get_transformation(level, get_all=True),
    )


def _spots_and_table(table, circles, positions_path: Path, mpp: float):
    """Spots indexed by barcode and a table annotating them by ``spot_id`` = barcode."""
    barcodes = table.obs_names.astype(str)
    if not np.isfinite(np.asarray(table.obsm["spatial"], dtype=np.float64)).all():
        missing = barcodes[~np.isfinite(np.asarray(table.obsm["spatial"], dtype=np.float64)).all(axis=1)]
        raise InvalidInputError(f"{len(missing)} barcodes have no position in {positions_path}, e.g. {missing[:3].tolist()}.")
    by_int_id = pd.Series(barcodes, index=table.obs[SPOT_ID_KEY].to_numpy())
    circles = circles.copy()
    circles.index = pd.Index(by_int_id.loc[circles.index.to_numpy()].to_numpy(), name=SPOT_ID_KEY)
    ShapesModel.validate(circles)

    adata = table.copy()
    adata.uns.pop("spatialdata_attrs", None)
    adata.obs_names = barcodes
    adata = SpotsTableModel.parse(adata, region=SPOTS_KEY, mpp=mpp)
    return adata, circles
