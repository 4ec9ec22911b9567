"""What the model sees of a sample: nucleus crops, a low-resolution context image, morphology and the
nucleus neighbourhood graph. Built the same way for training and inference."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree
from spatialdata import SpatialData

from .._constants import HISTOCELL_KEY, SPATIAL_KEY, SPOT_ID_KEY
from .._errors import InvalidInputError
from .._utils import progress_bar
from ..io import get_mpp, resolve_key
from ..io._elements import get_rgb_image, segmented_image_key
from ..io._schema_checks import check_nuclei_mpp
from ..pp import nucleus_crops
from ..pp._resample import rescale_uint8

BAND_UM = 1024.0


@dataclass
class SampleInputs:
    """Per-nucleus inputs of one sample (rows follow the nuclei table)."""

    crops: np.ndarray | ImageCrops  # (n, 3, crop, crop) uint8 at the canonical µm/px, held or cut when indexed
    context: np.ndarray  # (h, w, 3) uint8 image at the context µm/px
    context_xy: np.ndarray  # (n, 2) float32 nucleus positions in context pixels (x, y)
    features: np.ndarray  # (n, f) float32 morphology, raw (standardised by the model)
    neighbors: np.ndarray  # (n, k) int64, column 0 = self, -1 = padding
    distances: np.ndarray  # (n, k) float32 µm
    spot_ids: pd.Series  # spot barcode per nucleus (NaN outside spots)
    obs_names: pd.Index


def _rescale_band(band: np.ndarray, factor: float) -> np.ndarray:
    if np.isclose(factor, 1.0):
        return band
    return rescale_uint8(band, factor)


class ImageCrops:
    """Nucleus crops cut from the image band by band: ``crops[rows]`` gives ``(len(rows), 3, crop, crop)`` uint8.

    :func:`sample_inputs` reads the image through it; with ``crops_on_demand`` it hands it to the network
    instead of holding every crop, and indexing cuts the crops from the same bands the same way (the last
    two resampled bands are kept, so nuclei visited in spatial order read each band once).
    """

    def __init__(self, image, xy_px: np.ndarray, *, mpp: float, canonical_mpp: float, crop_px: int):
        self.image, self.xy_px, self.crop_px = image, xy_px, crop_px
        self.scale = mpp / canonical_mpp
        self.band_px = max(int(BAND_UM / mpp), 64)
        self.margin_px = int(np.ceil(crop_px * canonical_mpp / mpp)) + 2
        self.starts = np.arange(0, image.sizes["y"], self.band_px)
        self.band_of = np.searchsorted(self.starts, xy_px[:, 1], side="right") - 1
        self.shape = (len(xy_px), 3, crop_px, crop_px)
        self._canonical: dict[int, tuple[np.ndarray, int]] = {}

    def __len__(self) -> int:
        return len(self.xy_px)

    def read(self, band: int) -> tuple[np.ndarray, int]:
        """Band ``band`` of the image with ``margin_px`` rows above and below (as far as the image goes), and its first row."""
        y0 = int(self.starts[band])
        r0, r1 = max(y0 - self.margin_px, 0), min(y0 + self.band_px + self.margin_px, self.image.sizes["y"])
        return np.asarray(self.image[:, r0:r1, :].transpose("y", "x", "c")), r0

    def cut(self, canonical: np.ndarray, r0: int, rows: np.ndarray) -> np.ndarray:
        """Crops of nuclei ``rows`` from a band already resampled to the canonical µm/px."""
        return nucleus_crops(canonical, (self.xy_px[rows] - [0, r0]) * self.scale, size=self.crop_px)

    def canonical(self, band: int) -> tuple[np.ndarray, int]:
        """Band ``band`` (with margins) resampled to the canonical µm/px, and its first row in the image."""
        if band not in self._canonical:
            if len(self._canonical) == 2:
                del self._canonical[next(iter(self._canonical))]
            pixels, r0 = self.read(band)
            self._canonical[band] = (_rescale_band(pixels, self.scale), r0)
        return self._canonical[band]

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.arange(len(self))[rows] if isinstance(rows, slice) else np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), 3, self.crop_px, self.crop_px), dtype=np.uint8)
        bands = self.band_of[rows]
        for band in np.unique(bands):
            inside = bands == band
            out[inside] = self.cut(*self.canonical(int(band)), rows[inside])
        return out


def neighbor_graph(xy_um: np.ndarray, k: int, radius_um: float) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest nuclei within ``radius_um`` (self first), padded with -1."""
    n = len(xy_um)
    if n == 0:
        return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
    dist, idx = cKDTree(xy_um).query(xy_um, k=min(k, n), distance_upper_bound=radius_um)
    dist, idx = np.atleast_2d(dist), np.atleast_2d(idx)
    if idx.shape[1] < k:
        pad = k - idx.shape[1]
        idx = np.hstack([idx, np.full((n, pad), n)])
        dist = np.hstack([dist, np.full((n, pad), np.inf)])
    missing = idx >= n
    idx[missing] = -1
    dist[missing] = 0.0
    return idx.astype(np.int64), dist.astype(np.float32)


