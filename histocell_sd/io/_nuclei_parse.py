"""Parse nucleus polygons from HoVer-Net JSON and QuPath / GeoJSON files (see :func:`~histocell_sd.io.read_nuclei`)."""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field

import numpy as np

from .._errors import InvalidInputError
from .._utils import user_stacklevel

# Vertices may lie this far (px) beyond the image border (pixel-corner vertices, rounding).
BORDER_TOLERANCE_PX = 1.0
# Measurements named like this hold class probabilities (written by histocell_sd.io.write_geojson).
PROBA_PREFIX = "prob_"
_OUR_ID = re.compile(r"^nucleus_([1-9][0-9]{0,9})$")
_MAX_ID = 2**31 - 1


@dataclass
class Parsed:
    """Polygons (file coordinates, x/y columns) with their record names and optional classes.

    ``ids`` are the raster ids to give the polygons (None: 1 + position), ``colors`` the ``[r, g, b]`` of
    each record's class and ``proba`` each record's class probabilities (``{class: p}``), when the file has them.
    """

    polygons: list = field(default_factory=list)
    names: list = field(default_factory=list)
    types: list = field(default_factory=list)
    colors: list = field(default_factory=list)
    proba: list = field(default_factory=list)
    ids: list | None = None
    source: str = ""

    def subset(self, keep: np.ndarray) -> Parsed:
        """The records where ``keep`` is True, with the raster ids (names) they had in the whole file."""
        pick = [k for k in range(len(self.polygons)) if keep[k]]

        def take(values):
            return [values[k] for k in pick] if values else values

        ids = [k + 1 for k in pick] if self.ids is None else take(self.ids)
        return Parsed(take(self.polygons), take(self.names), take(self.types), take(self.colors), take(self.proba), ids, self.source)

    def position(self, raster_id: int) -> int | None:
        """The record index of the polygon rasterised with ``raster_id`` (None if no record has it)."""
        if self.ids is None:
            return raster_id - 1 if 1 <= raster_id <= len(self.polygons) else None
        if not hasattr(self, "_lookup"):
            self._lookup = {rid: k for k, rid in enumerate(self.ids)}
        return self._lookup.get(raster_id)


def _load_json(path, what: str):
    """Return ``(object, source description)`` for a JSON path or an already loaded object."""
    if isinstance(path, (str, os.PathLike)):
        source = f"{what} file {str(path)!r}"
        try:
            with open(path, encoding="utf-8") as fh:
                return json.load(fh), source
        except FileNotFoundError:
            raise InvalidInputError(f"{source} does not exist.") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InvalidInputError(f"{source} is not valid JSON: {err}.") from None
    return path, f"the {what} input"


