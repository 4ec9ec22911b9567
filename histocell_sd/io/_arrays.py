"""Bring-your-own arrays: build a SpatialData in the histocell-sd data model."""

from __future__ import annotations

import warnings

import anndata as ad
import dask.array as da
import numpy as np
import pandas as pd
from scipy import sparse
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, ShapesModel

from .._constants import (
    IMAGE_KEY,
    PROPORTIONS_KEY,
    SPOT_ID_KEY,
    SPOTS_KEY,
    TABLE_KEY,
    VISIUM_SPOT_DIAMETER_UM,
)
from .._errors import InvalidInputError
from ._elements import check_mpp, pixel_transformations, refuse_grey
from ._proportions import align_to_spots, check_proportions
from ._schema import SpotsTableModel


def from_arrays(
    image,
    mpp: float,
    *,
    spot_centers=None,
    spot_diameter_um: float = VISIUM_SPOT_DIAMETER_UM,
    counts: ad.AnnData | pd.DataFrame | None = None,
    proportions: pd.DataFrame | None = None,
    sample_id: str = "sample",
) -> SpatialData:
    """Build a SpatialData from an H&E array and optional Visium-like spots.

    Parameters
    ----------
    image
        H×W×3 ``uint8`` RGB array (numpy or dask). RGBA is converted with a warning.
    mpp
        Microns per pixel of ``image`` (a number in the open range 0.01–100); stored in ``sdata.attrs["mpp"]``.
    spot_centers
        Spot centres in pixels: an (n, 2) array of x, y or a DataFrame with columns ``x``, ``y``
        whose index holds the barcodes.
    spot_diameter_um
        Spot diameter in µm (55 for Visium).
    counts
        Spot × gene counts (AnnData or DataFrame) indexed by barcode: finite, non-negative numbers
        with unique gene names.
    proportions
        Spot × cell-type proportions indexed by barcode.
    sample_id
        Stored in ``sdata.attrs["sample_id"]``.

    Returns
    -------
    SpatialData with image ``"he"`` and, when spots are given, circles ``"spots"`` and the table
    ``"table"`` annotating them (``obsm["proportions"]`` when given).
    """
    mpp = check_mpp(mpp)
    image = _check_image(image)
    height, width = image.shape[:2]
    elements: dict = {"images": {IMAGE_KEY: image_element(image, mpp=mpp)}}
    refuse_grey(elements["images"][IMAGE_KEY], IMAGE_KEY)
    if spot_centers is None:
        if counts is not None or proportions is not None:
            raise InvalidInputError("counts/proportions were given without spot_centers.")
    else:
        _check_spot_diameter(spot_diameter_um)
        xy, spot_ids = _check_spot_centers(spot_centers, counts, proportions, (height, width))
        radius = spot_diameter_um / 2 / mpp
        elements["shapes"] = {SPOTS_KEY: spots_element(xy, radius, spot_ids, mpp=mpp)}
        elements["tables"] = {TABLE_KEY: spots_table(spot_ids, counts, proportions, centers=xy, mpp=mpp)}
    return SpatialData(**elements, attrs={"mpp": mpp, "sample_id": str(sample_id)})


def image_element(image, *, mpp: float, chunk: int = 1024):
    """A multiscale Image2D (c, y, x) in ``global`` (and ``um``) from an H×W×3 array."""
    array = image if isinstance(image, da.Array) else da.from_array(np.asarray(image), chunks=(chunk, chunk, 3))
    array = array.transpose(2, 0, 1)
    scale_factors = []
    size = min(array.shape[1:])
    while size // 2 >= 512 and len(scale_factors) < 5:
        scale_factors.append(2)
        size //= 2
    return Image2DModel.parse(
        array,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=scale_factors or None,
        chunks=(3, chunk, chunk),
        transformations=pixel_transformations(mpp),
    )


def spots_element(xy: np.ndarray, radius: float, spot_ids, *, mpp: float):
    """Circle shapes for spots centred at ``xy`` (pixels) with a common ``radius`` (pixels), in ``global`` and ``um``."""
    return ShapesModel.parse(
        np.asarray(xy, dtype=np.float64),
        geometry=0,
        radius=np.full(len(xy), float(radius)),
        index=pd.Index(spot_ids, name=SPOT_ID_KEY),
        transformations=pixel_transformations(mpp),
    )


