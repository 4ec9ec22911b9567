"""The public API: one meaning per name, keys keyword-only, every parameter documented (README "Migrating from 0.1")."""

import inspect
import re

import pytest

import histocell_sd as hc
from histocell_sd._docs import PARAMS, format_docstring

MODULES = ("io", "pp", "tl", "pl", "datasets")
METHODS = ("fit", "sample_inputs", "predict_inputs", "save", "load")

# The only names a public callable may take positionally, and only as its leading parameters: the data it
# works on (and the element kind of io.resolve_key, the split/name of a dataset, the size of a hex grid).
# Everything after them is keyword-only, so a key parameter can never be passed positionally.
LEADING = {
    "sdata", "data", "adata", "samples", "model", "reference", "labels", "inputs", "result", "indicators",
    "path", "paths", "path_or_frame", "image", "mpp", "rgb", "xy", "pred_xy", "true_xy", "true_labels",
    "pred_labels", "y_true", "y_pred", "proportions", "p", "kind", "split", "name", "width_px", "height_px",
    "cell_types",
}  # fmt: skip

# Names retired in 0.2 (see the README): each had several meanings.
RETIRED = {"table_key", "n_neighs", "truth_key", "label_key"}

_PLACEHOLDER = re.compile(r"^\s*\{\w+(?::\w+)?\}\s*$", re.M)


def _public():
    """``(qualified name, callable, signature without self)`` of every public callable and HistoCell method."""
    out = []
    for module in MODULES:
        mod = getattr(hc, module)
        for name in mod.__all__:
            obj = getattr(mod, name)
            if callable(obj):
                out.append((f"{module}.{name}", obj, inspect.signature(obj)))
    out.append(("HistoCell", hc.HistoCell, inspect.signature(hc.HistoCell)))
    for name in METHODS:
        method = getattr(hc.HistoCell, name)
        sig = inspect.signature(method)
        params = [p for p in sig.parameters.values() if p.name != "self"]
        out.append((f"HistoCell.{name}", method, sig.replace(parameters=params)))
    return out


PUBLIC = _public()


def _sections(doc: str) -> dict[str, str]:
    """Numpydoc sections of a cleaned docstring: title -> body."""
    parts = re.split(r"^(\w[\w ]*)\n-{3,}\n", doc, flags=re.M)
    return {title.strip(): body for title, body in zip(parts[1::2], parts[2::2])}


def _documented(section: str) -> dict[str, str]:
    """Parameter entries of a Parameters section: each name (``a, b`` documents both) -> its description."""
    entries, current = {}, None
    for line in section.splitlines():
        if line and not line[0].isspace():
            names = line.split(" : ")[0]
            current = [n.strip().lstrip("*") for n in names.split(",")]
            for n in current:
                entries[n] = ""
        elif current is not None:
            for n in current:
                entries[n] += " " + line.strip()
    return entries


def problems(name: str, obj, sig: inspect.Signature) -> list[str]:
    """Everything wrong with one public callable's signature and docstring (empty when it follows the rules)."""
    found = []
    params = list(sig.parameters.values())
    for p in params:
        if p.name in RETIRED:
            found.append(f"{name}: retired parameter name {p.name!r}")
        if p.kind is p.VAR_POSITIONAL:
            found.append(f"{name}: *{p.name} would take keys positionally")
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    extra = [n for n in positional if n not in LEADING]
    if extra:
        found.append(f"{name}: {extra} can be passed positionally; put them after the `*`")
    if "copy" in sig.parameters and sig.parameters["copy"].default is not False:
        found.append(f"{name}: copy must default to False")
    doc = inspect.getdoc(obj) or ""
    if _PLACEHOLDER.search(doc):
        found.append(f"{name}: unformatted docstring placeholder (missing @inject_docs?)")
    sections = _sections(doc)
    described = sections.get("Parameters", sections.get("Attributes") if inspect.isclass(obj) else None)
    if described is None:
        return found + [f"{name}: no Parameters section"]
    if not inspect.isclass(obj) and "Returns" not in sections:
        found.append(f"{name}: no Returns section")
    entries = _documented(described)
    for p in params:
        if p.name not in entries:
            found.append(f"{name}: parameter {p.name!r} is not documented")
    for key, text in entries.items():
        if key == "key_added" and not re.search(r"\bwrit", text):
            found.append(f"{name}: the key_added docs must say what is written")
        if key == "labels_key" and "Labels2D" not in text:
            found.append(f"{name}: labels_key must name a labels element")
        if key == "nuclei_table_key" and "nuclei table" not in text:
            found.append(f"{name}: nuclei_table_key must be the nuclei table")
        if key == "spots_table_key" and "spots table" not in text:
            found.append(f"{name}: spots_table_key must be the spots table")
    return found


@pytest.mark.parametrize("name, obj, sig", PUBLIC, ids=[p[0] for p in PUBLIC])
def test_public_callable_follows_the_naming_rules(name, obj, sig):
    assert problems(name, obj, sig) == []


