"""hc.pl: image comparisons with committed baselines and structural checks that the plots stay readable.

The baselines under ``tests/baseline/`` are low-dpi renders of the tiny synthetic slide (seed 3). After an
intended change of a plot, regenerate them with ``HISTOCELL_UPDATE_BASELINES=1 pytest tests/test_pl.py``,
look at every PNG, and commit them.
"""

import os
import types
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex, to_rgb
from matplotlib.testing.compare import compare_images
from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

import histocell_sd as hc
from histocell_sd import pl
from histocell_sd._constants import PALETTE
from histocell_sd.pl._utils import MIN_DPI, SCALE_BAR_LABEL, round_length

BASELINE = Path(__file__).parent / "baseline"
UPDATE = bool(os.environ.get("HISTOCELL_UPDATE_BASELINES"))
TOLERANCE = 6.0  # RMS over 0-255 grey levels
WINDOW = (400, 800, 500, 950)  # y0, y1, x0, x1 of the segmented window
EXTENT = (530.0, 920.0, 430.0, 770.0)  # x_min, x_max, y_min, y_max: inside the window, cutting nuclei


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # spatialdata / spatialdata-plot deprecation chatter
        yield


@pytest.fixture(scope="module")
def slide():
    """Tiny slide with simulated predictions (nucleus circles, spot ``histocell_proportions``) and niches."""
    sdata, _ = hc.datasets.synthetic_visium(seed=3, preset="tiny", progress=False)
    hc.datasets.truth_as_predictions(sdata, proba=hc.datasets.confused_probabilities(sdata, seed=3))
    hc.tl.tissue_architecture(sdata, n_niches=3)
    return sdata


@pytest.fixture(scope="module")
def segmented():
    """Tiny slide with the nucleus polygons of a window (``pp.store_nuclei``) predicted by the pretrained model."""
    sdata, _ = hc.datasets.synthetic_visium(seed=3, preset="tiny", progress=False)
    y0, y1, x0, x1 = WINDOW
    hc.pp.store_nuclei(sdata, np.asarray(sdata.labels["truth_labels"])[y0:y1, x0:x1], offset=(x0, y0))
    hc.tl.predict(sdata, hc.models.pretrained("tumor_stromal_lymphocyte"), progress=False)
    return sdata


def history_model():
    n = 12
    history = pd.DataFrame({
        "stage": ["warm-up"] * 4 + ["joint"] * 8, "train_loss": np.linspace(1.0, 0.3, n), "val_loss": np.linspace(1.1, 0.45, n),
        "val_spot_pearson": np.linspace(0.2, 0.8, n),
    })  # fmt: skip
    return types.SimpleNamespace(history_=history)


def check_image(fig, name, tmp_path, dpi=40):
    """Compare ``fig`` rendered at ``dpi`` with ``tests/baseline/<name>.png`` (written instead with HISTOCELL_UPDATE_BASELINES=1)."""
    actual = tmp_path / f"{name}.png"
    fig.savefig(actual, dpi=dpi)
    expected = BASELINE / f"{name}.png"
    if UPDATE:
        BASELINE.mkdir(exist_ok=True)
        expected.write_bytes(actual.read_bytes())
    assert expected.exists(), f"no baseline {expected}; run with HISTOCELL_UPDATE_BASELINES=1 and commit it"
    assert expected.stat().st_size <= 60_000, f"baseline {expected.name} is {expected.stat().st_size} bytes; keep it small"
    result = compare_images(str(expected), str(actual), tol=TOLERANCE)
    assert result is None, result


def boxes_overlap(a, b, pad=0.0):
    return a.x0 < b.x1 - pad and b.x0 < a.x1 - pad and a.y0 < b.y1 - pad and b.y0 < a.y1 - pad


def inside_figure(fig, bbox, pad=1.0):
    fb = fig.bbox
    return bbox.x0 >= fb.x0 - pad and bbox.y0 >= fb.y0 - pad and bbox.x1 <= fb.x1 + pad and bbox.y1 <= fb.y1 + pad


