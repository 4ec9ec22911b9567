"""The pipeline commands of ``histocell-sd``: import, segment, deconvolve, train, predict, refine, export.

Each reads a zarr store (``import`` builds one), runs one step of the package and writes the result: into
the store itself (``segment``, ``deconvolve``, ``predict``, ``refine``, which add only their own elements and
replace what the store already has of them only with ``--overwrite``), or to ``--out`` (refused when it exists unless ``--overwrite``, and always refused when it is,
contains or lies inside an input).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from .._constants import CELL_TYPE_KEY, HISTOCELL_KEY, PROPORTIONS_KEY, TABLE_KEY
from .._device import check_device, resolve_device
from .._errors import InvalidInputError


def _check_out(out: Path, inputs: list[Path], overwrite: bool, *, in_place: Path | None = None, option: str = "--out ") -> None:
    """Refuse an output that is, contains or lies in an input (``in_place`` excepted), or exists without ``overwrite``.

    ``option`` names the output in messages (``""`` for the positional store of ``import``).
    """
    target = out.resolve()
    if in_place is not None and target == in_place.resolve():
        return
    for source in inputs:
        source_r = source.resolve()
        if target == source_r or target in source_r.parents or source_r in target.parents:
            raise InvalidInputError(f"{option}{out} is, contains or lies inside the input {source}; writing it would destroy that input. "
                                    f"Choose another {option.strip() or 'store'}.")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise InvalidInputError(f"{option}{out} already exists; pass --overwrite to replace it.")


def _json_option(text: str | None, option: str) -> dict | None:
    """The JSON object given to ``option``, refusing malformed JSON with a message naming the option."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidInputError(f"{option} is not valid JSON ({error}); quote names, e.g. {option} '{{\"tumor\": [\"a\", \"b\"]}}'.") from None
    if not isinstance(value, dict):
        raise InvalidInputError(f"{option} must be a JSON object {{\"name\": [\"...\", ...]}}, got {text!r}.")
    return value


def _read_store(store: Path):
    from .. import io

    return io.read_zarr(store)


def _keep_in_place(store: Path, out: Path | None, overwrite: bool, what: str, how: str) -> None:
    """Refuse to replace ``what`` in ``store`` itself (no ``--out``) unless ``--overwrite``."""
    if out is None and not overwrite:
        raise InvalidInputError(f"{store} already has {what}; {how}: pass --overwrite to do so, or --out to write a new store.")


def _write_store(sdata, store: Path, out: Path | None, overwrite: bool, inputs: list[Path]) -> Path:
    """Write ``sdata`` back into ``store`` (in place) or to ``out``."""
    from .. import io

    if out is None:
        return io.write_zarr(sdata, store, overwrite=True)  # the store this command was given: its own result
    _check_out(out, inputs, overwrite, in_place=store)
    return io.write_zarr(sdata, out, overwrite=True)


def _check_reference_path(path: Path) -> None:
    if not path.is_file():
        raise InvalidInputError(f"--reference {path} does not exist (an .h5ad single-cell reference with counts in X).")


def _read_reference(path: Path):
    """The single-cell reference (.h5ad, counts in X)."""
    import anndata as ad

    _check_reference_path(path)
    try:
        return ad.read_h5ad(path)
    except (OSError, KeyError, ValueError) as error:
        raise InvalidInputError(f"--reference {path} is not a readable .h5ad file ({error}).") from None


