"""tl.run_cohort: segment → predict → indicators per slide, failures reported, resume, dask."""

import os
import time
import warnings

import numpy as np
import pytest

import histocell_sd as hc
from histocell_sd import tl
from histocell_sd.models import HistoCell

SIDE_UM = 250


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """Three tiny synthetic slides as zarr, one corrupted path, and a quickly trained tiny model."""
    root = tmp_path_factory.mktemp("cohort")
    paths = []
    for seed in (21, 22, 23):
        sdata, _ = hc.datasets.synthetic_visium(seed=seed, preset="tiny", width_um=SIDE_UM, height_um=SIDE_UM, progress=False)
        paths.append(hc.io.write_zarr(sdata, root / f"slide_{seed}.zarr"))
    train, _ = hc.datasets.synthetic_visium(seed=21, preset="tiny", width_um=SIDE_UM, height_um=SIDE_UM, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hc.pp.segment_nuclei(train, progress=False)
        model = HistoCell(hc.datasets.CELL_TYPES, states=hc.datasets.CELL_STATES, dim=16).fit(train, epochs=1, state_epochs=0, progress=False)
    bad = root / "broken.zarr"
    bad.mkdir()
    (bad / "zarr.json").write_text("not json")
    return paths, bad, model


def test_synchronous_failure_and_resume(slides, tmp_path):
    paths, bad, model = slides
    t0 = time.perf_counter()
    ind, failures = tl.run_cohort([*paths, bad], model, out_dir=tmp_path, client="synchronous", progress=False,
                                  indicator_kwargs={"n_perms": 5})
    first = time.perf_counter() - t0
    assert list(ind.obs_names) == ["slide_21", "slide_22", "slide_23"]
    assert (ind.obs["status"] == "computed").all()
    assert ind.n_vars > 10 and np.isfinite(ind.obs["n_nuclei"]).all() and (ind.obs["n_nuclei"] > 0).all()
    assert list(failures["sample"]) == ["broken"] and "broken" in failures.loc[0, "path"] and failures.loc[0, "error"]
    assert (tmp_path / "model" / "model.safetensors").exists() or any((tmp_path / "model").iterdir())
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.h5ad")}
    assert len(stamps) == 3
    t0 = time.perf_counter()
    again, failures2 = tl.run_cohort([*paths, bad], model, out_dir=tmp_path, client="synchronous", progress=False,
                                     indicator_kwargs={"n_perms": 5, "area_method": "grid"})  # the default given: the same settings
    second = time.perf_counter() - t0
    assert (again.obs["status"] == "resumed").all() and len(failures2) == 1
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.h5ad")} == stamps
    np.testing.assert_allclose(again.X, ind.X, equal_nan=True)
    print(f"run_cohort synchronous: first {first:.1f}s, resume {second:.1f}s")


def test_local_cluster_matches_synchronous(slides, tmp_path, monkeypatch):
    paths, bad, model = slides
    sync, _ = tl.run_cohort(paths[:2], model, out_dir=tmp_path / "sync", client="synchronous", progress=False,
                            indicator_kwargs={"n_perms": 5})
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)  # unset, as in a fresh shell: the cluster sets them to 1 for its workers
    t0, environ = time.perf_counter(), dict(os.environ)
    ind, failures = tl.run_cohort([paths[1], bad, paths[0]], model, out_dir=tmp_path / "dask", progress=False,
                                  indicator_kwargs={"n_perms": 5})
    # the cluster's OMP_NUM_THREADS=1 (for its workers) must not stay behind: it would pin later subprocesses to one thread
    assert dict(os.environ) == environ
    print(f"run_cohort LocalCluster(2 workers), 2 slides + 1 broken: {time.perf_counter() - t0:.1f}s")
    assert list(ind.obs_names) == ["slide_22", "slide_21"]
    assert list(failures["sample"]) == ["broken"]
    np.testing.assert_allclose(ind[sync.obs_names].X, sync.X, rtol=1e-6, equal_nan=True)