def scale_bars(ax):
    return [a for a in ax.artists if isinstance(a, AnchoredSizeBar) and a.get_label() == SCALE_BAR_LABEL]


def data_centroids(collection, ax):
    """Area centroid of each (polygon) path of a collection, in data coordinates."""
    from shapely import Polygon

    to_data = collection.get_transform() - ax.transData
    return np.array([Polygon(to_data.transform(p.vertices)).centroid.coords[0] for p in collection.get_paths()])


# --- image comparisons -------------------------------------------------------------------------------------


def two_panel_proportions(sdata, **kwargs):
    fig, axes = plt.subplots(1, 2, figsize=(7, 3), layout="constrained")
    pl.spot_proportions(sdata, cell_type="tumor", proportions_key="true_proportions", ax=axes[0], title="truth", **kwargs)
    pl.spot_proportions(sdata, cell_type="tumor", proportions_key="histocell_proportions", ax=axes[1], title="predicted", **kwargs)
    return fig, axes


def test_image_spot_proportions(slide, tmp_path):
    fig, _ = two_panel_proportions(slide)
    check_image(fig, "spot_proportions", tmp_path)


def test_image_cell_types(segmented, tmp_path):
    fig = pl.cell_types(segmented, extent=EXTENT, figsize=(4.5, 3.2), return_fig=True)
    check_image(fig, "cell_types", tmp_path)


def test_image_niches(slide, tmp_path):
    check_image(pl.niches(slide, figsize=(3.6, 4), return_fig=True), "niches", tmp_path)


def test_image_predicted_vs_true(slide, tmp_path):
    check_image(pl.predicted_vs_true(slide, return_fig=True), "predicted_vs_true", tmp_path)


def test_image_confusion_matrix(slide, tmp_path):
    obs, truth = slide.tables["histocell"].obs, slide.tables["truth_nuclei"].obs
    check_image(pl.confusion_matrix(truth["cell_type"], obs["cell_type"], return_fig=True), "confusion_matrix", tmp_path)


def test_image_training_curve(tmp_path):
    check_image(pl.training_curve(history_model(), return_fig=True), "training_curve", tmp_path)


# --- structure ---------------------------------------------------------------------------------------------


def test_two_panel_colorbars_do_not_overprint_and_share_the_range(slide):
    fig, axes = two_panel_proportions(slide)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    colorbars = [a for a in fig.axes if a not in axes]
    assert len(colorbars) == 2
    panels = {id(a): a.get_tightbbox(renderer) for a in axes}  # with tick labels and titles
    for cbar in colorbars:
        box = cbar.get_tightbbox(renderer)
        assert inside_figure(fig, box)
        owner = min(axes, key=lambda a: abs(a.get_position().x1 - cbar.get_position().x0))
        for ax in axes:
            if ax is not owner:
                assert not boxes_overlap(box, panels[id(ax)]), "a colorbar overprints the neighbouring panel"
        assert not boxes_overlap(box, owner.get_window_extent())  # beside its own axes, not on it
    # the same colour range on both panels: the spot collections and the colorbars
    spot_limits = [tuple(c.norm.vmin for c in ax.collections) + tuple(c.norm.vmax for c in ax.collections) for ax in axes]
    assert spot_limits[0] == spot_limits[1]
    assert [tuple(c.get_ylim()) for c in colorbars] == [(0.0, 1.0), (0.0, 1.0)]


def test_spot_proportions_vmin_vmax(slide):
    values = slide.tables["table"].obsm["histocell_proportions"]["tumor"]
    ax = pl.spot_proportions(slide, cell_type="tumor", proportions_key="histocell_proportions", vmin=None, vmax=None)
    norm = ax.collections[0].norm
    assert (norm.vmin, norm.vmax) == pytest.approx((values.min(), values.max()))
    ax = pl.spot_proportions(slide, cell_type="tumor", vmin=0.1, vmax=0.6, scale_bar_um=None)
    assert (ax.collections[0].norm.vmin, ax.collections[0].norm.vmax) == (0.1, 0.6) and not scale_bars(ax)
    with pytest.raises(hc.InvalidInputError, match="vmax"):
        pl.spot_proportions(slide, cell_type="tumor", vmin=0.5, vmax=0.5)


