"""Turn an instance label raster into nucleus polygons and a feature table (the data model).

Every pixel statistic is accumulated with :func:`numpy.bincount` over bands of rows, so the
cost is a few passes over the raster whatever the number of nuclei, and the stain densities
are never held for the whole image at once.

Coordinates follow the ``global`` system: pixel ``(row, col)`` covers ``[col, col + 1) ×
[row, row + 1)``, so a centroid or contour vertex at array index ``(r, c)`` is stored at
``(x, y) = (c + 0.5, r + 0.5)`` (plus the window ``offset``).
"""

from __future__ import annotations

import logging
import warnings

import anndata as ad
import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from scipy import ndimage as ndi
from skimage.color import rgb2hed
from skimage.measure import find_contours
from skimage.measure import label as label_regions
from spatialdata import SpatialData
from spatialdata.models import Labels2DModel, ShapesModel, get_table_keys
from spatialdata.transformations import get_transformation

from .._constants import (
    HISTOCELL_KEY,
    IMAGE_KEY,
    NUCLEI_KEY,
    NUCLEUS_ID_KEY,
    SPOTS_KEY,
)
from .._docs import inject_docs
from .._errors import InvalidInputError
from .._utils import user_stacklevel
from ._elements import annotated_regions, get_mpp, get_rgb_image, global_matrix, pixel_transformations, resolve_key, tissue_pixels
from ._schema import NucleiTableModel, merge_metadata
from ._spots import annotated_spots, spot_geometry, spot_ids_of_points

__all__ = ["FEATURES", "store_nuclei"]

logger = logging.getLogger(__name__)

FEATURES = {
    "area_um2": "pixel count × mpp²",
    "perimeter_um": "length of the (simplified) contour polygon",
    "eccentricity": "of the ellipse with the same second moments (0 = circle)",
    "solidity": "polygon area / convex hull area",
    "major_axis_um": "major axis length of the same-moments ellipse (4·sqrt(λ1))",
    "minor_axis_um": "minor axis length of the same-moments ellipse (4·sqrt(λ2))",
    "orientation": "angle (rad, in (-π/2, π/2]) of the major axis to the image rows, as skimage",
    "h_mean": "mean hematoxylin optical density (skimage.color.rgb2hed)",
    "h_std": "standard deviation of the hematoxylin density",
    "e_mean": "mean eosin optical density",
    "e_std": "standard deviation of the eosin density",
    "h_contrast": "mean squared hematoxylin difference of pixel pairs 0.5 µm apart (row or column) inside the nucleus (GLCM contrast)",
    "h_entropy": "Shannon entropy (bits) of the hematoxylin histogram (32 bins over [0, 0.4])",
    "h_skewness": "skewness of the hematoxylin density",
}
"""Morphology features stored in the nucleus table's ``X``, in this order, with their definition."""

_BAND_ROWS = 512
_ENTROPY_BINS = 32
_ENTROPY_MAX = 0.4
_SIMPLIFY_UM = 0.25  # contour simplification tolerance (half a pixel at 0.5 µm/px)
_PAIR_UM = 0.5  # distance of the pixel pairs of h_contrast (one pixel at 0.5 µm/px)
_MIN_VARIANCE = 1e-8  # below this the hematoxylin is flat (rounding noise) and skewness is 0
_SIZE_MIN_NUCLEI = 30  # fewer nuclei: too few to judge their typical size
_SIZE_RANGE_UM2 = (12.0, 100.0)  # a median nucleus area outside: the declared µm/px is likely wrong
_REGISTRATION_MIN_NUCLEI = 20  # fewer nuclei: too few to judge whether they lie on the image's nuclei
_REGISTRATION_MIN_RATIO = 1.4  # median nucleus / outside tissue hematoxylin below this: the nuclei miss the image's nuclei
MIN_PART_UM2 = 4.0  # a separate part of a label id at least this large is a nucleus of its own; smaller ones are fragments


