"""Finding elements of a SpatialData by key, and the sample's µm per pixel."""

from __future__ import annotations

import math

import numpy as np
from spatialdata import SpatialData
from spatialdata.models import get_table_keys
from spatialdata.transformations import Identity, Scale, Sequence, Translation, get_transformation, set_transformation

from .._constants import COORDINATE_SYSTEM, HISTOCELL_KEY, MICRON_SYSTEM
from .._docs import inject_docs
from .._errors import InvalidInputError

_KINDS = {"images": "image", "labels": "labels", "shapes": "shapes", "tables": "table", "points": "points"}


def resolve_key(sdata: SpatialData, kind: str, *, key: str | None = None, default: str | None = None) -> str:
    """Return the name of the ``kind`` element to use.

    ``key`` when given (it must exist); else ``default`` when present; else the only element of
    that kind. Anything else raises an :class:`~histocell_sd.InvalidInputError` listing the candidates.

    Parameters
    ----------
    sdata
        The sample (read only).
    kind
        ``"images"``, ``"labels"``, ``"shapes"``, ``"tables"`` or ``"points"``.
    key
        The element name asked for, or None to pick one.
    default
        The name used when ``key`` is None and an element of that name exists.

    Returns
    -------
    str
        The name of an existing element of ``kind``.
    """
    elements = getattr(sdata, kind)
    what = _KINDS[kind]
    if key is not None:
        if key not in elements:
            raise InvalidInputError(f"No {what} element {key!r} in the SpatialData; it has {sorted(elements)}.")
        return key
    if default is not None and default in elements:
        return default
    if len(elements) == 1:
        return next(iter(elements))
    if not elements:
        raise InvalidInputError(f"The SpatialData has no {what} element.")
    raise InvalidInputError(
        f"Several {what} elements {sorted(elements)} and none is called {default!r}: pass the key explicitly"
        f"{_PARAMETERS.get(kind, '')}."
    )


# Which argument names an element of each kind, and how the package's readers name them (spatialdata-io names them after the dataset).
_PARAMETERS = {
    "images": " (image_key=; hc.io.read_visium names the full-resolution H&E 'he')",
    "shapes": " (spots_key= or nuclei_key=; hc.io.read_visium names the spot circles 'spots')",
    "tables": " (spots_table_key= or nuclei_table_key=; hc.io.read_visium names the spots table 'table')",
}


def get_mpp(sdata: SpatialData) -> float:
    """Microns per pixel of the sample's ``global`` coordinate system (``sdata.attrs["mpp"]``).

    Parameters
    ----------
    sdata
        The sample; reads ``sdata.attrs["mpp"]``.

    Returns
    -------
    float
        The µm per pixel, checked (a number in the open range 0.01–100).
    """
    if not isinstance(sdata, SpatialData):
        raise InvalidInputError(f"Expected a SpatialData sample, got {type(sdata).__name__}.")
    mpp = sdata.attrs.get("mpp")
    if mpp is None:
        systems = set(sdata.coordinate_systems)
        if systems and COORDINATE_SYSTEM not in systems:  # e.g. spatialdata_io.visium: one system per dataset, no "global"
            raise InvalidInputError(
                f"The SpatialData has no 'mpp' (µm per pixel) in sdata.attrs and no {COORDINATE_SYSTEM!r} coordinate system "
                f"(it has {sorted(systems)}), as a reader other than histocell-sd's makes it: read the Space Ranger folder with "
                "hc.io.read_visium (or read_visium_hd), which puts the full-resolution H&E in 'global' and sets mpp."
            )
        raise InvalidInputError(
            "The SpatialData has no 'mpp' (µm per pixel) in sdata.attrs; set it, e.g. sdata.attrs['mpp'] = 0.5."
        )
    return check_mpp(mpp)


MPP_RANGE = (0.01, 100.0)
"""Plausible µm per pixel of an H&E image (exclusive bounds): 40× scans are ~0.25, thumbnails a few µm/px."""


def check_mpp(mpp) -> float:
    """Return ``mpp`` as a float, refusing missing, non-numeric (bool, str), non-finite, non-positive values
    and values outside :data:`MPP_RANGE`."""
    if isinstance(mpp, (bool, str, bytes)) or getattr(getattr(mpp, "dtype", None), "kind", "") == "b":
        raise InvalidInputError(f"mpp (µm per pixel) must be a positive number, got {mpp!r}.")
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        raise InvalidInputError(f"mpp (µm per pixel) must be a positive number, got {mpp!r}.") from None
    if not math.isfinite(value) or value <= 0:
        raise InvalidInputError(f"mpp (µm per pixel) must be a positive number, got {mpp!r}.")
    low, high = MPP_RANGE
    if not low < value < high:
        raise InvalidInputError(
            f"mpp (µm per pixel) {value:g} is outside the plausible range ({low:g}, {high:g}) for an H&E image; "
            "give µm per pixel (e.g. 0.25 at 40×, 0.5 at 20×), not pixels per µm, nm or a magnification."
        )
    return value