def test_the_walk_covers_the_api():
    names = {p[0] for p in PUBLIC}
    assert {"tl.predict", "tl.deconvolve", "pp.segment_nuclei", "io.read_nuclei", "pl.cell_types", "datasets.pseudo_spots",
            "HistoCell.fit", "tl.PhenotypeScreen"} <= names
    assert len(names) >= 60


def test_the_rules_catch_violations():
    def positional_key(sdata, table_key="histocell", *, key_added="x"):
        """Parameters
        ----------
        sdata
            The sample.
        table_key
            The table.
        key_added
            Name of the obs column.

        Returns
        -------
        None
        """

    found = " ".join(problems("f", positional_key, inspect.signature(positional_key)))
    assert "retired parameter name 'table_key'" in found and "can be passed positionally" in found
    assert "key_added docs must say what is written" in found

    def undocumented(sdata, *, spots_table_key=None, copy=True):
        """Nothing."""

    found = " ".join(problems("g", undocumented, inspect.signature(undocumented)))
    assert "no Parameters section" in found and "copy must default to False" in found


def test_key_names_have_one_meaning():
    """A key parameter means the same kind of element in every function that takes it."""
    defaults = {}
    for _, _, sig in PUBLIC:
        for p in sig.parameters.values():
            if p.name in ("nuclei_table_key", "spots_table_key", "image_key", "spots_key", "nuclei_key"):
                defaults.setdefault(p.name, set()).add(p.default)
    assert defaults["nuclei_table_key"] == {"histocell", None}  # None (validate): resolved to "histocell"
    assert defaults["spots_table_key"] <= {"table", None}
    assert defaults["image_key"] == {None} and defaults["spots_key"] == {None}
    assert defaults["nuclei_key"] <= {"nuclei", None}


DEPRECATED = {
    ("pp.store_nuclei", "origin"), ("tl.screen_phenotype", "crop_px"), ("datasets.pseudo_spots", "diameter_um"),
    ("datasets.synthetic_visium", "proportions"), ("HistoCell.fit", "lr"),
}  # fmt: skip
"""Old parameter names that still work with a FutureWarning (README "Migrating")."""


def test_deprecated_parameters_are_documented_last_and_default_to_not_given():
    found = set()
    for name, obj, sig in PUBLIC:
        entries = _documented(_sections(inspect.getdoc(obj) or "").get("Parameters", ""))
        params = list(sig.parameters.values())
        for i, p in enumerate(params):
            if not entries.get(p.name, "").strip().startswith("Deprecated"):
                continue
            found.add((name, p.name))
            assert p.default is None or repr(p.default) == "<not given>", (name, p.name)
            assert all(entries.get(q.name, "").strip().startswith("Deprecated") for q in params[i:]), (name, p.name)
    assert found == DEPRECATED


def test_model_preprocessing_has_one_name():
    """``HistoCell.preprocessing`` is the card's dict; its former name ``config`` warns (``settings`` is the HistoCellConfig)."""
    model = hc.HistoCell(["a", "b"], encoder="scratch")
    assert isinstance(model.settings, hc.models.HistoCellConfig) and model.preprocessing == model.settings.preprocessing
    with pytest.warns(FutureWarning, match=r"HistoCell.config is deprecated; use .preprocessing"):
        assert model.config == model.preprocessing


def test_progress_is_on_by_default_everywhere():
    """One switch silences every bar (hc.settings.progress); a call's progress= defaults to on everywhere."""
    defaults = {name: sig.parameters["progress"].default for name, _, sig in PUBLIC if "progress" in sig.parameters}
    assert len(defaults) >= 8 and set(defaults.values()) == {True}, defaults


def test_n_neighbors_everywhere():
    takers = {name for name, _, sig in PUBLIC if "n_neighbors" in sig.parameters}
    assert {"tl.cell_graph", "tl.screen_phenotype", "HistoCell"} <= takers


def test_copy_where_a_function_writes_into_tables_in_place():
    takers = {name for name, _, sig in PUBLIC if "copy" in sig.parameters}
    assert takers == {"tl.cell_graph", "tl.tissue_architecture", "tl.predict", "tl.deconvolve", "tl.refine_deconvolution"}


def test_docstring_placeholders():
    doc = "Summary.\n\n    Parameters\n    ----------\n    {image_key}\n        More.\n    x\n        ``obsm[f\"{key_added}_y\"]``\n"
    out = format_docstring(doc)
    assert "    image_key\n        Name of the H&E image" in out and out.rstrip().endswith('``obsm[f"{key_added}_y"]``')
    assert "        More." in out
    assert format_docstring("    {nuclei_table_key:written}\n").startswith("    nuclei_table_key\n        Name of the nuclei table this")
    with pytest.raises(KeyError, match="Unknown docstring placeholder"):
        format_docstring("    {no_such_key}\n")
    assert {"image_key", "spots_key", "spots_table_key", "nuclei_key", "nuclei_table_key", "key_added", "progress", "copy",
            "n_neighbors", "seed"} <= set(PARAMS)