def import_sample(out: Path, *, visium: Path | None, image: Path | None, spots: Path | None, mpp: float | None,
                  spot_diameter_um: float, counts: Path | None, proportions: Path | None, fullres_image: Path | None,
                  sample_id: str | None, overwrite: bool, visium_hd: Path | None = None, bin_size_um: int = 8) -> str:
    """Build a store from a Space Ranger folder (Visium or Visium HD), or from an H&E image + spot centres + µm/px."""
    from .. import io

    sources = [name for name, value in (("--visium", visium), ("--visium-hd", visium_hd), ("--image", image)) if value is not None]
    image_options = [name for name, value in (("--spots", spots), ("--mpp", mpp), ("--counts", counts)) if value is not None]
    if len(sources) > 1 or (sources and sources[0] != "--image" and image_options):
        raise InvalidInputError("Give either --visium or --visium-hd (a Space Ranger folder) or --image with --mpp (and --spots, --counts), "
                                f"not several; got {', '.join(sources + image_options)}.")
    if fullres_image is not None and not fullres_image.is_absolute() and fullres_image.exists():
        fullres_image = fullres_image.resolve()  # a path from here; otherwise a file name inside the Space Ranger folder
    inputs = [p for p in (visium, visium_hd, image, spots, counts, proportions, fullres_image) if p is not None]
    _check_out(out, inputs, overwrite, option="")
    if visium is not None:
        sdata = io.read_visium(visium, fullres_image_file=fullres_image, sample_id=sample_id)
    elif visium_hd is not None:
        sdata = io.read_visium_hd(visium_hd, bin_size_um=bin_size_um, fullres_image_file=fullres_image, sample_id=sample_id)
    else:
        if image is None or mpp is None:
            raise InvalidInputError("Give --visium DIR, --visium-hd DIR, or --image FILE with --mpp (µm per pixel) and optionally --spots CSV.")
        sdata = io.from_arrays(_read_image(image), mpp, spot_centers=_read_spots(spots) if spots else None,
                               spot_diameter_um=spot_diameter_um, counts=_read_counts(counts) if counts else None,
                               sample_id=sample_id or image.stem)
    if proportions is not None:
        io.read_proportions(proportions, sdata)
    io.write_zarr(sdata, out, overwrite=overwrite)
    spots_n = sdata.tables["table"].n_obs if "table" in sdata.tables else 0
    return f"{out}: image {tuple(io.get_image(sdata).shape[1:])} px at {sdata.attrs['mpp']:.4g} µm/px, {spots_n} spots"


def _read_image(path: Path):
    import numpy as np
    from PIL import Image

    if not path.is_file():
        raise InvalidInputError(f"--image {path} does not exist.")
    if path.suffix.lower() in (".tif", ".tiff"):
        return _read_tiff(path)
    Image.MAX_IMAGE_PIXELS = None  # whole-slide crops are large on purpose
    try:
        with Image.open(path) as im:
            if im.mode in ("RGB", "RGBA") and any(";16" in str(tile[3]) for tile in im.tile):  # Pillow keeps only the high byte
                raise InvalidInputError(f"--image {path} has 16 bits per colour channel; save it with 8 (0-255) or as a TIFF.")
            # RGB(A) and greyscale keep their values and dtype, so that from_arrays refuses 16-bit or grey images
            # with its hints (converting to RGB clipped 16-bit grey to white); palette and CMYK images become RGB
            return np.asarray(im if im.mode in ("RGB", "RGBA", "L", "I", "I;16", "I;16B", "F") else im.convert("RGB"))
    except OSError as error:
        raise InvalidInputError(f"--image {path} is not an image Pillow can read ({error}).") from None


def _read_tiff(path: Path):
    """The largest page of a TIFF at its own dtype, channels last (a thumbnail or a lower level may come first; a warning
    says when there are several pages)."""
    import numpy as np
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            pages = list(tif.pages)
            largest = max(pages, key=lambda page: page.imagewidth * page.imagelength)
            if len(pages) > 1:
                warnings.warn(f"--image {path} holds {len(pages)} pages; the largest, {largest.imagelength} × {largest.imagewidth} px, "
                              "was read.", stacklevel=2)
            image = largest.asarray()
            if largest.photometric == tifffile.PHOTOMETRIC.PALETTE and largest.colormap is not None:
                image = np.round(largest.colormap.T[image] / (257 if largest.colormap.max() > 255 else 1)).astype(np.uint8)
    except (tifffile.TiffFileError, ValueError, OSError) as error:
        raise InvalidInputError(f"--image {path} is not a TIFF tifffile can read ({error}).") from None
    if image.ndim == 3 and image.shape[0] in (3, 4) and image.shape[-1] not in (3, 4):
        image = np.moveaxis(image, 0, -1)  # planar (separate colour planes)
    return image