def test_cell_types_nuclei_within_extent_and_scale_bar(segmented):
    x0, x1, y0, y1 = EXTENT
    ax = pl.cell_types(segmented, extent=EXTENT)
    fig = ax.figure
    assert ax.get_xlim() == (x0, x1) and ax.get_ylim() == (y1, y0)
    nuclei = [c for c in ax.collections if len(c.get_paths()) > 1]
    assert nuclei
    centres = segmented.shapes["nuclei"].geometry.centroid
    all_xy = np.c_[centres.x, centres.y]
    outside = ~((all_xy[:, 0] >= x0) & (all_xy[:, 0] <= x1) & (all_xy[:, 1] >= y0) & (all_xy[:, 1] <= y1))
    assert outside.sum() > 20  # the window holds nuclei outside the extent, which must not be drawn
    for collection in nuclei:
        xy = data_centroids(collection, ax)
        assert ((xy[:, 0] >= x0) & (xy[:, 0] <= x1) & (xy[:, 1] >= y0) & (xy[:, 1] <= y1)).all()
        # nuclei cut by the border end there: clipped to the axes box
        assert collection.get_clip_on() and collection.get_clip_box().bounds == pytest.approx(ax.bbox.bounds)
        assert len(xy) == (~outside).sum()
    # scale bar: a round length of about a fifth of the view, in µm
    (bar,) = scale_bars(ax)
    mpp = segmented.attrs["mpp"]
    assert bar.length_um == round_length((x1 - x0) * mpp / 5) and bar.txt_label.get_text() == f"{bar.length_um:g} µm"
    assert bar.size_bar.get_children()[0].get_width() == pytest.approx(bar.length_um / mpp)
    # legend beside the axes, inside the figure
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    assert inside_figure(fig, legend) and not boxes_overlap(legend, ax.get_window_extent())
    assert inside_figure(fig, ax.get_tightbbox())


def test_cell_types_uses_the_stored_colours(segmented):
    table = segmented.tables["histocell"]
    stored = dict(zip(table.obs["cell_type"].cat.categories, table.uns["cell_type_colors"]))
    ax = pl.cell_types(segmented, extent=EXTENT)
    legend = {t.get_text(): h.get_facecolor()[:3] for t, h in zip(ax.get_legend().get_texts(), ax.get_legend().legend_handles)}
    assert legend == {k: pytest.approx(to_rgb(v)) for k, v in stored.items()}
    fills = {tuple(np.round(fc[:3], 3)) for c in ax.collections for fc in c.get_facecolors() if fc[3] > 0}  # not the outlines
    assert len(fills) == table.obs["cell_type"].nunique()
    assert fills <= {tuple(np.round(to_rgb(v), 3)) for v in stored.values()}
    ax = pl.cell_types(segmented, extent=EXTENT, scale_bar_um=10, palette=["#000000", "#ffffff", "#00ff00"])
    assert scale_bars(ax)[0].txt_label.get_text() == "10 µm"


def test_cell_types_draws_the_image_the_nuclei_were_segmented_on(segmented):
    # own case pl_recorded_image
    # interop probe: with spatialdata-io's image names (no "he", several images) pl.cell_types refused "Several image
    # elements", although the nuclei table records its image, which tl.predict reads
    from spatialdata import SpatialData

    table = segmented.tables["histocell"].copy()
    table.uns["histocell"] = table.uns["histocell"] | {"image_key": "heart_full_image"}
    image = segmented.images["he"]
    view = SpatialData(images={"heart_full_image": image, "heart_hires_image": image}, shapes={"nuclei": segmented.shapes["nuclei"]},
                       tables={"histocell": table}, attrs=dict(segmented.attrs))
    ax = pl.cell_types(view, extent=EXTENT)
    assert ax.get_legend() is not None
    with pytest.raises(hc.InvalidInputError, match=r"Several image elements.*image_key=; hc.io.read_visium names the full-resolution H&E .he."):
        table.uns["histocell"].pop("image_key")
        pl.cell_types(view, extent=EXTENT)


