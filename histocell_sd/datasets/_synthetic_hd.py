"""The synthetic slide as a Visium HD Space Ranger output folder: expression on 2 µm bins, binned to 8 and 16 µm."""

from __future__ import annotations

import json
import shutil
from os import PathLike
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
from PIL import Image
from scipy import sparse
from spatialdata import SpatialData
from spatialdata.models import Labels2DModel

from .._docs import inject_docs
from .._errors import InvalidInputError
from ..io._elements import check_mpp, pixel_transformations
from ..io._visium_hd import BINNED_OUTPUTS
from ._synthetic import BLOCK_PX, TRUTH_LABELS_KEY, TRUTH_TABLE_KEY, _render, _truth_table
from ._synthetic_cells import GRID_UM, make_layout, sample_cells
from ._synthetic_expression import RNA_CONTENT, _type_of, expression_profiles, reference
from ._synthetic_render import BlockRenderer, random_stain

HD_BIN_UM = 2
"""Side of Visium HD's finest bins (µm); the coarser bins are sums of blocks of them."""
_CELL_BATCH = 4096
_SCALEF = {"tissue_hires_scalef": 0.2, "tissue_lowres_scalef": 0.05}


@inject_docs
def synthetic_visium_hd(
    path: str | PathLike,
    *,
    seed: int = 0,
    width_um: float = 400.0,
    height_um: float = 400.0,
    mpp: float = 0.5,
    bin_sizes_um=(2, 8, 16),
    umi_per_cell: float = 200.0,
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[Path, SpatialData, ad.AnnData]:
    """Write the synthetic slide as a Visium HD Space Ranger ``outs`` folder, for :func:`~histocell_sd.io.read_visium_hd`.

    The tissue and cells are those of :func:`synthetic_visium` (same generator, H&E rendered with its
    ground truth). Each cell's expression (its state's profile × its type's RNA content ×
    ``umi_per_cell``, Poisson) is spread uniformly over the 2 µm bins its cell body (the nucleus ellipse
    scaled by the state's cytoplasm factor) covers; 8 and 16 µm bins are sums of 4×4 and 8×8 blocks of 2 µm
    bins, so every bin size holds the same molecules. The filtered matrices keep the bins under tissue or
    with counts.

    Parameters
    ----------
    path
        Folder to write (created; must not exist unless ``overwrite``).
    {seed}
    width_um, height_um
        Size of the slide, µm (cropped to whole 16 µm bins).
    mpp
        µm per pixel of the full-resolution H&E (``tissue_image.tif``).
    bin_sizes_um
        Bin sizes written (multiples of 2 µm dividing the largest).
    umi_per_cell
        Mean UMIs of a cell (× its type's RNA content); Visium HD captures a few hundred per cell.
    overwrite
        Replace an existing folder at ``path`` (only one this function wrote: it has ``feature_slice.h5``).
    {progress}

    Returns
    -------
    tuple
        ``(path, truth, reference)``: the folder; a SpatialData with the ground truth for scoring in the
        layout of :func:`synthetic_visium` (labels ``"truth_labels"`` and the table ``"truth_nuclei"`` with
        ``obs`` ``cell_type``, ``cell_state``, ``compartment`` and, per bin size, ``square_<XXX>um`` = the
        barcode of the bin holding the nucleus centre; ``obsm["spatial"]`` px), to add to the sample read
        from the folder; and a single-cell reference (raw counts, ``obs["cell_type"]``, ``obs["cell_state"]``).
    """
    path = Path(path)
    mpp = check_mpp(mpp)
    sizes = _check_bin_sizes(bin_sizes_um)
    if not (np.isfinite(width_um) and np.isfinite(height_um) and min(width_um, height_um) >= sizes[-1]):
        raise InvalidInputError(f"width_um and height_um must be at least one {sizes[-1]} µm bin, got {width_um} and {height_um}.")
    if path.exists():
        if not overwrite:
            raise InvalidInputError(f"{path} exists; pass overwrite=True to replace it.")
        if not (path / "feature_slice.h5").is_file():
            raise InvalidInputError(f"{path} exists and is not a folder written by synthetic_visium_hd; refusing to replace it.")
    width_um, height_um = (float(np.floor(v / sizes[-1]) * sizes[-1]) for v in (width_um, height_um))

    rng = np.random.default_rng(seed)
    layout = make_layout(rng, width_um, height_um)
    cells = sample_cells(rng, layout)
    stain = random_stain(rng)
    profiles = expression_profiles(rng)
    n_cols, n_rows = int(round(width_um / HD_BIN_UM)), int(round(height_um / HD_BIN_UM))
    fine = _fine_bin_counts(rng, cells, profiles, n_cols, n_rows, umi_per_cell)  # (rows * cols) × genes, CSR
    ref = reference(rng, profiles)
    image, labels = _render(BlockRenderer(layout, cells, stain, mpp, seed), width_um, height_um, mpp, progress)
    tissue = _tissue_of_fine_bins(layout, n_cols, n_rows)

    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    Image.fromarray(image).save(path / "tissue_image.tif")
    _write_downscaled(path / "spatial", image)
    _write_feature_slice(path / "feature_slice.h5")
    genes = profiles.columns.astype(str)
    barcodes = {}
    for size in sizes:
        counts, in_tissue, rows, cols = _bin(fine, tissue, n_cols, n_rows, size // HD_BIN_UM)
        barcodes[size] = _write_bins(path / BINNED_OUTPUTS / f"square_{size:03d}um", size, counts, in_tissue, rows, cols, genes, mpp)
    _write_scalefactors(path / "spatial" / "scalefactors_json.json", sizes[0], mpp)

    truth_table = _truth_table(cells.assign(spot_id=np.nan), mpp)
    del truth_table.obs["spot_id"]
    for size, names in barcodes.items():
        col = np.floor(cells["x_um"].to_numpy() / size).astype(np.int64)
        row = np.floor(cells["y_um"].to_numpy() / size).astype(np.int64)
        barcode = pd.Series([f"s_{size:03d}um_{r:05d}_{c:05d}-1" for r, c in zip(row, col)], index=truth_table.obs_names)
        truth_table.obs[f"square_{size:03d}um"] = barcode.where(barcode.isin(names)).astype(object)
    truth = SpatialData(
        labels={TRUTH_LABELS_KEY: Labels2DModel.parse(labels, dims=("y", "x"), chunks=(BLOCK_PX, BLOCK_PX), transformations=pixel_transformations(mpp))},
        tables={TRUTH_TABLE_KEY: truth_table},
        attrs={"mpp": mpp, "synthetic": {"seed": int(seed), "width_um": width_um, "height_um": height_um}},
    )
    return path, truth, ref


def _check_bin_sizes(bin_sizes_um) -> list[int]:
    sizes = sorted({int(s) for s in np.atleast_1d(bin_sizes_um)})
    if not sizes or any(s <= 0 or s % HD_BIN_UM or sizes[-1] % s for s in sizes) or \
            any(float(s) != int(s) for s in np.atleast_1d(bin_sizes_um)):
        raise InvalidInputError(f"bin_sizes_um must be multiples of {HD_BIN_UM} µm that divide the largest, got {bin_sizes_um!r}.")
    return sizes


def _fine_bin_counts(rng, cells: pd.DataFrame, profiles: pd.DataFrame, n_cols: int, n_rows: int, umi_per_cell: float) -> sparse.csr_matrix:
    """Counts of the 2 µm bins (row-major: ``row * n_cols + col``): each cell's Poisson counts spread uniformly
    over the bins whose centres lie in its cell body (the bin of its centre when none does)."""
    state = cells["cell_state"].astype(str).to_numpy()
    content = np.array([RNA_CONTENT[_type_of(s)] for s in profiles.index])
    rows_of_state = pd.Index(profiles.index).get_indexer(state)
    scale = content[rows_of_state] * umi_per_cell
    bins, genes = [], []
    for start in range(0, len(cells), _CELL_BATCH):
        stop = min(start + _CELL_BATCH, len(cells))
        counts = rng.poisson(profiles.to_numpy()[rows_of_state[start:stop]] * scale[start:stop, None])  # cells × genes
        members, owner = _covered_bins(cells.iloc[start:stop], n_cols, n_rows)
        cell_of, gene_of = np.nonzero(counts)
        n = counts[cell_of, gene_of]
        mol_cell, mol_gene = np.repeat(cell_of, n), np.repeat(gene_of, n)
        first = np.searchsorted(owner, np.arange(stop - start))
        n_bins = np.bincount(owner, minlength=stop - start)
        pick = first[mol_cell] + np.floor(rng.random(len(mol_cell)) * n_bins[mol_cell]).astype(np.int64)
        kept = n_bins[mol_cell] > 0  # a cell centred outside the cropped slide covers no bin
        bins.append(members[pick[kept]])
        genes.append(mol_gene[kept].astype(np.int32))
    bins = np.concatenate(bins) if bins else np.zeros(0, np.int64)
    genes = np.concatenate(genes) if genes else np.zeros(0, np.int32)
    total = sparse.coo_matrix((np.ones(len(bins), np.float32), (bins, genes)), shape=(n_rows * n_cols, profiles.shape[1])).tocsr()
    total.sum_duplicates()
    return total


def _covered_bins(cells: pd.DataFrame, n_cols: int, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """``(bins, owner)``: the 2 µm bins each cell covers, grouped by cell (``owner`` sorted)."""
    x, y = cells["x_um"].to_numpy(), cells["y_um"].to_numpy()
    a = cells["cytoplasm"].to_numpy() * cells["major_um"].to_numpy() / 2
    b = cells["cytoplasm"].to_numpy() * cells["minor_um"].to_numpy() / 2
    cos, sin = np.cos(cells["angle"].to_numpy()), np.sin(cells["angle"].to_numpy())
    reach = int(np.ceil(a.max(initial=0.0) / HD_BIN_UM)) + 1
    offsets = np.arange(-reach, reach + 1)
    col0, row0 = np.floor(x / HD_BIN_UM).astype(np.int64), np.floor(y / HD_BIN_UM).astype(np.int64)
    cols = col0[:, None, None] + offsets[None, None, :]
    rows = row0[:, None, None] + offsets[None, :, None]
    dx = (cols + 0.5) * HD_BIN_UM - x[:, None, None]
    dy = (rows + 0.5) * HD_BIN_UM - y[:, None, None]
    u = dx * cos[:, None, None] + dy * sin[:, None, None]
    v = -dx * sin[:, None, None] + dy * cos[:, None, None]
    inside = (u / a[:, None, None]) ** 2 + (v / b[:, None, None]) ** 2 <= 1
    inside |= (offsets[None, :, None] == 0) & (offsets[None, None, :] == 0)  # the bin of the centre, always
    inside &= (cols >= 0) & (cols < n_cols) & (rows >= 0) & (rows < n_rows)
    owner, r, c = np.nonzero(inside)
    return (rows * n_cols + cols)[owner, r, c], owner


def _tissue_of_fine_bins(layout, n_cols: int, n_rows: int) -> np.ndarray:
    """Whether each 2 µm bin lies under tissue (the layout's tissue field at its centre), row-major."""
    cy, cx = np.meshgrid((np.arange(n_rows) + 0.5) * HD_BIN_UM, (np.arange(n_cols) + 0.5) * HD_BIN_UM, indexing="ij")
    i = np.clip(np.round(cy / GRID_UM).astype(int), 0, layout.tissue.shape[0] - 1)
    j = np.clip(np.round(cx / GRID_UM).astype(int), 0, layout.tissue.shape[1] - 1)
    return (np.asarray(layout.tissue, dtype=np.float64)[i, j] > 0.5).ravel()


def _bin(fine: sparse.csr_matrix, tissue: np.ndarray, n_cols: int, n_rows: int, factor: int):
    """Counts of the bins of ``factor`` × ``factor`` fine bins: ``(counts, in_tissue, rows, cols)``, row-major."""
    fine_rows, fine_cols = np.divmod(np.arange(n_rows * n_cols), n_cols)
    m_cols = n_cols // factor
    coarse = (fine_rows // factor) * m_cols + fine_cols // factor
    n_coarse = (n_rows // factor) * m_cols
    pool = sparse.csr_matrix((np.ones(len(coarse), np.float32), (coarse, np.arange(len(coarse)))), shape=(n_coarse, len(coarse)))
    counts = (pool @ fine).tocsr()
    in_tissue = (pool @ tissue.astype(np.float32)) > 0
    rows, cols = np.divmod(np.arange(n_coarse), m_cols)
    return counts, in_tissue, rows, cols


def _write_bins(folder: Path, size: int, counts, in_tissue, rows, cols, genes, mpp: float) -> pd.Index:
    """One ``binned_outputs/square_<XXX>um`` folder; returns the barcodes of its filtered matrix."""
    (folder / "spatial").mkdir(parents=True)
    barcodes = pd.Index([f"s_{size:03d}um_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols)])
    keep = np.flatnonzero(in_tissue | (np.diff(counts.indptr) > 0))
    side_px = size / mpp
    positions = pd.DataFrame({
        "barcode": barcodes,
        "in_tissue": in_tissue.astype(np.int32),
        "array_row": rows.astype(np.int32),
        "array_col": cols.astype(np.int32),
        "pxl_row_in_fullres": (rows + 0.5) * side_px,
        "pxl_col_in_fullres": (cols + 0.5) * side_px,
    })
    positions.to_parquet(folder / "spatial" / "tissue_positions.parquet", index=False)
    _write_scalefactors(folder / "spatial" / "scalefactors_json.json", size, mpp)
    write_10x_h5(folder / "filtered_feature_bc_matrix.h5", barcodes[keep], counts[keep], genes)
    return barcodes[keep]


def _write_scalefactors(file: Path, size: int, mpp: float) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    factors = {"spot_diameter_fullres": size / mpp, "bin_size_um": float(size), "microns_per_pixel": mpp,
               "regist_target_img_scalef": _SCALEF["tissue_hires_scalef"], **_SCALEF}
    file.write_text(json.dumps(factors, indent=2))


def _write_downscaled(folder: Path, image: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for res, factor in _SCALEF.items():
        size = (max(1, round(image.shape[1] * factor)), max(1, round(image.shape[0] * factor)))
        Image.fromarray(image).resize(size, Image.Resampling.BILINEAR).save(folder / f"tissue_{res.split('_')[1]}_image.png")


def _write_feature_slice(file: Path) -> None:
    """The slide-layout metadata spatialdata-io reads (file format 1.0; identity transforms)."""
    identity = np.eye(3).ravel().tolist()
    metadata = {
        "hd_layout_json": json.dumps({"file_format": "1.0", "transform": identity}),
        "transform_matrices": {key: identity for key in ("cytassist_colrow_to_spot_colrow", "spot_colrow_to_cytassist_colrow",
                                                         "microscope_colrow_to_spot_colrow", "spot_colrow_to_microscope_colrow")},
    }
    with h5py.File(file, "w") as f:
        f.attrs["metadata_json"] = json.dumps(metadata)


def write_10x_h5(file: Path, barcodes, counts, genes, *, attrs: dict | None = None) -> None:
    """A Space Ranger feature-barcode matrix (``/matrix``: genes × barcodes, CSC), as scanpy reads it.

    ``counts`` is barcodes × genes (dense or sparse); ``attrs`` replace the file attributes (default: the software version).
    """
    matrix = sparse.csc_matrix(counts.T)
    genes = [str(g) for g in genes]
    with h5py.File(file, "w") as f:
        f.attrs.update(attrs if attrs is not None else {"software_version": "spaceranger-3.0.0 (synthetic)"})
        g = f.create_group("matrix")
        g.create_dataset("barcodes", data=np.array([str(b) for b in barcodes], dtype="S"))
        g.create_dataset("data", data=np.rint(matrix.data).astype(np.int32), compression="gzip")
        g.create_dataset("indices", data=matrix.indices.astype(np.int64), compression="gzip")
        g.create_dataset("indptr", data=matrix.indptr.astype(np.int64))
        g.create_dataset("shape", data=np.array(matrix.shape, dtype=np.int32))
        features = g.create_group("features")
        features.create_dataset("id", data=np.array([f"SYN{j:08d}" for j in range(len(genes))], dtype="S"))
        features.create_dataset("name", data=np.array(genes, dtype="S"))
        features.create_dataset("feature_type", data=np.array(["Gene Expression"] * len(genes), dtype="S"))
        features.create_dataset("genome", data=np.array(["synthetic"] * len(genes), dtype="S"))
        features.create_dataset("_all_tag_keys", data=np.array([b"genome"]))