@inject_docs
def store_nuclei(
    sdata: SpatialData,
    labels,
    *,
    offset: tuple[int, int] = (0, 0),
    image_key: str | None = None,
    spots_key: str | None = None,
    key_added: str = NUCLEI_KEY,
    nuclei_table_key: str = HISTOCELL_KEY,
    labels_key: str | None = None,
    method: str = "external",
    overwrite: bool = False,
    origin: tuple[int, int] | None = None,
) -> None:
    """Store an instance label raster as nucleus polygons and their feature table.

    Parameters
    ----------
    sdata
        The sample; needs ``sdata.attrs["mpp"]`` and the H&E image.
    labels
        Integer label raster (numpy or dask), 0 = background, one positive id per nucleus, in
        pixels of the full-resolution image. It may cover only a window of the image.
    offset
        ``(x, y)``: the full-resolution image pixel of ``labels[0, 0]`` (as in :func:`~histocell_sd.io.read_nuclei`).
    {image_key}
    spots_key
        Name of the spot circles or squares (``sdata.shapes``; read) used for ``obs["spot_id"]``. None: ``"spots"``
        when present, else the circles or squares the spots table ``"table"`` annotates, else none.
    {key_added}
        the nucleus polygons (``sdata.shapes``).
    {nuclei_table_key:written}
    {labels_key}
    method
        Recorded in ``table.uns["histocell"]["method"]``.
    overwrite
        Replace elements under these names that an earlier segmentation did not write (refused otherwise;
        nuclei this package stored there before are always replaced).
    origin
        Deprecated: the same position as ``(y, x)``; use ``offset=(x, y)``.

    Returns
    -------
    None
        Writes the elements described in the Notes into ``sdata``.

    Notes
    -----
    Writes ``sdata.shapes[key_added]`` (polygons indexed ``"nucleus_<id>"``, ``<id>`` the label
    value, in ``global`` pixels, simplified to ~1 px) and ``sdata.tables[nuclei_table_key]`` with
    ``obs`` ``region``, ``nucleus_id`` and ``spot_id`` (when spots exist; NaN outside every
    spot), ``obsm["spatial"]`` (centroids, px), the features of :data:`FEATURES` in ``X`` and
    ``uns["histocell"]`` (mpp, method, feature definitions). A nucleus is one 8-connected region: an id
    covering several (a binary mask, tiles stitched with ids restarting at 1) keeps its largest part, other
    parts of at least 4 µm² get new ids (with a warning) and smaller fragments are dropped. Nuclei hardly darker in
    hematoxylin than the tissue around them (a transposed, flipped or shifted mask, or another image's) give a
    warning, as does a median nucleus area outside 12–100 µm² (a wrong ``mpp``). With no nucleus in ``labels``
    nothing is written (a SpatialData shapes element cannot be empty) and elements left under
    these keys by an earlier run are removed; callers warn.
    """
    write_nuclei(sdata, labels, origin=_window_origin(offset, origin), image_key=image_key, spots_key=spots_key, key_added=key_added,
                 nuclei_table_key=nuclei_table_key, labels_key=labels_key, method=method, overwrite=overwrite)