def spots_table(spot_ids, counts=None, proportions=None, region: str = SPOTS_KEY, *, centers=None, mpp: float | None = None) -> ad.AnnData:
    """The spots table (:class:`SpotsTableModel`): counts in ``X`` (when given), ``obsm["proportions"]``,
    spot centres (x, y px) in ``obsm["spatial"]``, annotating ``region``."""
    spot_ids = pd.Index(spot_ids).astype(str)
    if counts is None:
        adata = ad.AnnData(sparse.csr_matrix((len(spot_ids), 0), dtype=np.float32), obs=pd.DataFrame(index=spot_ids))
    else:
        adata = _counts_anndata(counts, spot_ids)
    if proportions is not None:
        adata.obsm[PROPORTIONS_KEY] = check_proportions(proportions, spot_ids=spot_ids)
    return SpotsTableModel.parse(adata, region=region, centers=centers, mpp=mpp)


def _counts_anndata(counts, spot_ids: pd.Index) -> ad.AnnData:
    if isinstance(counts, pd.DataFrame):
        _check_gene_names(counts.columns.astype(str))
        non_numeric = [str(c) for c, t in counts.dtypes.items() if not pd.api.types.is_numeric_dtype(t) or pd.api.types.is_bool_dtype(t)]
        if non_numeric:
            raise InvalidInputError(f"counts has non-numeric columns {non_numeric[:5]}; rows = spots, columns = genes, numbers only.")
        counts = ad.AnnData(sparse.csr_matrix(counts.to_numpy()), obs=pd.DataFrame(index=counts.index.astype(str)),
                            var=pd.DataFrame(index=counts.columns.astype(str)))
    elif not isinstance(counts, ad.AnnData):
        raise InvalidInputError(f"counts must be an AnnData or a DataFrame, got {type(counts).__name__}.")
    _check_counts(counts)
    if counts.obs_names.has_duplicates:
        raise InvalidInputError("counts has duplicate spot barcodes.")
    order = align_to_spots(pd.DataFrame(index=counts.obs_names.astype(str)).assign(i=np.arange(counts.n_obs)), spot_ids, name="counts")
    adata = counts[order["i"].to_numpy()].copy()
    adata.obs_names = spot_ids
    return adata


def _check_gene_names(names: pd.Index) -> None:
    if names.has_duplicates:
        dup = names[names.duplicated()].unique()[:5].tolist()
        raise InvalidInputError(f"counts has duplicated gene names, e.g. {dup}; make them unique (e.g. adata.var_names_make_unique()).")


def _check_counts(counts: ad.AnnData) -> None:
    """Refuse duplicated gene names and NaN, infinite or negative counts."""
    _check_gene_names(counts.var_names)
    X = counts.X
    if X is None:
        return
    values = X.data if sparse.issparse(X) else np.asarray(X)
    if not np.issubdtype(values.dtype, np.number) or values.dtype == bool:
        raise InvalidInputError(f"counts must be numbers, got dtype {values.dtype}.")
    if not np.isfinite(values).all():
        raise InvalidInputError("counts has NaN or infinite values; raw counts are needed.")
    if (values < 0).any():
        raise InvalidInputError("counts has negative values; raw (non-negative) counts are needed, not scaled data.")


def _check_spot_diameter(spot_diameter_um) -> None:
    if isinstance(spot_diameter_um, (bool, np.bool_)) or not isinstance(spot_diameter_um, (int, float, np.number)):
        raise InvalidInputError(f"spot_diameter_um must be a number of µm, got {spot_diameter_um!r}.")
    if not np.isfinite(spot_diameter_um) or spot_diameter_um <= 0:
        raise InvalidInputError(f"spot_diameter_um must be positive, got {spot_diameter_um!r}.")