def sample_inputs(
    sdata: SpatialData,
    *,
    crop_px: int,
    canonical_mpp: float,
    context_mpp: float,
    n_neighbors: int,
    radius_um: float,
    feature_names: list[str] | None,
    image_key: str | None = None,
    nuclei_table_key: str = HISTOCELL_KEY,
    progress: bool = True,
    crops_on_demand: bool = False,
) -> SampleInputs:
    """Crops, context, morphology and neighbours of every nucleus of ``sdata``'s nuclei table.

    The image is read band by band (lazily), resampled to ``canonical_mpp`` for the crops and to
    ``context_mpp`` for the context image, so memory stays bounded on whole slides. With
    ``crops_on_demand`` the crops are cut when indexed (:class:`ImageCrops`) instead of held: the same
    values, about 3 KB less per nucleus, the image read twice.
    """
    mpp = get_mpp(sdata)
    nuclei_table_key = resolve_key(sdata, "tables", key=nuclei_table_key, default=HISTOCELL_KEY)
    table = sdata.tables[nuclei_table_key]
    check_nuclei_mpp(table, mpp, f"Nuclei table {nuclei_table_key!r}")
    if SPATIAL_KEY not in table.obsm:
        raise InvalidInputError(f"Nuclei table {nuclei_table_key!r} has no obsm['spatial']; segment nuclei first (hc.pp.segment_nuclei).")
    features = _features(table, feature_names)
    xy_px = np.asarray(table.obsm[SPATIAL_KEY], dtype=np.float64)
    image = get_rgb_image(sdata, image_key=segmented_image_key(sdata, table, image_key))
    height = image.sizes["y"]
    bad = ~np.isfinite(xy_px).all(1)
    if bad.any():
        raise InvalidInputError(f"{bad.sum()} nuclei of {nuclei_table_key!r} have NaN or infinite centroids in obsm['spatial'], e.g. {list(table.obs_names[bad][:3])}.")
    outside = (xy_px[:, 0] < 0) | (xy_px[:, 1] < 0) | (xy_px[:, 0] >= image.sizes["x"]) | (xy_px[:, 1] >= height)
    if outside.any():
        raise InvalidInputError(
            f"{outside.sum()} nuclei of {nuclei_table_key!r} have centroids outside the {image.sizes['x']}×{height} px image, e.g. "
            f"{list(table.obs_names[outside][:3])}; the nuclei belong to another image or were shifted."
        )
    scale = mpp / canonical_mpp
    if scale > 4 or scale < 1 / 16:
        raise InvalidInputError(
            f"The image is at {mpp} µm/px; the model works at {canonical_mpp} µm/px and cannot resample by a factor {scale:.3g}."
        )
    reader = ImageCrops(image, xy_px, mpp=mpp, canonical_mpp=canonical_mpp, crop_px=crop_px)
    crops = reader if crops_on_demand else np.zeros(reader.shape, dtype=np.uint8)
    context_bands = []
    for band in progress_bar(range(len(reader.starts)), desc="reading image", disable=not progress or len(reader.starts) < 3):
        pixels, r0 = reader.read(band)
        y0 = int(reader.starts[band])
        y1 = min(y0 + reader.band_px, height)
        context_bands.append(_rescale_band(pixels[y0 - r0 : y1 - r0], mpp / context_mpp))
        inside = np.flatnonzero(reader.band_of == band)
        if len(inside) and not crops_on_demand:
            crops[inside] = reader.cut(_rescale_band(pixels, scale), r0, inside)
    context = np.concatenate(context_bands, axis=0) if context_bands else np.zeros((1, 1, 3), np.uint8)
    xy_um = xy_px * mpp
    neighbors, distances = neighbor_graph(xy_um, n_neighbors, radius_um)
    spot_ids = table.obs[SPOT_ID_KEY] if SPOT_ID_KEY in table.obs else pd.Series(np.nan, index=table.obs_names)
    return SampleInputs(
        crops=crops,
        context=context,
        context_xy=(xy_um / context_mpp).astype(np.float32),
        features=features,
        neighbors=neighbors,
        distances=distances,
        spot_ids=spot_ids.astype(object).where(spot_ids.notna()),
        obs_names=table.obs_names,
    )


def _features(table, feature_names: list[str] | None) -> np.ndarray:
    if feature_names is None:
        return np.zeros((table.n_obs, 0), np.float32)
    missing = [f for f in feature_names if f not in table.var_names]
    if missing:
        raise InvalidInputError(f"Nuclei table lacks the morphology features {missing}; recompute them with hc.pp.store_nuclei.")
    x = table[:, feature_names].X
    x = (x.toarray() if hasattr(x, "toarray") else np.asarray(x)).astype(np.float32)
    bad = ~np.isfinite(x).all(1)
    if bad.any():
        raise InvalidInputError(
            f"{bad.sum()} nuclei have NaN or infinite morphology features (e.g. {list(table.obs_names[bad][:3])}); "
            "recompute them with hc.pp.store_nuclei or use a model with use_morphology=False."
        )
    return x