def test_plots_refuse_a_sample_transformed_out_of_global(slide):
    # own case pl_transformed_sample
    # user probe: after spatialdata.transform(sdata, to_coordinate_system="um") only "um" is left, and the image plots
    # failed inside spatialdata-plot with "does not contain any coordinate system named 'global'"
    import spatialdata as sd

    moved = sd.transform(slide, to_coordinate_system="um")
    calls = [lambda: pl.cell_types(moved), lambda: pl.spot_proportions(moved, cell_type="tumor"), lambda: pl.niches(moved)]
    for call in calls:
        with pytest.raises(hc.InvalidInputError, match=r"not in the 'global' coordinate system \(it has \['um'\]\); the plots draw in 'global'"):
            call()
    assert list(sd.transformations.get_transformation(slide.images["he"], get_all=True)) == ["global", "um"]


def test_a_column_without_colours_reuses_the_colours_of_its_categories(slide):
    """``true_cell_type`` (tl.transfer_truth stores no colours) gets the predicted types' colours, type by type."""
    from spatialdata import SpatialData

    table = slide.tables["histocell"].copy()
    table.obs["true_cell_type"] = pd.Categorical(slide.tables["truth_nuclei"].obs["cell_type"].astype(str).to_numpy())  # sorted
    assert "true_cell_type_colors" not in table.uns
    view = SpatialData(images=dict(slide.images), shapes={"nuclei": slide.shapes["nuclei"]}, tables={"histocell": table})
    view.attrs.update(slide.attrs)

    def legend(ax):
        return {t.get_text(): to_hex(h.get_facecolor()) for t, h in zip(ax.get_legend().get_texts(), ax.get_legend().legend_handles)}

    predicted = legend(pl.cell_types(view, extent=(400, 700, 300, 600)))
    truth = legend(pl.cell_types(view, color="true_cell_type", extent=(400, 700, 300, 600)))
    assert list(truth) != list(predicted) and truth == predicted


def test_palette_stands_out_on_hematoxylin_and_eosin(tiny_slide):
    """Each colour of the first cell types differs from nuclei (hematoxylin) and stroma (eosin) of the synthetic H&E
    in lightness (ΔL* ≥ 20) or hue (≥ 60°, CIE Lab): the blue once used for endothelial cells did neither on nuclei."""
    from skimage.color import rgb2lab

    sdata = tiny_slide[0]
    image = np.asarray(hc.io.get_image(sdata)).transpose(1, 2, 0)[::4, ::4] / 255.0
    nucleus = np.asarray(sdata.labels["truth_labels"])[::4, ::4] > 0
    lab = rgb2lab(image)
    background = lab[~nucleus]
    stains = {"hematoxylin": lab[nucleus].mean(axis=0), "eosin": background[background[:, 0] < 90].mean(axis=0)}

    def visible(colour, stain):
        c = rgb2lab(np.array([[to_rgb(colour)]]))[0, 0]
        hue = np.degrees(np.arctan2(c[2], c[1]) - np.arctan2(stain[2], stain[1])) % 360
        return abs(c[0] - stain[0]) >= 20 or min(hue, 360 - hue) >= 60

    for colour in PALETTE[:5]:
        for name, stain in stains.items():
            assert visible(colour, stain), f"{colour} is hard to see on {name}"
    assert not visible("#1e40ff", stains["hematoxylin"]) and not visible("#e040fb", stains["eosin"])  # the rule bites


def test_predicted_vs_true_shared_unit_range(slide):
    axes = pl.predicted_vs_true(slide)
    n = slide.tables["table"].obsm["histocell_proportions"].shape[1]
    assert len(axes) == n
    for ax in axes:
        assert ax.get_xlim() == ax.get_ylim() == (-0.03, 1.03)
        assert ax.get_aspect() == 1.0
    fig, grid = plt.subplots(2, 3, layout="constrained")
    assert list(pl.predicted_vs_true(slide, axes=grid)) == list(grid.ravel()[:n])
    with pytest.raises(hc.InvalidInputError, match="one matplotlib Axes per cell type"):
        pl.predicted_vs_true(slide, axes=grid[0, :2])