def _read_spots(path: Path):
    import pandas as pd

    if not path.is_file():
        raise InvalidInputError(f"--spots {path} does not exist.")
    frame = pd.read_csv(path, index_col=0, sep=None, engine="python")
    missing = {"x", "y"} - set(frame.columns)
    if missing:
        raise InvalidInputError(f"--spots {path} needs columns x and y (pixels of the image), indexed by barcode; it has {list(frame.columns)}.")
    return frame[["x", "y"]]


def _read_counts(path: Path):
    import anndata as ad

    if path.suffix != ".h5ad" or not path.is_file():
        raise InvalidInputError(f"--counts {path} must be an existing .h5ad file (spots × genes, rows named by barcode).")
    return ad.read_h5ad(path)


def segment(store: Path, *, out: Path | None, n_jobs: int, method: str, device: str | None, progress: bool, overwrite: bool) -> str:
    """Segment the nuclei of a store."""
    if device is not None:
        check_device(device)  # a bad --device is reported before anything else
    from .. import pp

    sdata = _read_store(store)
    nuclei = sdata.tables.get("histocell")
    if nuclei is not None:
        predicted = " with predictions" if "cell_type" in nuclei.obs else ""
        _keep_in_place(store, out, overwrite, f"{nuclei.n_obs} nuclei{predicted}", "segmenting again replaces them and everything computed from them")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No nuclei found")  # said below, as the error
        pp.segment_nuclei(sdata, method=method, n_jobs=n_jobs, device=device, progress=progress)
    if HISTOCELL_KEY not in sdata.tables:
        raise InvalidInputError(f"No nuclei found in the image of {store}; nothing was written. Is it H&E, not blank or very dark, "
                                f"at the {sdata.attrs.get('mpp')} µm/px the store records (µm per pixel, set by import --mpp)?")
    target = _write_store(sdata, store, out, overwrite, [store])
    return f"{target}: {sdata.tables[HISTOCELL_KEY].n_obs} nuclei"


def deconvolve(store: Path, *, reference: Path, out: Path | None, method: str, cell_type_key: str, state_key: str | None,
               device: str | None, progress: bool, overwrite: bool) -> str:
    """Spot proportions from expression against a single-cell reference."""
    resolve_device(device)  # a bad --device is reported before anything else
    from .. import tl

    _check_reference_path(reference)
    sdata = _read_store(store)
    spots = sdata.tables.get(TABLE_KEY)
    if spots is not None and PROPORTIONS_KEY in spots.obsm:
        _keep_in_place(store, out, overwrite, f"spot proportions (tables[{TABLE_KEY!r}].obsm[{PROPORTIONS_KEY!r}])", "deconvolving again replaces them")
    ref = _read_reference(reference)
    tl.deconvolve(sdata, ref, method=method, cell_type_key=cell_type_key, state_key=state_key, device=device, progress=progress)
    target = _write_store(sdata, store, out, overwrite, [store, reference])
    return f"{target}: obsm['proportions'] of {sdata.tables['table'].n_obs} spots ({method})"


def train(stores: list[Path], *, out: Path, epochs: int | None, states: str | None, compartments: str | None, seed: int,
          device: str | None, progress: bool, overwrite: bool) -> str:
    """Train a model on the spot proportions of one or more segmented stores."""
    from ..models import HistoCell

    state_map, compartment_map = _json_option(states, "--states"), _json_option(compartments, "--compartments")
    _check_out(out, stores, overwrite)
    samples = [_read_store(s) for s in stores]
    table = samples[0].tables.get("table")
    if table is None or "proportions" not in table.obsm:
        raise InvalidInputError(f"{stores[0]} has no spot proportions (tables['table'].obsm['proportions']); run `histocell-sd deconvolve` first.")
    cell_types = list(table.obsm["proportions"].columns)
    state_map = state_map if state_map is not None else samples[0].attrs.get("cell_states")
    model = HistoCell(cell_types, states=state_map, compartments=compartment_map)
    model.fit(samples, epochs=epochs, seed=seed, device=device, progress=progress)
    model.save(out, overwrite=overwrite)
    return f"model saved to {out}: {json.dumps(model.training_summary_)}"


