"""Real H&E patches with a class dot for every cell from BRCA-M2C (BSD-3; Abousamra et al., ICCV 2021)."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from skimage.io import imread
from spatialdata import SpatialData
from spatialdata.models import TableModel

from .._errors import InvalidInputError
from ..io import from_arrays
from ._synthetic import TRUTH_TABLE_KEY

BRCA_M2C_CLASSES = ("tumor", "stromal", "lymphocyte")
"""Cell classes of BRCA-M2C: tumour/epithelial, stromal and lymphocyte (file classes 2, 3, 1)."""
_FILE_CLASSES = {1: "lymphocyte", 2: "tumor", 3: "stromal"}
_SPLITS = ("train", "val", "test")
# The embedded subset: the split each patch belongs to in the authors' split files.
_EMBEDDED = {
    "TCGA-A8-A099-01Z-00-DX1_29501_22501_1000_1000_0.93": "test",
    "TCGA-PE-A5DE-01Z-00-DX1_14001_15501_1000_1000_0.9824": "test",
    "TCGA-A8-A09Q-01Z-00-DX1_15001_15001_1000_1000_0.93": "test",
    "TCGA-OL-A66P-01Z-00-DX1_33501_25501_1000_1000_0.65748": "test",
    "TCGA-A7-A13E-01Z-00-DX1_26501_13501_1000_1000_0.9824": "train",
    "TCGA-A8-A08B-01Z-00-DX1_17501_74001_1000_1000_0.93": "train",
}


def _root(path) -> Path:
    if path is None:
        return Path(str(files(__package__) / "data" / "brca_m2c"))
    root = Path(path)
    if not (root / "images").is_dir() or not (root / "labels").is_dir():
        raise InvalidInputError(f"{root} is not a BRCA-M2C folder (it needs images/ and labels/).")
    return root


def brca_m2c_names(split: str = "test", *, path=None) -> list[str]:
    """Patch names of ``split`` (``"train"``, ``"val"``, ``"test"`` or ``"all"``).

    Without ``path`` these are the embedded patches of that split; with ``path`` (a full BRCA-M2C
    folder) the authors' split files are read.

    Parameters
    ----------
    split
        ``"train"``, ``"val"``, ``"test"`` or ``"all"``.
    path
        A full BRCA-M2C folder (images/, labels/, ``brca_ds_*.txt``); None: the embedded patches.

    Returns
    -------
    list of str
        The patch names.
    """
    if split != "all" and split not in _SPLITS:
        raise InvalidInputError(f"split must be one of {[*_SPLITS, 'all']}, got {split!r}.")
    wanted = _SPLITS if split == "all" else (split,)
    if path is None:
        names = [name for name, s in _EMBEDDED.items() if s in wanted]
        if not names:
            raise InvalidInputError(
                f"The embedded patches hold no {split!r} patch (they are {sorted(set(_EMBEDDED.values()))}); pass path= a full BRCA-M2C folder."
            )
        return names
    root = _root(path)
    names = []
    for s in wanted:
        split_file = root / f"brca_ds_{s}.txt"
        if not split_file.is_file():
            raise InvalidInputError(f"{root} has no split file {split_file.name}.")
        names += [line.strip().removesuffix(".png") for line in split_file.read_text().splitlines() if line.strip()]
    return names


def read_brca_m2c_patch(name: str, *, path=None) -> tuple[np.ndarray, float, pd.DataFrame]:
    """RGB image (uint8), its µm/px and the annotated cells (``x``, ``y`` px; ``cell_type``) of one patch.

    Parameters
    ----------
    name
        A patch name (:func:`brca_m2c_names`).
    path
        A full BRCA-M2C folder; None: the embedded patches.

    Returns
    -------
    tuple
        ``(image, mpp, cells)``: an (h, w, 3) uint8 array, its µm per pixel and a DataFrame of the
        annotated cells (``x``, ``y`` in px, categorical ``cell_type``).
    """
    root = _root(path)
    image_file = root / "images" / f"{name}.png"
    if not image_file.is_file():
        raise InvalidInputError(f"No BRCA-M2C patch {name!r} in {root}.")
    image = np.asarray(imread(image_file))[..., :3]
    # The name ends with 4x the µm/px of the 1000 px 40x original, which was resized to this width.
    mpp = 1000.0 * float(name.rsplit("_", 1)[1]) / 4.0 / image.shape[1]
    dots = np.loadtxt(root / "labels" / f"{name}_gt_class_coords.txt", ndmin=2).reshape(-1, 3)
    cell_type = pd.Categorical([_FILE_CLASSES[int(c)] for c in dots[:, 2]], categories=BRCA_M2C_CLASSES)
    points = pd.DataFrame({"x": dots[:, 1], "y": dots[:, 0], "cell_type": cell_type})
    return image, mpp, points


def brca_m2c(split: str = "test", *, path=None, names=None) -> dict[str, SpatialData]:
    """BRCA-M2C patches as SpatialData (one per patch, image ``"he"`` at its µm/px, about 0.5).

    Each holds, for scoring and for building pseudo-spots (:func:`pseudo_spots`), the annotated
    cells in the table ``"truth_nuclei"`` (``obs["cell_type"]`` from :data:`BRCA_M2C_CLASSES`,
    ``obsm["spatial"]`` in px). Licence BSD 3-Clause; cite Abousamra et al., ICCV 2021.

    Parameters
    ----------
    split
        ``"train"``, ``"val"``, ``"test"`` or ``"all"`` (the authors' patient-disjoint split).
    path
        A full BRCA-M2C folder (images/, labels/, ``brca_ds_*.txt``); default: the six embedded
        patches (four of the test split, two of the train split).
    names
        Patch names to read instead of a whole split.

    Returns
    -------
    dict
        Patch name → SpatialData.
    """
    if isinstance(names, str):
        raise InvalidInputError(f"names must be a list of patch names, got the string {names!r}; use names=[{names!r}].")
    names = brca_m2c_names(split, path=path) if names is None else list(names)
    out = {}
    for name in names:
        image, mpp, points = read_brca_m2c_patch(name, path=path)
        sdata = from_arrays(image, mpp, sample_id=name)
        sdata.tables[TRUTH_TABLE_KEY] = truth_table(points, prefix=name)
        out[name] = sdata
    return out


def truth_table(points: pd.DataFrame, prefix: str) -> ad.AnnData:
    """The ``truth_nuclei`` table of annotated cells: ``obs["cell_type"]``, ``obsm["spatial"]`` (x, y px)."""
    obs = pd.DataFrame({"cell_type": pd.Categorical(points["cell_type"])}, index=[f"{prefix}_{i}" for i in range(len(points))])
    return TableModel.parse(ad.AnnData(obs=obs, obsm={"spatial": points[["x", "y"]].to_numpy(dtype=np.float64)}))