def write_nuclei(sdata: SpatialData, labels, *, origin: tuple[int, int], image_key: str | None, spots_key: str | None, key_added: str,
                 nuclei_table_key: str, labels_key: str | None, method: str, overwrite: bool, connected: bool = False,
                 segmented_here: bool = False) -> None:
    """:func:`store_nuclei` with the window's ``origin`` as ``(y, x)``; ``connected`` skips the check that each id is one
    region (the built-in segmenters' watershed regions are; imported polygons were split already), ``segmented_here``
    the check that the nuclei lie over the image's nuclei (segmentation of this very image)."""
    mpp = get_mpp(sdata)
    image_key = resolve_key(sdata, "images", key=image_key, default=IMAGE_KEY)
    ours = claim_nuclei_keys(sdata, key_added, nuclei_table_key, labels_key, overwrite=overwrite)
    stale = _stale_regions(sdata, nuclei_table_key if nuclei_table_key in ours else None)
    image = get_rgb_image(sdata, image_key=image_key)
    labels, origin = _check_labels(labels, origin, image.shape[1:])
    if not connected:
        labels = split_disconnected(labels, min_part_px=MIN_PART_UM2 / mpp**2)
    spots_key = spots_for_nuclei(sdata, spots_key, nuclei_key=key_added)
    spots = None if spots_key is None else sdata.shapes[spots_key]
    ids = np.unique(labels)
    ids = ids[ids > 0]
    if len(ids) == 0:
        _remove_with_regions(sdata, ours, stale)  # an earlier segmentation's nuclei would no longer describe this image
        return
    stats = _pixel_stats(labels, image, origin, ids, pair_px=max(1, round(_PAIR_UM / mpp)))
    if not segmented_here:
        warn_if_unregistered(stats, image_key)
    polygons = _polygons(labels, ids, origin, tolerance_px=_SIMPLIFY_UM / mpp)
    features = _features(stats, polygons, mpp)
    warn_if_implausible_size(features["area_um2"].to_numpy(), mpp)
    centroids = stats["centroid"][:, ::-1] + np.asarray(origin[::-1], dtype=float) + 0.5
    names = pd.Index([f"nucleus_{i}" for i in ids], name=NUCLEUS_ID_KEY)
    spot_ids = None if spots is None else _as_table_rows(sdata, spots_key, _spot_ids(spots, centroids))
    table = _table(features, centroids, names, spot_ids, key_added, mpp, method)
    merge_metadata(table, labels_key=labels_key, image_key=image_key)
    _remove_with_regions(sdata, ours, stale)
    sdata.shapes[key_added] = _shapes_element(polygons, names, mpp)
    sdata.tables[nuclei_table_key] = table
    if labels_key is not None:
        sdata.labels[labels_key] = Labels2DModel.parse(
            labels, dims=("y", "x"), transformations=pixel_transformations(mpp, origin=origin)
        )


def claim_nuclei_keys(sdata: SpatialData, key_added: str, nuclei_table_key: str, labels_key: str | None, *, overwrite: bool = False) -> set[str]:
    """Check that nuclei may be written under these names; return the elements an earlier segmentation wrote there.

    Refuses names that coincide, and names of elements that segmentation did not write (the spots, the spots
    table, an image...) unless ``overwrite``.
    """
    keys = [k for k in (key_added, nuclei_table_key, labels_key) if k is not None]
    if len(set(keys)) != len(keys):
        raise InvalidInputError(f"key_added, nuclei_table_key and labels_key must differ, got {keys}.")
    ours: set[str] = set()
    table = sdata.tables.get(nuclei_table_key)
    meta = table.uns.get("histocell", {}) if table is not None else {}
    if table is not None and "features" in meta and "spatialdata_attrs" in table.uns and get_table_keys(table)[0] == key_added:
        ours = {nuclei_table_key} | ({key_added} if key_added in sdata.shapes else set()) | ({meta["labels_key"]} if meta.get("labels_key") in sdata.labels else set())
    clash = [k for k in keys if k in sdata and k not in ours]
    regions = annotated_regions(table) if table is not None and "features" in meta else []
    if clash and not overwrite and regions and regions != [key_added]:
        raise InvalidInputError(
            f"Table {nuclei_table_key!r} holds the nuclei of the shapes {regions}, not {key_added!r}: pass "
            f"key_added={regions[0]!r} to replace that segmentation, other names to keep it, or overwrite=True."
        )
    if clash and not overwrite:
        names = "key_added=, nuclei_table_key=" + (", labels_key=" if labels_key is not None else "")
        raise InvalidInputError(
            f"{clash} already exist in the SpatialData and were not written by a segmentation; pick other names "
            f"({names}) or pass overwrite=True to replace them."
        )
    return ours | set(clash)


def _stale_regions(sdata: SpatialData, nuclei_table_key: str | None) -> set[str]:
    """The niche regions (shapes) tl.tissue_architecture drew from the nuclei of ``nuclei_table_key``."""
    if nuclei_table_key is None:
        return set()
    uns = sdata.tables[nuclei_table_key].uns
    return {f"{k}_regions" for k, v in uns.items() if isinstance(v, dict) and "composition" in v and f"{k}_regions" in sdata.shapes}