def _check_image(image):
    if not hasattr(image, "shape") or not hasattr(image, "dtype"):
        raise InvalidInputError(f"image must be an H×W×3 uint8 array, got {type(image).__name__}.")
    if not isinstance(image, da.Array):
        image = np.asarray(image)
    if image.ndim == 2:
        raise InvalidInputError(f"image is grayscale with shape {image.shape}; an H×W×3 RGB H&E image is needed.")
    if image.ndim != 3:
        raise InvalidInputError(f"image must have 3 dimensions (H, W, 3), got shape {image.shape}.")
    if image.shape[2] not in (3, 4) and image.shape[0] in (3, 4):
        raise InvalidInputError(f"image looks channel-first {image.shape}; pass it as H×W×3 (e.g. image.transpose(1, 2, 0)).")
    if image.shape[2] == 4:
        warnings.warn("image is RGBA; the alpha channel was dropped.", stacklevel=3)
        image = image[..., :3]
    if image.shape[2] != 3:
        raise InvalidInputError(f"image must have 3 colour channels (RGB), got {image.shape[2]}.")
    if image.dtype != np.uint8:
        raise InvalidInputError(f"image must be uint8 (0-255), got {image.dtype}; {uint8_hint(image)}")
    if min(image.shape[:2]) < 2:
        raise InvalidInputError(f"image is too small: {image.shape}.")
    return image


def _check_spot_centers(spot_centers, counts, proportions, shape) -> tuple[np.ndarray, pd.Index]:
    if isinstance(spot_centers, pd.DataFrame):
        if not {"x", "y"} <= set(spot_centers.columns):
            raise InvalidInputError("spot_centers DataFrame needs columns 'x' and 'y' (pixels).")
        for column in ("x", "y"):
            values = spot_centers[column]
            bad = pd.to_numeric(values, errors="coerce").isna() & values.notna()
            if bad.any():
                raise InvalidInputError(f"spot_centers column {column!r} holds values that are not numbers (pixels), e.g. {values[bad].iloc[0]!r}.")
        xy = spot_centers[["x", "y"]].to_numpy(dtype=np.float64)
        spot_ids = spot_centers.index.astype(str)
    else:
        try:
            xy = np.asarray(spot_centers, dtype=np.float64)
        except (TypeError, ValueError):
            raise InvalidInputError("spot_centers must be an (n, 2) array of x, y pixels (numbers).") from None
        if xy.ndim != 2 or xy.shape[1] != 2:
            raise InvalidInputError(f"spot_centers must be an (n, 2) array of x, y pixels, got shape {xy.shape}.")
        source = counts if counts is not None else proportions
        if source is not None:
            spot_ids = (source.obs_names if isinstance(source, ad.AnnData) else source.index).astype(str)
            if len(spot_ids) != len(xy):
                raise InvalidInputError(
                    f"spot_centers has {len(xy)} rows but counts/proportions have {len(spot_ids)}; pass spot_centers "
                    "as a DataFrame indexed by barcode to match them."
                )
        else:
            spot_ids = pd.Index([f"spot_{i:05d}" for i in range(len(xy))])
    if len(xy) == 0:
        raise InvalidInputError("spot_centers is empty.")
    if spot_ids.has_duplicates:
        raise InvalidInputError(f"spot barcodes are duplicated, e.g. {spot_ids[spot_ids.duplicated()][:3].tolist()}.")
    if not np.isfinite(xy).all():
        raise InvalidInputError("spot_centers contain NaN or infinite coordinates.")
    height, width = shape
    outside = (xy[:, 0] < 0) | (xy[:, 0] >= width) | (xy[:, 1] < 0) | (xy[:, 1] >= height)
    if outside.any():
        raise InvalidInputError(
            f"{outside.sum()} spot centres lie outside the {width}×{height} px image, e.g. {spot_ids[outside][:3].tolist()}."
        )
    return xy, spot_ids


def uint8_hint(image: np.ndarray) -> str:
    """How to convert ``image`` to uint8, from its dtype and range (a hint only; nothing is converted)."""
    if np.issubdtype(image.dtype, np.integer):
        return "rescale its range to 0-255 (e.g. skimage.util.img_as_ubyte for the full uint16 range, or np.round(image / image.max() * 255))."
    if image.size and np.nanmax(image) <= 1.0:
        return "values in [0, 1]: convert with (image * 255).round().astype('uint8')."
    return "values beyond 1 (0-255 floats?): convert with np.clip(image, 0, 255).round().astype('uint8')."