def test_confusion_matrix_range_and_labels_inside(slide):
    obs, truth = slide.tables["histocell"].obs, slide.tables["truth_nuclei"].obs
    fig = pl.confusion_matrix(truth["cell_type"], obs["cell_type"], return_fig=True)
    (mesh,) = fig.axes[0].collections
    assert mesh.get_clim() == (0, 1)
    fig.canvas.draw()
    assert inside_figure(fig, fig.axes[0].get_tightbbox())


def test_confusion_matrix_pairs_series_by_index_and_refuses_nothing_to_show():
    # own case cm_index_order: two Series of the same nuclei in another order were paired by position
    ax = pl.confusion_matrix(pd.Series(["a", "b"], index=[0, 1]), pd.Series(["b", "a"], index=[1, 0]), normalize=False)
    np.testing.assert_array_equal(ax.collections[0].get_array().reshape(2, 2), [[1, 0], [0, 1]])
    for y_true, y_pred, labels in ([[], [], None], [[None, None], ["a", "b"], None], [["a"], ["a"], ["x", "y"]]):
        with pytest.raises(hc.InvalidInputError, match="nothing to show"):
            pl.confusion_matrix(y_true, y_pred, labels=labels)


def test_training_curve_one_legend_outside_the_data(slide):
    ax = pl.training_curve(history_model())
    fig = ax.figure
    fig.canvas.draw()
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["train loss", "validation loss", "validation spot r"]
    assert inside_figure(fig, legend.get_window_extent()) and not boxes_overlap(legend.get_window_extent(), ax.get_window_extent())
    assert inside_figure(fig, ax.get_tightbbox()) and inside_figure(fig, ax.r_axis.get_tightbbox())


def test_niches_legend_and_scale_bar(slide):
    ax = pl.niches(slide)
    fig = ax.figure
    fig.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    assert inside_figure(fig, legend) and not boxes_overlap(legend, ax.get_window_extent())
    assert len(scale_bars(ax)) == 1
    x0, x1, y0, y1 = 200, 900, 300, 1000
    ax = pl.niches(slide, extent=(x0, x1, y0, y1))
    assert ax.get_xlim() == (x0, x1) and ax.get_ylim() == (y1, y0)
    # own case pl_extent_zoom: a window where a niche region's centroid lies outside crashed in spatialdata-plot
    x0, x1, y0, y1 = 200, 600, 200, 600
    ax = pl.niches(slide, extent=(x0, x1, y0, y1))
    assert ax.get_xlim() == (x0, x1) and ax.get_ylim() == (y1, y0)


def test_windows_without_nuclei_spots_or_image(slide, segmented):
    # own case pl_unclear_keys
    # own case pl_extent_empty: an empty or outside window gave KeyError / AssertionError from spatialdata-plot
    with pytest.raises(hc.InvalidInputError, match="No 'nuclei' lie within extent"):
        pl.cell_types(segmented, extent=(0, 3, 0, 3))
    with pytest.raises(hc.InvalidInputError, match="extent must be four numbers"):
        pl.cell_types(segmented, extent=(0, 100, 0))
    with pytest.raises(hc.InvalidInputError, match="No table 'nope'"):
        pl.cell_types(segmented, nuclei_table_key="nope")
    far = (90000, 91000, 90000, 91000)
    for call in (lambda: pl.cell_types(segmented, extent=far), lambda: pl.niches(slide, extent=far),
                 lambda: pl.spot_proportions(slide, cell_type="tumor", extent=far)):
        with pytest.raises(hc.InvalidInputError, match="Nothing of the sample lies within extent"):
            call()