def _remove_with_regions(sdata: SpatialData, nuclei: set[str], regions: set[str]) -> None:
    """Delete an earlier segmentation's elements and the niche regions drawn from them (with a warning)."""
    if regions:
        warnings.warn(f"Removed the niche regions {sorted(regions)}, drawn from the nuclei replaced; run tl.tissue_architecture again.",
                      UserWarning, stacklevel=4)
    _remove(sdata, *nuclei, *regions)


def _remove(sdata: SpatialData, *keys: str | None) -> None:
    """Delete the elements named ``keys`` (None skipped) from ``sdata`` when present."""
    for key in keys:
        if key is not None and key in sdata:
            del sdata[key]


def _window_origin(offset, origin) -> tuple:
    """``(y0, x0)`` of the label window from ``offset=(x, y)`` or the deprecated ``origin=(y, x)``."""
    try:
        x0, y0 = offset
    except (TypeError, ValueError):
        raise InvalidInputError(f"offset must be (x, y) in image pixels, got {offset!r}.") from None
    if origin is None:
        return y0, x0
    if (x0, y0) != (0, 0):
        raise InvalidInputError("Give offset=(x, y) or the deprecated origin=(y, x), not both.")
    warnings.warn("store_nuclei(origin=(y, x)) is deprecated; use offset=(x, y), the order of read_nuclei.", FutureWarning, stacklevel=3)
    return origin