@inject_docs
def get_image(sdata: SpatialData, *, image_key: str | None = None):
    """The full-resolution level of the H&E as a lazy (c, y, x) ``xarray.DataArray``.

    Parameters
    ----------
    sdata
        The sample.
    {image_key}

    Returns
    -------
    xarray.DataArray
        The ``scale0`` level of a multiscale image (the image itself when single-scale), not loaded.
    """
    from .._constants import IMAGE_KEY

    key = resolve_key(sdata, "images", key=image_key, default=IMAGE_KEY)
    image = sdata.images[key]
    _check_at_origin(image, key)
    return image["scale0"].image if hasattr(image, "children") and "scale0" in image.children else image


def get_rgb_image(sdata: SpatialData, *, image_key: str | None = None):
    """:func:`get_image`, refused unless it is a colour H&E: (c, y, x) uint8, channels r, g, b.

    Channels named otherwise (``["b", "g", "r"]``) and an image whose stained pixels are all grey (r = g = b, a greyscale
    scan copied into three channels) are refused: the stain separation reads hematoxylin and eosin from colour.
    """
    from .._constants import IMAGE_KEY

    key = resolve_key(sdata, "images", key=image_key, default=IMAGE_KEY)
    level = get_image(sdata, image_key=key)
    names = [str(c).lower() for c in level.coords["c"].values] if "c" in level.coords else []
    if level.ndim != 3 or tuple(level.dims)[0] != "c" or level.shape[0] != 3:
        pick = " (select them, e.g. image.sel(c=['r', 'g', 'b']))" if {"r", "g", "b"} <= set(names) else ""
        raise InvalidInputError(f"Image {key!r} must be RGB with 3 channels (c, y, x){pick}; got dims {tuple(level.dims)}, "
                                f"shape {tuple(level.shape)}.")
    if level.dtype != np.uint8:
        raise InvalidInputError(f"Image {key!r} must be uint8 (0-255), got {level.dtype}: convert its pixels to 0-255 uint8 "
                                "(hc.io.from_arrays names the conversion for an array).")
    if names and not all(n.isdigit() for n in names) and names not in (["r", "g", "b"], ["red", "green", "blue"]):
        hint = ("an OpenCV array is b, g, r: reverse it with image[..., ::-1] before hc.io.from_arrays" if names == ["b", "g", "r"]
                else "name and order them r, g, b, or leave them unnamed")
        raise InvalidInputError(f"Image {key!r} has channels {names}; the data model needs them in the order r, g, b ({hint}).")
    refuse_grey(sdata.images[key], key)
    return level


_PADDING_MAX, _GLASS_MIN = 25, 220  # pixels darker than this in every channel are black padding, brighter glass


def tissue_pixels(rgb: np.ndarray, axis: int = -1) -> np.ndarray:
    """Which pixels of uint8 ``rgb`` (channels along ``axis``) are tissue: neither glass nor black scanner padding."""
    return (rgb.max(axis=axis) > _PADDING_MAX) & (rgb.min(axis=axis) < _GLASS_MIN)


_GREY_WINDOW_PX = 256  # side of each of the 3 × 3 windows of the full-resolution level looked at
_GREY_MIN_STAINED = 500  # fewer stained pixels than this in them: nothing to judge
_GREY_MIN_CONTRAST = 30  # stained pixels varying less in brightness are a featureless field (a placeholder)
_GREY_MAX_SPREAD = 3  # channel differences up to this (compression noise) count as grey
_GREY_MAX_COLOURED = 0.01  # at most this share of coloured stained pixels: greyscale


def refuse_grey(element, key: str) -> None:
    """Refuse an image whose stained pixels (neither glass nor black padding) are grey (r = g = b).

    Judged on a 3 × 3 grid of small windows of the full-resolution level, so that it reads a few chunks of a slide.
    """
    level = element["scale0"].image if hasattr(element, "children") else element
    h, w = level.shape[1:]
    side = min(_GREY_WINDOW_PX, h, w)
    windows = [np.asarray(level[:, y : y + side, x : x + side]).reshape(3, -1)
               for y in np.linspace(0, h - side, 3).astype(int) for x in np.linspace(0, w - side, 3).astype(int)]
    rgb = np.concatenate(windows, axis=1).astype(np.int16)
    stained = tissue_pixels(rgb, axis=0)
    if stained.sum() < _GREY_MIN_STAINED or np.ptp(rgb[:, stained].mean(axis=0)) < _GREY_MIN_CONTRAST:
        return  # too little tissue, or a featureless field: nothing to judge
    coloured = (rgb.max(axis=0) - rgb.min(axis=0))[stained] > _GREY_MAX_SPREAD
    if coloured.mean() <= _GREY_MAX_COLOURED:
        raise InvalidInputError(
            f"Image {key!r} is greyscale (r = g = b in {1 - coloured.mean():.1%} of the stained pixels): H&E colour is needed, as "
            "hematoxylin and eosin are told apart by colour. Was the image converted to grey, or a single channel copied three times?"
        )


def global_matrix(element) -> np.ndarray | None:
    """The element's (x, y) affine matrix to ``global`` (the identity when its coordinates are the pixels); None when not in ``global``."""
    systems = get_transformation(element, get_all=True)
    if COORDINATE_SYSTEM not in systems:
        return None
    return systems[COORDINATE_SYSTEM].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))