def _as_polygon(coords, record: str, min_points: int = 3) -> np.ndarray:
    """An (n, 2) float array of x, y from nested lists, refusing malformed or degenerate contours."""
    try:
        poly = np.asarray(coords, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{record} has a malformed contour (not a list of [x, y] pairs).") from None
    if poly.ndim != 2 or poly.shape[1] < 2 or poly.shape[0] == 0:
        raise InvalidInputError(f"{record} has a malformed contour of shape {poly.shape}; expected [[x, y], ...].")
    poly = poly[:, :2]
    if not np.isfinite(poly).all():
        raise InvalidInputError(f"{record} has NaN or infinite contour coordinates.")
    if len(poly) > 1 and np.array_equal(poly[0], poly[-1]):
        poly = poly[:-1]  # closed ring
    if len(poly) < min_points:
        raise InvalidInputError(f"{record} has a contour with {len(poly)} points; a polygon needs at least 3.")
    return poly


def parse_hovernet(path) -> Parsed:
    data, source = _load_json(path, "HoVer-Net JSON")
    if not isinstance(data, dict) or "nuc" not in data:
        raise InvalidInputError(f"{source} has no 'nuc' key; expected HoVer-Net output {{'mag': ..., 'nuc': {{id: {{...}}}}}}.")
    nuc = data["nuc"]
    if isinstance(nuc, list):
        nuc = {str(i): rec for i, rec in enumerate(nuc)}
    if not isinstance(nuc, dict):
        raise InvalidInputError(f"{source}: 'nuc' must map nucleus ids to records, got {type(nuc).__name__}.")
    parsed = Parsed(source=source)
    for nid, rec in nuc.items():
        record = f"nucleus {nid!r} of {source}"
        if not isinstance(rec, dict):
            raise InvalidInputError(f"{record} is not a dict of 'bbox', 'centroid', 'contour', 'type' ...")
        if "contour" not in rec:
            raise InvalidInputError(f"{record} has no 'contour'.")
        parsed.polygons.append(_as_polygon(rec["contour"], record))
        parsed.names.append(str(nid))
        parsed.types.append(rec.get("type"))
    return parsed


def _geojson_features(data, source: str) -> list:
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        if data.get("type") == "FeatureCollection" or "features" in data:
            features = data.get("features")
            if not isinstance(features, list):
                raise InvalidInputError(f"{source}: 'features' must be a list.")
            return features
        if data.get("type") == "Feature":
            return [data]
    raise InvalidInputError(f"{source} is neither a GeoJSON FeatureCollection nor a list of Features.")


def ring_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _classification(props: dict):
    """``(name, [r, g, b] or None)`` of a QuPath classification (a dict or a bare name).

    A derived class (QuPath >= 0.4 writes ``"names": ["Tumor", "Positive"]``) is named as QuPath shows it,
    ``"Tumor: Positive"``; a colour may be ``[r, g, b]``, ``[r, g, b, a]`` or a packed ``colorRGB`` integer.
    """
    cls = props.get("classification")
    if isinstance(cls, dict):
        name = cls.get("name")
        names = cls.get("names")
        if name is None and isinstance(names, list) and names and all(isinstance(n, str) for n in names):
            name = ": ".join(names)
        color = cls.get("color")
        if isinstance(cls.get("colorRGB"), int) and color is None:
            packed = cls["colorRGB"]
            color = [(packed >> 16) & 255, (packed >> 8) & 255, packed & 255]
        ok = isinstance(color, list) and len(color) in (3, 4) and all(isinstance(c, int) and 0 <= c <= 255 for c in color)
        return name, (color[:3] if ok else None)
    if isinstance(cls, str):
        return cls, None
    return None, None


def _probabilities(props: dict) -> dict | None:
    """The ``prob_<class>`` measurements (QuPath >= 0.4 writes a dict, 0.2-0.3 a list of name/value pairs)."""
    meas = props.get("measurements")
    if isinstance(meas, list):
        meas = {m.get("name"): m.get("value") for m in meas if isinstance(m, dict)}
    if not isinstance(meas, dict):
        return None
    out = {
        str(k)[len(PROBA_PREFIX):]: float(v) for k, v in meas.items()
        if str(k).startswith(PROBA_PREFIX) and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    return out or None


def _our_id(feat: dict, props: dict) -> int | None:
    """The nucleus id of a feature written by :func:`~histocell_sd.io.write_geojson` (``"nucleus_<id>"``).

    Read from the feature's ``id`` or, after a pass through QuPath (which replaces ids by UUIDs), its ``name``.
    """
    for value in (feat.get("id"), props.get("name")):
        match = _OUR_ID.match(value) if isinstance(value, str) else None
        if match and int(match[1]) <= _MAX_ID:
            return int(match[1])
    return None


def parse_geojson(path) -> Parsed:
    data, source = _load_json(path, "GeoJSON")
    features = _geojson_features(data, source)
    object_types = [
        (f.get("properties") or {}).get("objectType") if isinstance(f, dict) else None for f in features
    ]
    skip_annotations = "annotation" in object_types and any(t not in (None, "annotation") for t in object_types)
    parsed = Parsed(source=source)
    ids = []
    for i, feat in enumerate(features):
        if not isinstance(feat, dict):
            raise InvalidInputError(f"feature {i} of {source} is not a GeoJSON Feature object.")
        fid = feat.get("id")
        record = f"feature {i}" + (f" (id {fid!r})" if fid is not None else "") + f" of {source}"
        props = feat.get("properties") or {}
        if skip_annotations and props.get("objectType") == "annotation":
            continue
        geometry = feat.get("nucleusGeometry") or feat.get("geometry")
        if not isinstance(geometry, dict) or "type" not in geometry:
            raise InvalidInputError(f"{record} has no geometry.")
        kind, coords = geometry["type"], geometry.get("coordinates")
        if kind == "Polygon":
            if not isinstance(coords, list) or not coords:
                raise InvalidInputError(f"{record} has an empty Polygon.")
            poly = _as_polygon(coords[0], record)  # exterior ring; holes are filled
        elif kind == "MultiPolygon":
            if not isinstance(coords, list) or not coords:
                raise InvalidInputError(f"{record} has an empty MultiPolygon.")
            parts = [_as_polygon(part[0] if isinstance(part, list) and part else part, record) for part in coords]
            poly = max(parts, key=ring_area)
        else:
            raise InvalidInputError(f"{record} has a {kind} geometry; nuclei must be Polygon or MultiPolygon.")
        parsed.polygons.append(poly)
        parsed.names.append(str(fid) if fid is not None else str(i))
        name, color = _classification(props)
        parsed.types.append(name)
        parsed.colors.append(color)
        parsed.proba.append(_probabilities(props))
        ids.append(_our_id(feat, props))
    if ids and None not in ids and len(set(ids)) == len(ids):
        parsed.ids = ids  # our own export: keep its nucleus ids
    return parsed


def check_inside(corners: list, parsed: Parsed, shape: tuple[int, int]) -> None:
    """Refuse a nucleus whose centre lies off the image (a wrong scale or offset); warn about nuclei cut by its border."""
    height, width = shape
    tol = BORDER_TOLERANCE_PX
    cut = []
    for poly, name in zip(corners, parsed.names):
        lo, hi = poly.min(axis=0), poly.max(axis=0)
        if lo[0] >= -tol and lo[1] >= -tol and hi[0] <= width + tol and hi[1] <= height + tol:
            continue
        centre = (lo + hi) / 2
        if not (0 <= centre[0] <= width and 0 <= centre[1] <= height):
            raise InvalidInputError(
                f"nucleus {name!r} of {parsed.source} lies outside the {width}×{height} px image "
                f"(x {lo[0]:.1f}–{hi[0]:.1f}, y {lo[1]:.1f}–{hi[1]:.1f} px after scale/offset); "
                "was it exported from a downsampled level or a crop? Set scale and offset."
            )
        cut.append(name)
    if cut:
        warnings.warn(
            f"{len(cut)} nuclei of {parsed.source} reach beyond the image border and were cut at it, e.g. {cut[:3]} "
            "(if many are, check scale= and offset=).", stacklevel=user_stacklevel(),
        )