def test_invalid_inputs(slides, tmp_path):
    paths, _, model = slides
    with pytest.raises(hc.InvalidInputError, match="untrained"):
        tl.run_cohort(paths, HistoCell(["a", "b"]), out_dir=tmp_path)
    with pytest.raises(hc.InvalidInputError, match="unique"):
        tl.run_cohort([paths[0], paths[0]], model, out_dir=tmp_path)
    with pytest.raises(hc.InvalidInputError, match="client"):
        tl.run_cohort(paths[:1], model, out_dir=tmp_path, client=3, progress=False)
    out = tmp_path / "out"  # own case cohort_bad_inputs: each is refused before out_dir is created
    with pytest.raises(hc.InvalidInputError, match="neither 'synchronous' nor a scheduler address"):
        tl.run_cohort(paths[:1], model, out_dir=out, client="sync", progress=False)
    with pytest.raises(hc.InvalidInputError, match="single path"):
        tl.run_cohort(str(paths[0]), model, out_dir=out, progress=False)
    with pytest.raises(hc.InvalidInputError, match="no folder at"):
        tl.run_cohort(paths[:1], tmp_path / "missing_model", out_dir=out, progress=False)
    with pytest.raises(hc.InvalidInputError, match="missing model_card.json"):  # a folder that is not a checkpoint
        tl.run_cohort(paths[:1], paths[0].parent, out_dir=out, progress=False)
    with pytest.raises(hc.InvalidInputError, match="a trained HistoCell or the folder"):
        tl.run_cohort(paths[:1], [model, model], out_dir=out, progress=False)
    with pytest.raises(hc.InvalidInputError, match="indicator_kwargs does not fit spatial_indicators"):
        tl.run_cohort(paths[:1], model, out_dir=out, indicator_kwargs={"n_perm": 5}, progress=False)
    with pytest.raises(hc.InvalidInputError, match="segment_kwargs must be a dict"):
        tl.run_cohort(paths[:1], model, out_dir=out, segment_kwargs=["classical"], progress=False)
    with pytest.raises(hc.InvalidInputError, match="would overwrite the input stores"):
        tl.run_cohort(paths[:1], model, out_dir=paths[0].parent, save_predictions=True, progress=False)
    assert not out.exists()


def test_another_model_is_refused_on_resume_and_used_when_asked(slides, tmp_path):
    # own case cohort_resume_other_model, own case cohort_model_cache_stale (workers cached models by folder)
    paths, _, model = slides
    kwargs = {"out_dir": tmp_path, "client": "synchronous", "progress": False, "indicator_kwargs": {"n_perms": 5}}
    first, _ = tl.run_cohort(paths[:1], model, **kwargs)
    assert "frac_fibroblast" in first.var_names
    result = tmp_path / "slide_21.h5ad"
    stamp = result.stat().st_mtime_ns
    other = hc.models.pretrained("tumor_stromal_lymphocyte")
    with pytest.raises(hc.InvalidInputError, match="results of another model"):
        tl.run_cohort(paths[:1], other, **kwargs)
    assert result.stat().st_mtime_ns == stamp
    assert HistoCell.load(tmp_path / "model").cell_types == model.cell_types  # the saved model is left as it was
    again, failures = tl.run_cohort(paths[:1], other, overwrite=True, **kwargs)
    assert failures.empty and (again.obs["status"] == "computed").all()
    assert "frac_stromal" in again.var_names and "frac_fibroblast" not in again.var_names
    resumed, _ = tl.run_cohort(paths[:1], tmp_path / "model", **kwargs)  # the folder now holds that same model
    assert (resumed.obs["status"] == "resumed").all()


def test_resume_refuses_results_of_other_settings(slides, tmp_path):
    # own case cohort_resume_other_settings
    # probe: a resume with area_method="hull" kept the grid areas of finished slides and computed the others with
    # the hull, so density_* mixed two definitions in one column
    paths, _, model = slides
    kwargs = {"out_dir": tmp_path, "client": "synchronous", "progress": False}
    tl.run_cohort(paths[:1], model, indicator_kwargs={"n_perms": 0}, **kwargs)
    stamp = (tmp_path / "slide_21.h5ad").stat().st_mtime_ns
    with pytest.raises(hc.InvalidInputError, match=r"other settings .*area_method.*'grid' then, 'hull' now"):
        tl.run_cohort(paths[:2], model, indicator_kwargs={"n_perms": 0, "area_method": "hull"}, **kwargs)
    with pytest.raises(hc.InvalidInputError, match="min_area_um2"):
        tl.run_cohort(paths[:1], model, segment_kwargs={"min_area_um2": 5.0}, indicator_kwargs={"n_perms": 0}, **kwargs)
    assert sorted(p.name for p in tmp_path.glob("*.h5ad")) == ["slide_21.h5ad"]
    assert (tmp_path / "slide_21.h5ad").stat().st_mtime_ns == stamp
    same, _ = tl.run_cohort(paths[:1], model, indicator_kwargs={"n_perms": 0, "cooc_radius_um": 30, "grid_um": 50}, **kwargs)
    assert (same.obs["status"] == "resumed").all()  # defaults given explicitly, as whole numbers: the same settings
    redone, _ = tl.run_cohort(paths[:2], model, indicator_kwargs={"n_perms": 0, "area_method": "hull"}, overwrite=True, **kwargs)
    assert (redone.obs["status"] == "computed").all()
    assert redone.uns["run_cohort"]["settings"] and '"area_method": "hull"' in redone.uns["run_cohort"]["settings"]