def check_in_global(sdata: SpatialData, key: str, why: str) -> None:
    """Refuse element ``key`` when it is not in the ``global`` coordinate system; ``why`` says what needs it."""
    systems = sorted(get_transformation(sdata[key], get_all=True))
    if COORDINATE_SYSTEM not in systems:
        raise InvalidInputError(f"Element {key!r} is not in the {COORDINATE_SYSTEM!r} coordinate system (it has {systems}); {why}")


def _check_at_origin(image, key: str) -> None:
    """Refuse an image whose pixels are not the ``global`` units (a translated crop, a scaled copy, another system)."""
    matrix = global_matrix(image)
    if matrix is None:
        raise InvalidInputError(
            f"Image {key!r} is not in the {COORDINATE_SYSTEM!r} coordinate system (it has {sorted(get_transformation(image, get_all=True))}): "
            "read the sample with hc.io.read_visium / read_zarr, or build it with hc.io.from_arrays, so that 'global' is its full-resolution pixels."
        )
    if not np.allclose(matrix, np.eye(3)):
        raise InvalidInputError(
            f"Image {key!r} is placed in {COORDINATE_SYSTEM!r} with an offset or scale (x, y offset {matrix[0, 2]:g}, {matrix[1, 2]:g}; "
            f"scale {matrix[0, 0]:g}, {matrix[1, 1]:g}), so its pixels "
            "are not the sample's coordinates (a bounding_box_query crop, a downsampled copy): nuclei and crops would be misplaced. "
            "Segment and predict on the full image and crop afterwards, or make the crop a sample of its own with hc.io.from_arrays."
        )


def segmented_image_key(sdata: SpatialData, table, image_key: str | None = None) -> str | None:
    """``image_key``, else the image the nuclei of ``table`` were segmented on when recorded and still there, else None."""
    if image_key is None:
        recorded = table.uns.get(HISTOCELL_KEY, {}).get("image_key")
        image_key = recorded if recorded in sdata.images else None
    return image_key


def annotated_regions(table) -> list[str]:
    """The names of the elements ``table`` annotates (``uns["spatialdata_attrs"]``); empty when it annotates none."""
    if "spatialdata_attrs" not in table.uns:
        return []
    region = get_table_keys(table)[0]
    return [region] if isinstance(region, str) else list(region)


def annotated_shapes(sdata: SpatialData, nuclei_table_key: str, nuclei_key: str | None = None) -> str:
    """The nucleus polygons of ``nuclei_table_key``: ``nuclei_key`` when given (the table must annotate it), else the
    shapes element the table annotates."""
    regions = annotated_regions(sdata.tables[nuclei_table_key])
    if not regions:
        raise InvalidInputError(f"The nuclei table {nuclei_table_key!r} annotates no element (no uns['spatialdata_attrs']).")
    if nuclei_key is None:
        if len(regions) != 1 or regions[0] not in sdata.shapes:
            raise InvalidInputError(
                f"The nuclei table {nuclei_table_key!r} annotates {regions}, not one shapes element of the sample "
                f"(shapes: {sorted(sdata.shapes)}); pass nuclei_key=."
            )
        return regions[0]
    if nuclei_key not in sdata.shapes:
        raise InvalidInputError(f"The SpatialData has no nuclei shapes {nuclei_key!r} (shapes: {sorted(sdata.shapes)}).")
    if regions != [nuclei_key]:
        raise InvalidInputError(f"The nuclei table {nuclei_table_key!r} annotates {regions}, not the shapes {nuclei_key!r}.")
    return nuclei_key


def pixel_transformations(mpp: float, *, origin: tuple[float, float] = (0.0, 0.0)) -> dict:
    """Transformations of an element in image pixels: ``global`` (pixels, shifted by ``origin`` = (y0, x0)) and
    ``um`` (the same scaled by ``mpp``, so queries, plots and distances can work in µm)."""
    y0, x0 = (float(v) for v in origin)
    to_pixels = Identity() if (x0, y0) == (0.0, 0.0) else Translation([x0, y0], axes=("x", "y"))
    to_um = Scale([float(mpp), float(mpp)], axes=("x", "y"))
    return {COORDINATE_SYSTEM: to_pixels, MICRON_SYSTEM: to_um if isinstance(to_pixels, Identity) else Sequence([to_pixels, to_um])}


def add_micron_system(sdata: SpatialData, mpp: float) -> None:
    """Give every element in ``global`` (pixels) the ``um`` system too: its global transformation, then × ``mpp``."""
    scale = Scale([float(mpp), float(mpp)], axes=("x", "y"))
    for _, _, element in sdata.gen_spatial_elements():
        systems = get_transformation(element, get_all=True)
        if COORDINATE_SYSTEM in systems:
            to_pixels = systems[COORDINATE_SYSTEM]
            set_transformation(element, scale if isinstance(to_pixels, Identity) else Sequence([to_pixels, scale]), to_coordinate_system=MICRON_SYSTEM)
