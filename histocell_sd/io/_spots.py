"""Spot geometry of the data model: circles (Visium) or squares (Visium HD bins), and which spot holds a point.

Circles are points with a ``radius`` column (px); squares are 4-corner polygons with a ``side`` column (px),
axis-aligned or rotated with the bin grid. :func:`spot_geometry` reads either into one description, so the
code that uses spots (assignment, plots, training bags) does not test geometry types itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from scipy.spatial import cKDTree
from spatialdata.models import ShapesModel

from .._constants import SPOT_ID_KEY, TABLE_KEY
from .._errors import InvalidInputError
from ._elements import annotated_regions, pixel_transformations

CIRCLE, SQUARE = "circle", "square"
RADIUS_KEY, SIDE_KEY = "radius", "side"
_SIDE_RTOL = 1e-6
_EDGE_RTOL = 1e-9


@dataclass(frozen=True)
class SpotGeometry:
    """The spots of a shapes element as arrays (px, ``global``).

    ``size`` is the radius of a circle or the side of a square; ``axes`` (squares only) the unit vectors of
    each square's frame, ``(n, 2, 2)`` (``axes[:, 0]`` its x axis, ``axes[:, 1]`` its y axis).
    """

    shape: str
    centers: np.ndarray
    size: np.ndarray
    index: pd.Index
    axes: np.ndarray | None = None


def spot_geometry(spots: gpd.GeoDataFrame, name: str = "spots") -> SpotGeometry:
    """Read circle or square spots; raise :class:`~histocell_sd.InvalidInputError` for anything else."""
    kinds = set(spots.geometry.geom_type.unique())
    if RADIUS_KEY in spots.columns and kinds <= {"Point"}:
        centers = np.column_stack([spots.geometry.x.to_numpy(), spots.geometry.y.to_numpy()]).astype(np.float64)
        return SpotGeometry(CIRCLE, centers, spots[RADIUS_KEY].to_numpy(np.float64), spots.index)
    if SIDE_KEY in spots.columns and kinds <= {"Polygon"}:
        return _squares(spots, name)
    raise InvalidInputError(
        f"Shapes {name!r} must be spot circles (points with a {RADIUS_KEY!r} column) or squares (4-corner polygons "
        f"with a {SIDE_KEY!r} column); got {sorted(kinds)} with columns {list(spots.columns)}."
    )


def annotated_spots(sdata, *, exclude: tuple[str, ...] = ()) -> str | None:
    """The circles or squares the spots table ``"table"`` annotates (e.g. spatialdata-io's Visium circles, named after
    the dataset), unless in ``exclude``; None when there are none."""
    if TABLE_KEY not in sdata.tables:
        return None
    regions = annotated_regions(sdata.tables[TABLE_KEY])
    if len(regions) != 1 or regions[0] not in sdata.shapes or regions[0] in exclude:
        return None
    try:
        spot_geometry(sdata.shapes[regions[0]], regions[0])
    except InvalidInputError:
        return None
    return regions[0]


def _squares(spots: gpd.GeoDataFrame, name: str) -> SpotGeometry:
    geoms = spots.geometry.to_numpy()
    n = len(geoms)
    if n and not (shapely.get_num_coordinates(geoms) == 5).all():
        raise InvalidInputError(f"Shapes {name!r}: every square spot must be a polygon of 4 corners.")
    corners = shapely.get_coordinates(shapely.get_exterior_ring(geoms)).reshape(n, 5, 2)[:, :4] if n else np.zeros((0, 4, 2))
    side = spots[SIDE_KEY].to_numpy(np.float64)
    edges = np.diff(corners, axis=1, append=corners[:, :1])  # (n, 4, 2): the 4 edges
    lengths = np.hypot(edges[..., 0], edges[..., 1])
    if not (np.isfinite(side).all() and (side > 0).all()):
        raise InvalidInputError(f"Shapes {name!r}: column {SIDE_KEY!r} must hold positive side lengths (px).")
    if not np.allclose(lengths, side[:, None], rtol=_SIDE_RTOL, atol=1e-6 * np.max(side, initial=1.0)):
        raise InvalidInputError(f"Shapes {name!r}: the polygons are not squares of side {SIDE_KEY!r}.")
    # The square's frame: of its 4 edge directions, the one closest to +x (exact for axis-aligned squares).
    units = edges / lengths[..., None]
    first = units[np.arange(n), np.argmax(units[..., 0] - 1e-12 * units[..., 1], axis=1)] if n else np.zeros((0, 2))
    axes = np.stack([first, np.column_stack([-first[:, 1], first[:, 0]])], axis=1)
    if n and not (np.abs(np.einsum("nk,nk->n", units[:, 1], units[:, 0])) <= 1e-6).all():
        raise InvalidInputError(f"Shapes {name!r}: the polygons are not squares (corners are not right angles).")
    return SpotGeometry(SQUARE, corners.mean(axis=1), side, spots.index, axes)


def spot_of_points(geometry: SpotGeometry, points: np.ndarray) -> np.ndarray:
    """Row of the spot holding each point (x, y px), -1 outside every spot.

    A circle holds the points within its radius (the nearest centre decides between overlapping circles). A
    square holds the points with ``|dx| <= side/2`` and ``|dy| <= side/2`` in its frame; between squares that
    hold a point the one whose centre is nearest (Chebyshev distance in its frame) wins, and a point on an edge
    or corner shared by squares that tile the plane (Visium HD bins) goes to the square on its +x / +y side
    (of the bins' frame), as a pixel belongs to one bin.
    """
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    out = np.full(len(points), -1, dtype=np.int64)
    if not len(points) or not len(geometry.centers):
        return out
    tree = cKDTree(geometry.centers)
    if geometry.shape == CIRCLE:
        dist, idx = tree.query(points)
        inside = dist <= geometry.size[idx]
        out[inside] = idx[inside]
        return out
    half = geometry.size / 2
    reach = float(half.max()) * np.sqrt(2) * (1 + 1e-9)
    k = min(4, len(geometry.centers))  # a point is within half a diagonal of at most 4 centres of a tiling
    _, idx = tree.query(points, k=k, distance_upper_bound=reach)
    idx = idx.reshape(len(points), k)
    found = idx < len(geometry.centers)
    cand = np.where(found, idx, 0)
    offset = points[:, None, :] - geometry.centers[cand]  # (n, k, 2)
    dx = np.einsum("nkj,nkj->nk", offset, geometry.axes[cand, 0])
    dy = np.einsum("nkj,nkj->nk", offset, geometry.axes[cand, 1])
    h = half[cand]
    tol = _EDGE_RTOL * h  # a point on a shared edge is inside both squares despite rounding of their centres
    chebyshev = np.where(found & (np.abs(dx) <= h + tol) & (np.abs(dy) <= h + tol), np.maximum(np.abs(dx), np.abs(dy)), np.inf)
    nearest = chebyshev.min(axis=1, keepdims=True)
    ties = np.isfinite(chebyshev) & (chebyshev <= nearest + tol)
    choice = np.argmin(np.where(ties, dx + dy, np.inf), axis=1)  # of tied squares, the one on the point's +x/+y side
    rows = np.flatnonzero(np.isfinite(nearest[:, 0]))
    out[rows] = cand[rows, choice[rows]]
    return out


def spot_ids_of_points(spots: gpd.GeoDataFrame, points: np.ndarray, name: str = "spots") -> pd.Series:
    """Barcode of the spot (circle or square) holding each point, NaN outside every spot."""
    geometry = spot_geometry(spots, name)
    row = spot_of_points(geometry, points)
    out = pd.Series(np.full(len(row), np.nan, dtype=object))
    inside = row >= 0
    out[inside] = geometry.index.to_numpy()[row[inside]].astype(str)
    return out


def square_spots_element(xy: np.ndarray, side: float, spot_ids, *, mpp: float, angle: float = 0.0) -> gpd.GeoDataFrame:
    """Square shapes (4-corner polygons, column ``side`` in px) centred at ``xy`` (px), rotated by ``angle``
    (radians, counter-clockwise from +x in pixel axes), in ``global`` and ``um``."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    side = float(side)
    u = np.array([1.0, 0.0]) if angle == 0 else np.array([np.cos(angle), np.sin(angle)])
    v = np.array([-u[1], u[0]])
    unit = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) * (side / 2)
    offsets = unit[:, :1] * u + unit[:, 1:] * v  # (4, 2)
    corners = xy[:, None, :] + offsets[None]
    polygons = shapely.polygons(np.concatenate([corners, corners[:, :1]], axis=1))
    gdf = gpd.GeoDataFrame({SIDE_KEY: np.full(len(xy), side)}, geometry=polygons, index=pd.Index(spot_ids, name=SPOT_ID_KEY))
    return ShapesModel.parse(gdf, transformations=pixel_transformations(mpp))