def _check_labels(labels, origin, image_shape) -> tuple[np.ndarray, tuple[int, int]]:
    """The raster as a 2-D integer numpy array inside the image, and ``origin`` as ints."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise InvalidInputError(f"labels must be a 2-D integer raster, got shape {labels.shape} and dtype {labels.dtype}.")
    y0, x0 = (int(v) for v in origin)
    if y0 < 0 or x0 < 0 or y0 + labels.shape[0] > image_shape[0] or x0 + labels.shape[1] > image_shape[1]:
        raise InvalidInputError(
            f"labels of shape {labels.shape} at origin {(y0, x0)} fall outside the image of shape {tuple(image_shape)}."
        )
    if labels.min(initial=0) < 0:
        raise InvalidInputError("labels must not be negative (0 is background).")
    return labels, (y0, x0)


def _pixel_stats(labels: np.ndarray, image, origin: tuple[int, int], ids: np.ndarray, pair_px: int = 1) -> dict[str, np.ndarray]:
    """Per-nucleus sums (moments, stain densities, histogram, contrast of pixel pairs ``pair_px`` apart), band by band."""
    n = len(ids)
    lut = np.zeros(int(labels.max(initial=0)) + 1, dtype=np.int64)
    lut[ids] = np.arange(1, n + 1)
    acc = {k: np.zeros(n + 1) for k in ("n", "y", "x", "yy", "xx", "xy", "h", "hh", "hhh", "e", "ee", "dh2", "pairs")}
    acc["hist"] = np.zeros((n + 1) * _ENTROPY_BINS)
    y0, x0 = origin
    height, width = labels.shape
    for r0 in range(0, height, _BAND_ROWS) if n else ():
        r1 = min(r0 + _BAND_ROWS, height)
        r_ext = min(r1 + pair_px, height)  # extra rows for vertical pixel pairs
        lab = lut[labels[r0:r_ext]]
        rgb = np.asarray(image[:, y0 + r0 : y0 + r_ext, x0 : x0 + width]).transpose(1, 2, 0)
        hed = rgb2hed(rgb).astype(np.float32)
        _accumulate_band(acc, lab, hed, r0, r1 - r0, n + 1, pair_px, tissue_pixels(rgb))
    return _finish_stats(acc, n)


def _accumulate_band(acc: dict, lab: np.ndarray, hed: np.ndarray, r0: int, rows: int, size: int, d: int, tissue: np.ndarray) -> None:
    """Add the sums of one band (its first ``rows`` rows; ``d`` more rows only for vertical pairs ``d`` apart).

    Row 0 of ``n`` and ``h`` sums the ``tissue`` pixels outside every nucleus (neither glass nor black padding)."""
    core, h_full = lab[:rows], hed[..., 0]
    mask = core > 0
    lid = core[mask]
    yy, xx = np.nonzero(mask)
    yy = yy.astype(np.float64) + r0
    xx = xx.astype(np.float64)
    h, e = h_full[:rows][mask].astype(np.float64), hed[:rows, :, 1][mask].astype(np.float64)
    outside = tissue[:rows] & ~mask
    acc["n"][0] += outside.sum()
    acc["h"][0] += float(h_full[:rows][outside].sum(dtype=np.float64))

    def add(key, weights=None):
        acc[key] += np.bincount(lid, weights, minlength=size)

    add("n")
    for key, w in (("y", yy), ("x", xx), ("yy", yy * yy), ("xx", xx * xx), ("xy", xx * yy),
                   ("h", h), ("hh", h * h), ("hhh", h * h * h), ("e", e), ("ee", e * e)):
        add(key, w)
    bins = np.clip((h / _ENTROPY_MAX * _ENTROPY_BINS).astype(np.int64), 0, _ENTROPY_BINS - 1)
    acc["hist"] += np.bincount(lid * _ENTROPY_BINS + bins, minlength=size * _ENTROPY_BINS)
    for a, b, ha, hb in (
        (core[:, :-d], core[:, d:], h_full[:rows, :-d], h_full[:rows, d:]),
        (lab[:-d][:rows], lab[d:][:rows], h_full[:-d][:rows], h_full[d:][:rows]),
    ):
        same = (a == b) & (a > 0)
        acc["dh2"] += np.bincount(a[same], (ha[same].astype(np.float64) - hb[same]) ** 2, minlength=size)
        acc["pairs"] += np.bincount(a[same], minlength=size)


def _finish_stats(acc: dict, n: int) -> dict[str, np.ndarray]:
    """Means, central moments and histogram entropy from the accumulated sums (row 0 dropped)."""
    outside_h = acc["h"][0] / max(acc["n"][0], 1)
    a = {k: v[1:] if k != "hist" else v.reshape(n + 1, _ENTROPY_BINS)[1:] for k, v in acc.items()}
    cnt = np.maximum(a["n"], 1)
    my, mx = a["y"] / cnt, a["x"] / cnt
    h_mean = a["h"] / cnt
    h_var = np.maximum(a["hh"] / cnt - h_mean**2, 0)
    h_m3 = a["hhh"] / cnt - 3 * h_mean * a["hh"] / cnt + 2 * h_mean**3
    e_mean = a["e"] / cnt
    p = a["hist"] / cnt[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = 0.0 - np.sum(np.where(p > 0, p * np.log2(p), 0.0), axis=1)
        skew = np.where(h_var > _MIN_VARIANCE, h_m3 / h_var**1.5, 0.0)
    return {
        "area_px": a["n"],
        "centroid": np.column_stack([my, mx]),
        "mu_yy": a["yy"] / cnt - my**2,
        "mu_xx": a["xx"] / cnt - mx**2,
        "mu_xy": a["xy"] / cnt - mx * my,
        "h_mean": h_mean,
        "h_std": np.sqrt(h_var),
        "e_mean": e_mean,
        "e_std": np.sqrt(np.maximum(a["ee"] / cnt - e_mean**2, 0)),
        "h_contrast": a["dh2"] / np.maximum(a["pairs"], 1),
        "h_entropy": entropy,
        "h_skewness": skew,
        "outside_h_mean": outside_h,
    }


def warn_if_implausible_size(area_um2: np.ndarray, mpp: float) -> None:
    """Warn when the median nucleus area is far from any H&E's at the declared µm/px (a 20x slide declared 40x, ...).

    On the vendored real patches the median is 17–35 µm² at their true µm/px, 7–14 µm² when half of it is declared
    and 36–97 µm² at double (the segmenters resample by the declared value, so sizes do not scale exactly).
    """
    if len(area_um2) < _SIZE_MIN_NUCLEI:
        return
    median = float(np.median(area_um2))
    if not _SIZE_RANGE_UM2[0] <= median <= _SIZE_RANGE_UM2[1]:
        warnings.warn(
            f"The median nucleus area is {median:.1f} µm² at the declared {mpp:g} µm/px; H&E nuclei are about 20–60 µm². "
            "Check sdata.attrs['mpp']: µm per pixel (about 0.25 at 40x, 0.5 at 20x), not pixels per µm; for imported "
            "outlines also read_nuclei's scale= and that they outline nuclei, not whole cells.",
            stacklevel=user_stacklevel(),
        )


def warn_if_unregistered(stats: dict, image_key: str) -> None:
    """Warn when the nuclei are no darker in hematoxylin than the tissue around them: they miss the image's nuclei.

    The tissue is the window's pixels outside every nucleus, less glass and black padding. On the 15 NuCLS tiles the
    annotated nuclei have a median density 2.1–5.9 times its mean (2.2 with a black border, 1.6 when only a third of
    the nuclei are imported); transposed, flipped or shifted by 10 µm, the same masks give 0.5–1.3.
    """
    if len(stats["h_mean"]) < _REGISTRATION_MIN_NUCLEI or stats["outside_h_mean"] <= 0:
        return
    ratio = float(np.median(stats["h_mean"])) / stats["outside_h_mean"]
    if ratio < _REGISTRATION_MIN_RATIO:
        warnings.warn(
            f"The {len(stats['h_mean'])} nuclei are hardly darker in hematoxylin than the tissue around them in image {image_key!r} "
            f"(median density {np.median(stats['h_mean']):.3f} against {stats['outside_h_mean']:.3f} outside them, "
            f"ratio {ratio:.2f}; nuclei on their image give 2–6): they may not lie on its nuclei. Check that x and "
            "y are not swapped, the scale and offset, and that the mask or file belongs to this image.",
            stacklevel=user_stacklevel(),
        )


def split_disconnected(labels: np.ndarray, min_part_px: float) -> np.ndarray:
    """``labels`` with one connected region (8-connected) per id: the largest part of a split id keeps it, other parts
    of at least ``min_part_px`` pixels get new ids (after the largest id, in raster order) and smaller fragments become
    background. An int32 copy when anything changes, ``labels`` itself otherwise.

    A binary mask (one id for every nucleus) and tiles stitched with ids restarting at 1 are the usual sources; a
    warning says how many ids were split.
    """
    if not _has_split_ids(labels):
        return labels
    parts = label_regions(labels, background=0, connectivity=2)  # one id per connected region of equal values
    n_parts = int(parts.max())
    owner = np.zeros(n_parts + 1, dtype=np.int64)
    owner[parts.ravel()] = labels.ravel()
    sizes = np.bincount(parts.ravel(), minlength=n_parts + 1)
    order = np.lexsort((-sizes[1:], owner[1:])) + 1  # by id, largest part first
    largest = np.zeros(n_parts + 1, dtype=bool)
    largest[order[np.r_[True, owner[order[1:]] != owner[order[:-1]]]]] = True
    extra = np.flatnonzero(~largest[1:]) + 1  # raster order
    kept = extra[sizes[extra] >= min_part_px]
    first_new = int(labels.max()) + 1
    if first_new + len(kept) - 1 > np.iinfo(np.int32).max:
        raise InvalidInputError("Splitting label ids that cover several separate regions would need ids beyond the int32 range; relabel the mask.")
    lut = owner.copy()
    lut[extra] = 0
    lut[kept] = np.arange(first_new, first_new + len(kept))
    out = lut.astype(np.int32)[parts]
    fragments = len(extra) - len(kept)
    if len(kept):
        split = np.unique(owner[kept])
        warnings.warn(
            f"{len(split)} label ids cover several separate regions (e.g. ids {split[:3].tolist()}): {len(kept)} regions became "
            f"nuclei of their own, with new ids{f', and {fragments} fragments were dropped' if fragments else ''}. A nucleus is "
            "one connected region; a binary mask needs labelling first (skimage.measure.label).",
            stacklevel=user_stacklevel(),
        )
    elif fragments:
        logger.info("Dropped %d fragments lying apart from the rest of their label id.", fragments)
    return out


def _has_split_ids(labels: np.ndarray) -> bool:
    """Does some id cover several 8-connected regions? Checked id by id over their boxes while that stays cheap."""
    eight = np.ones((3, 3), dtype=bool)
    budget = 4 * labels.size  # boxes as large as the image (a binary mask, stitched tiles): label once instead
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        budget -= (sl[0].stop - sl[0].start) * (sl[1].stop - sl[1].start)
        if budget < 0:
            return True
        if ndi.label(labels[sl] == i, structure=eight)[1] > 1:
            return True
    return False


def _polygons(labels: np.ndarray, ids: np.ndarray, origin: tuple[int, int], tolerance_px: float = 0.5) -> np.ndarray:
    """One polygon per id (outer contour of its largest part, simplified within ``tolerance_px``), in global pixels."""
    slices = ndi.find_objects(labels)
    offset = np.asarray(origin, dtype=float) + 0.5
    out = np.empty(len(ids), dtype=object)
    for k, i in enumerate(ids):
        sl = slices[i - 1]
        crop = np.pad(labels[sl] == i, 1).astype(np.uint8)
        contours = find_contours(crop, 0.5)
        ring = max(contours, key=len)
        yx = ring + np.array([sl[0].start, sl[1].start]) - 1 + offset
        out[k] = yx[:, ::-1]
    if not len(ids):
        return out
    polys = shapely.polygons([shapely.linearrings(c) if len(c) >= 4 else _square(c) for c in out])
    return shapely.simplify(polys, tolerance_px, preserve_topology=True)


def _square(xy: np.ndarray):
    """A one-pixel square ring around a degenerate contour (a single-pixel nucleus)."""
    cx, cy = xy.mean(axis=0)
    return shapely.linearrings([[cx - 0.5, cy - 0.5], [cx + 0.5, cy - 0.5], [cx + 0.5, cy + 0.5], [cx - 0.5, cy + 0.5]])


def _features(stats: dict, polygons: np.ndarray, mpp: float) -> pd.DataFrame:
    """The :data:`FEATURES` table (µm units where a length or area)."""
    a, b, c = stats["mu_yy"], stats["mu_xy"], stats["mu_xx"]
    half_diff = np.sqrt(((a - c) / 2) ** 2 + b**2)
    l1, l2 = (a + c) / 2 + half_diff, np.maximum((a + c) / 2 - half_diff, 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ecc = np.where(l1 > 0, np.sqrt(np.maximum(1 - l2 / l1, 0)), 0.0)
        hull = shapely.area(shapely.convex_hull(polygons)) if len(polygons) else np.zeros(0)
        solidity = np.where(hull > 0, shapely.area(polygons) / hull, 1.0) if len(polygons) else hull
    feats = {
        "area_um2": stats["area_px"] * mpp**2,
        "perimeter_um": (shapely.length(polygons) if len(polygons) else np.zeros(0)) * mpp,
        "eccentricity": ecc,
        "solidity": np.minimum(solidity, 1.0),
        "major_axis_um": 4 * np.sqrt(l1) * mpp,
        "minor_axis_um": 4 * np.sqrt(l2) * mpp,
        "orientation": _orientation(a, b, c),
    } | {k: stats[k] for k in ("h_mean", "h_std", "e_mean", "e_std", "h_contrast", "h_entropy", "h_skewness")}
    return pd.DataFrame({k: np.asarray(feats[k], dtype=np.float32) for k in FEATURES})


def _orientation(mu_rr, mu_rc, mu_cc) -> np.ndarray:
    """Major-axis angle as :func:`skimage.measure.regionprops` ``orientation`` defines it.

    skimage's inertia tensor is ``[[mu_cc, -mu_rc], [-mu_rc, mu_rr]]`` and its orientation
    ``0.5 * atan2(-2 * T01, T11 - T00)``, i.e. ``0.5 * atan2(2 * mu_rc, mu_rr - mu_cc)``; equal
    variances give ``π/4`` when ``mu_rc > 0`` and ``-π/4`` otherwise.
    """
    return np.where(mu_rr - mu_cc == 0, np.where(mu_rc > 0, np.pi / 4, -np.pi / 4),
                    0.5 * np.arctan2(2 * mu_rc, mu_rr - mu_cc))


def _shapes_element(polygons: np.ndarray, names: pd.Index, mpp: float) -> gpd.GeoDataFrame:
    """The polygon shapes element."""
    gdf = gpd.GeoDataFrame(geometry=gpd.GeoSeries(list(polygons), index=names))
    return ShapesModel.parse(gdf, transformations=pixel_transformations(mpp))


NO_SPOTS = "<no spots>"  # spots_for_nuclei's answer when it found none, passed on so that it is not asked twice


def spots_for_nuclei(sdata: SpatialData, spots_key: str | None, *, nuclei_key: str) -> str | None:
    """The shapes whose spots give nuclei ``obs["spot_id"]``: ``spots_key``, ``"spots"``, else the circles or squares
    the spots table annotates; None without spots (a warning when tables annotate other shapes). Refuses anything
    but circles or squares in the pixels of ``global``."""
    if spots_key == NO_SPOTS:
        return None
    if spots_key is None and SPOTS_KEY not in sdata.shapes:
        spots_key = annotated_spots(sdata, exclude=(nuclei_key,))
        if spots_key is None:
            annotated = sorted({r for t in sdata.tables.values() for r in annotated_regions(t) if r in sdata.shapes and r != nuclei_key})
            if annotated:
                warnings.warn(
                    f"No spots named 'spots' nor annotated by a table 'table', so the nuclei get no obs['spot_id']; tables annotate "
                    f"the shapes {annotated}: pass spots_key= (circles with a 'radius' or squares with a 'side' column, as "
                    "hc.io.read_visium / read_visium_hd write them).", UserWarning, stacklevel=3,
                )
            return None
    key = resolve_key(sdata, "shapes", key=spots_key, default=SPOTS_KEY)
    spot_geometry(sdata.shapes[key], key)  # refuse anything but circles or squares before any work
    matrix = global_matrix(sdata.shapes[key])
    if matrix is None:
        raise InvalidInputError(f"Spots {key!r} are not in the 'global' coordinate system (they have "
                                f"{sorted(get_transformation(sdata.shapes[key], get_all=True))}); read the sample with "
                                "hc.io.read_visium, whose 'global' is the full-resolution pixels.")
    if not np.allclose(matrix, np.eye(3)):
        raise InvalidInputError(
            f"Spots {key!r} are placed in 'global' with a scale or offset (scale {matrix[0, 0]:g}, offset {matrix[0, 2]:g}, {matrix[1, 2]:g}), "
            "so their coordinates are not the image's pixels and nuclei would be assigned to the wrong spots; read the sample "
            "with hc.io.read_visium, which places the spots on the full-resolution image."
        )
    return key


def _as_table_rows(sdata: SpatialData, spots_key: str, spot_ids: pd.Series) -> pd.Series:
    """Spot ids as the row names of the table annotating the spots: spatialdata-io indexes its circles and squares by
    an integer instance id (``obs[instance_key]``) and names the table's rows by barcode."""
    for table in sdata.tables.values():
        if annotated_regions(table) != [spots_key]:
            continue
        instance_key = get_table_keys(table)[2]
        names = table.obs_names.astype(str)
        found = spot_ids.dropna()
        if instance_key not in table.obs or found.isin(names).all():
            return spot_ids
        lookup = pd.Series(names.to_numpy(), index=table.obs[instance_key].astype(str).to_numpy())
        if not lookup.index.is_unique:
            return spot_ids
        return spot_ids.map(lookup)  # ids absent from the table: NaN
    return spot_ids


def _spot_ids(spots, centroids: np.ndarray) -> pd.Series:
    """Barcode of the spot circle or square holding each centroid (NaN outside all)."""
    return spot_ids_of_points(spots, centroids)


def _table(features, centroids, names, spot_ids, region, mpp, method) -> ad.AnnData:
    """The nucleus table annotating ``region`` (:class:`~histocell_sd.io.NucleiTableModel`)."""
    adata = ad.AnnData(
        X=features.to_numpy(dtype=np.float32),
        obs=pd.DataFrame(index=names.astype(str).rename(None)),
        var=pd.DataFrame(index=list(FEATURES)),
        obsm={"spatial": np.asarray(centroids, dtype=np.float64).reshape(-1, 2)},
    )
    return NucleiTableModel.parse(adata, region=region, mpp=mpp, method=method, spot_ids=spot_ids, features=dict(FEATURES))