def test_look_settings_are_checked_before_anything_is_drawn(slide, segmented):
    # own case pl_look_settings: scale_bar_um="abc" gave float()'s ValueError after the image was drawn, fill_alpha=2 a
    # matplotlib error, a list as cell_type "unhashable type"
    before = plt.get_fignums()
    calls = {
        "cell_types": lambda **kw: pl.cell_types(segmented, extent=EXTENT, **kw),
        "niches": lambda **kw: pl.niches(slide, **kw),
        "spot_proportions": lambda **kw: pl.spot_proportions(slide, cell_type="tumor", **kw),
    }
    for call in calls.values():
        for bad, message in (({"scale_bar_um": "abc"}, "scale_bar_um must be"), ({"scale_bar_um": -5}, "scale_bar_um must be"),
                             ({"scale_bar_um": True}, "scale_bar_um must be"), ({"fill_alpha": 2.0}, r"fill_alpha must be a number in \[0, 1\]"),
                             ({"fill_alpha": "0.5"}, "fill_alpha must be")):
            with pytest.raises(hc.InvalidInputError, match=message):
                call(**bad)
    with pytest.raises(hc.InvalidInputError, match="cell_type must be one column name"):
        pl.spot_proportions(slide, cell_type=["tumor", "stroma"])
    assert plt.get_fignums() == before  # no half-drawn figure left behind


def survival_frame():
    rng = np.random.default_rng(0)
    x = rng.normal(size=60)
    return pd.DataFrame({"x": x, "duration": rng.exponential(10 * np.exp(-x)), "event": rng.random(60) < 0.8})


def screen_result():
    crops = np.random.default_rng(0).integers(0, 255, size=(6, 16, 16, 3), dtype=np.uint8)
    table = pd.DataFrame({"dominant_cell_state": ["tumor_proliferative"], "p": [0.001]}, index=pd.Index(["pop_3"], name="population"))
    return types.SimpleNamespace(crops=crops, table=table, top="pop_3")


FIGURES = {
    "spot_proportions": lambda s, seg, **kw: pl.spot_proportions(s, cell_type="tumor", **kw),
    "cell_types": lambda s, seg, **kw: pl.cell_types(seg, extent=EXTENT, **kw),
    "niches": lambda s, seg, **kw: pl.niches(s, **kw),
    "confusion_matrix": lambda s, seg, **kw: pl.confusion_matrix(["a", "b", "a"], ["a", "b", "b"], **kw),
    "training_curve": lambda s, seg, **kw: pl.training_curve(history_model(), **kw),
    "kaplan_meier": lambda s, seg, **kw: pl.kaplan_meier(survival_frame(), indicator="x", **kw),
    "screen_crops": lambda s, seg, **kw: pl.screen_crops(screen_result(), n=4, **kw),
}


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_every_plot_takes_ax_figsize_and_return_fig(name, slide, segmented):
    plot = FIGURES[name]
    fig = plot(slide, segmented, figsize=(4.2, 3.1), return_fig=True)
    assert isinstance(fig, plt.Figure) and fig.dpi >= MIN_DPI
    assert tuple(fig.get_size_inches()) == pytest.approx((4.2, 3.1))
    assert fig.get_layout_engine() is not None and type(fig.get_layout_engine()).__name__ == "ConstrainedLayoutEngine"
    fig.canvas.draw()
    for ax in fig.axes:
        assert inside_figure(fig, ax.get_tightbbox(), pad=2.0), f"{name}: labels outside the figure"
    own_fig, own_ax = plt.subplots()
    assert plot(slide, segmented, ax=own_ax) is own_ax
    assert plot(slide, segmented, ax=own_ax, return_fig=True) is own_fig
    with pytest.raises(hc.InvalidInputError, match="one matplotlib Axes"):
        plot(slide, segmented, ax=[own_ax])


def test_predicted_vs_true_figure(slide):
    fig = pl.predicted_vs_true(slide, figsize=(8, 2.5), title="held-out slide", return_fig=True)
    assert fig.dpi >= MIN_DPI and tuple(fig.get_size_inches()) == pytest.approx((8, 2.5)) and fig.get_suptitle() == "held-out slide"


def test_round_length():
    assert [round_length(v) for v in (0.7, 1, 3.3, 64, 199, 250, 7200)] == [0.5, 1, 2, 50, 100, 200, 5000]