def spot_centers(spots: gpd.GeoDataFrame, name: str = "spots") -> np.ndarray:
    """(n, 2) spot centres (x, y px) of circle or square spots, in row order."""
    return spot_geometry(spots, name).centers


def spot_polygons(geometry: SpotGeometry) -> np.ndarray:
    """Shapely polygons of the spots (px): the squares' corners, or the circles as 64-gons."""
    if geometry.shape == CIRCLE:
        return shapely.buffer(shapely.points(geometry.centers), geometry.size, quad_segs=16)
    unit = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1], [-1, -1]], dtype=np.float64) / 2
    offsets = unit[None, :, :1] * geometry.axes[:, None, 0] + unit[None, :, 1:] * geometry.axes[:, None, 1]  # (n, 5, 2)
    return shapely.polygons(geometry.centers[:, None, :] + offsets * geometry.size[:, None, None])


def spot_overlaps(geometry: SpotGeometry, polygons) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (polygon, spot) pair whose areas overlap: ``(polygon rows, spot rows, overlap area px²)``.

    Pairs that only touch (zero area) are dropped; rows are sorted by spot, then polygon.
    """
    polygons = np.asarray(polygons, dtype=object)
    if not len(polygons) or not len(geometry.centers):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    squares = spot_polygons(geometry)
    poly_rows, spot_rows = shapely.STRtree(squares).query(polygons, predicate="intersects")
    area = shapely.area(shapely.intersection(polygons[poly_rows], squares[spot_rows]))
    keep = area > 0
    poly_rows, spot_rows, area = poly_rows[keep], spot_rows[keep], area[keep]
    order = np.lexsort((poly_rows, spot_rows))
    return poly_rows[order].astype(np.int64), spot_rows[order].astype(np.int64), area[order]