def predict(store: Path, *, models: list[Path], out: Path | None, device: str | None, progress: bool, overwrite: bool) -> str:
    """Predict every nucleus of a segmented store with one saved (or shipped) model, or several as one ensemble."""
    resolve_device(device)  # a bad --device is reported before anything else
    from .. import tl
    from ..models import PRETRAINED, HistoCell, pretrained

    if out is not None:
        _check_out(out, [store, *models], overwrite, in_place=store)
    def load(m: Path) -> HistoCell:
        if not m.exists() and str(m) in PRETRAINED:
            return pretrained(str(m))
        try:
            return HistoCell.load(m)
        except InvalidInputError as error:
            if m.exists():
                raise
            raise InvalidInputError(f"{error} Nor is {str(m)!r} a shipped model ({', '.join(sorted(PRETRAINED))}).") from None

    loaded = [load(m) for m in models]  # small; a wrong --model is reported before the store's state
    sdata = _read_store(store)
    if HISTOCELL_KEY not in sdata.tables:
        raise InvalidInputError(f"{store} has no nuclei; run `histocell-sd segment {store}` first.")
    if CELL_TYPE_KEY in sdata.tables[HISTOCELL_KEY].obs:
        _keep_in_place(store, out, overwrite, f"predictions (tables[{HISTOCELL_KEY!r}].obs[{CELL_TYPE_KEY!r}], ...)", "predicting again replaces them")
    tl.predict(sdata, loaded[0] if len(loaded) == 1 else loaded, device=device, progress=progress)
    target = _write_store(sdata, store, out, overwrite, [store, *models])
    counts = sdata.tables["histocell"].obs["cell_type"].value_counts().to_dict()
    return f"{target}: {counts}"


def refine(store: Path, *, reference: Path | None, out: Path | None, progress: bool, overwrite: bool) -> str:
    """Histology-refined deconvolution: spot counts (or proportions) × nucleus predictions."""
    from .. import tl

    if reference is not None:
        _check_reference_path(reference)
    sdata = _read_store(store)
    spots = sdata.tables.get(TABLE_KEY)
    if spots is not None and "refined_proportions" in spots.obsm:
        _keep_in_place(store, out, overwrite, f"refined proportions (tables[{TABLE_KEY!r}].obsm['refined_proportions'])", "refining again replaces them")
    ref = _read_reference(reference) if reference is not None else None
    tl.refine_deconvolution(sdata, ref, progress=progress)
    target = _write_store(sdata, store, out, overwrite, [store] + ([reference] if reference else []))
    return f"{target}: obsm['refined_proportions'], obs['refined_cell_type']" + (", tables['histocell_expression']" if ref is not None else "")


def export(store: Path, *, out: Path, format: str, overwrite: bool) -> str:
    """Nuclei with their predictions as QuPath GeoJSON or a CSV table."""
    from .. import io

    _check_out(out, [store], overwrite)
    sdata = _read_store(store)
    table = sdata.tables.get("histocell")
    predicted = table is not None and "cell_type" in table.obs
    if format == "geojson":
        io.write_geojson(sdata, out, cluster_key="cell_type" if predicted else None, proba_key="cell_type_proba" if predicted else None,
                         overwrite=overwrite)
    else:
        io.write_csv(sdata, out, proba_key="cell_type_proba" if predicted else None, overwrite=overwrite)
    return f"{out}: {table.n_obs if table is not None else 0} nuclei ({format})"
