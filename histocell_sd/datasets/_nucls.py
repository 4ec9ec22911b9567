"""Real H&E tiles with nucleus labels from NuCLS (CC0; Amgad et al., GigaScience 2022, 11:giac037)."""

from __future__ import annotations

from importlib.resources import files

import anndata as ad
import numpy as np
import pandas as pd
from skimage.io import imread
from spatialdata import SpatialData
from spatialdata.models import Labels2DModel, TableModel

from .._errors import InvalidInputError
from ..io import from_arrays
from ..io._elements import pixel_transformations
from ._synthetic import TRUTH_LABELS_KEY, TRUTH_TABLE_KEY

NUCLS_MPP = 0.25
"""µm per pixel of the NuCLS tiles."""
NUCLS_CLASSES = ("tumor_any", "nonTIL_stromal", "sTIL", "other_nucleus")
"""Nucleus classes of the NuCLS tiles (the categories of their ``cell_type``)."""
_SPLITS = {"train": 10, "test": 5}


def nucls_tile_names(split: str = "test") -> list[str]:
    """Names of the embedded NuCLS tiles of ``split`` (``"train"``, ``"test"`` or ``"all"``).

    Parameters
    ----------
    split
        ``"train"`` (10 tiles), ``"test"`` (5) or ``"all"``.

    Returns
    -------
    list of str
        The tile names.
    """
    if split == "all":
        return nucls_tile_names("train") + nucls_tile_names("test")
    if split not in _SPLITS:
        raise InvalidInputError(f"split must be 'train', 'test' or 'all', got {split!r}.")
    return [f"{split}_{i}" for i in range(1, _SPLITS[split] + 1)]


def read_nucls_tile(name: str) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """RGB image (256×256×3 uint8), instance labels and annotated points (x, y px; ``cell_type``) of one tile.

    Parameters
    ----------
    name
        A tile name (:func:`nucls_tile_names`).

    Returns
    -------
    tuple
        ``(image, labels, points)``: the (256, 256, 3) uint8 image, the int32 instance mask and a
        DataFrame of the annotated nuclei (``x``, ``y`` in px, categorical ``cell_type``).
    """
    root = files(__package__) / "data" / "nucls"
    image = imread(root / "images" / f"{name}.png")[..., :3]
    with np.load(root / "masks" / f"{name}.npz") as masks:
        labels = masks["inst_map"].astype(np.int32)
    points = pd.read_csv(root / "points" / f"{name}.csv", header=None, names=["x", "y", "class"])
    points["cell_type"] = pd.Categorical(np.asarray(NUCLS_CLASSES)[points["class"]], categories=NUCLS_CLASSES)
    return image, labels, points.drop(columns="class")


def nucls(split: str = "test") -> dict[str, SpatialData]:
    """The embedded NuCLS tiles of ``split`` as SpatialData at 0.25 µm/px.

    Each holds the image ``"he"`` and, for scoring only, the annotated instance mask
    ``"truth_labels"`` and the annotated nuclei ``"truth_nuclei"`` (``obs["cell_type"]`` from
    ``NUCLS_CLASSES``, ``obs["label_id"]`` the mask under the point or 0, ``obsm["spatial"]`` in px).
    Cite Amgad et al., GigaScience 2022, 11:giac037.

    Parameters
    ----------
    split
        ``"train"``, ``"test"`` or ``"all"``.

    Returns
    -------
    dict
        Tile name → SpatialData.
    """
    out = {}
    for name in nucls_tile_names(split):
        image, labels, points = read_nucls_tile(name)
        sdata = from_arrays(image, NUCLS_MPP, sample_id=f"nucls_{name}")
        sdata.labels[TRUTH_LABELS_KEY] = Labels2DModel.parse(labels, dims=("y", "x"), transformations=pixel_transformations(sdata.attrs["mpp"]))
        obs = pd.DataFrame({"cell_type": points["cell_type"], "label_id": _label_at(labels, points)})
        obs.index = [f"{name}_{i}" for i in range(len(points))]
        table = ad.AnnData(obs=obs, obsm={"spatial": points[["x", "y"]].to_numpy(dtype=np.float64)})
        sdata.tables[TRUTH_TABLE_KEY] = TableModel.parse(table)
        out[name] = sdata
    return out


def _label_at(labels: np.ndarray, points: pd.DataFrame) -> np.ndarray:
    """Instance id under each point (0 where the point falls outside every mask)."""
    y = np.clip(np.round(points["y"].to_numpy()).astype(int), 0, labels.shape[0] - 1)
    x = np.clip(np.round(points["x"].to_numpy()).astype(int), 0, labels.shape[1] - 1)
    return labels[y, x]
