"""Reading, building, validating and writing samples in the histocell-sd data model."""

from ._arrays import from_arrays
from ._elements import get_image, get_mpp, resolve_key
from ._export import write_csv, write_geojson
from ._nuclei import read_nuclei
from ._proportions import check_proportions, read_proportions
from ._schema import ExpressionTableModel, NucleiTableModel, SpotsTableModel
from ._validate import validate
from ._visium import read_visium
from ._visium_hd import read_visium_hd
from ._zarr import read_zarr, write_zarr

__all__ = [
    "ExpressionTableModel",
    "NucleiTableModel",
    "SpotsTableModel",
    "check_proportions",
    "from_arrays",
    "get_image",
    "get_mpp",
    "read_nuclei",
    "read_proportions",
    "read_visium",
    "read_visium_hd",
    "read_zarr",
    "resolve_key",
    "validate",
    "write_csv",
    "write_geojson",
    "write_zarr",
]
