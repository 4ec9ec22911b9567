"""The tutorials' text quotes the numbers their stored outputs show (nbval-lax runs the cells, not the text)."""

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "tutorials").glob("*.ipynb"))
# A number the text quotes from elsewhere (a benchmark, the model card), not from the notebook's outputs.
QUOTED_FROM_ELSEWHERE = {
    "07_visium_hd.ipynb": {"0.642", "0.623"},  # benchmarks/measured/visium_hd.json, seed pairs
}
# Numbers with two or more decimals are results, unless a resolution; one decimal is usually a setting (1.0).
RESULT = re.compile(r"(?<![\w.])[-−]?\d+\.\d{2,}(?:e[-+]?\d+)?(?![\d.])(?!\s*µm/px)")
NUMBER = re.compile(r"-?\d+\.\d+(?:e[-+]?\d+)?")


def _outputs(cell: dict) -> str:
    texts = []
    for output in cell.get("outputs", []):
        texts.append("".join(output.get("text", "")))
        texts += ["".join(v) for k, v in output.get("data", {}).items() if k.startswith("text/")]
    return "\n".join(texts)


def _shown(quoted: str, values: set[float]) -> bool:
    mantissa, _, exponent = quoted.replace("−", "-").partition("e")
    tolerance = 0.5 * 10.0 ** (int(exponent or 0) - len(mantissa.split(".")[1]))
    target = float(mantissa) * 10.0 ** int(exponent or 0)
    return any(abs(value - target) <= tolerance * (1 + 1e-9) for value in values)


def _nearby_values(cells: list[dict], i: int, reach: int = 2) -> set[float]:
    """Numbers in the outputs of the ``reach`` code cells before and after markdown cell ``i`` (what its text describes)."""
    code = [j for j, c in enumerate(cells) if c["cell_type"] == "code"]
    before, after = [j for j in code if j < i][-reach:], [j for j in code if j > i][:reach]
    return {float(n) for j in before + after for n in NUMBER.findall(_outputs(cells[j]))}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_quoted_results_are_in_the_outputs(path):
    cells = json.loads(path.read_text())["cells"]
    exempt = QUOTED_FROM_ELSEWHERE.get(path.name, set())
    stale = [
        m.group()
        for i, c in enumerate(cells)
        if c["cell_type"] == "markdown"
        for m in RESULT.finditer("".join(c["source"]))
        if m.group().lstrip("-−") not in exempt and not _shown(m.group(), _nearby_values(cells, i))
    ]
    assert not stale, f"{path.name} quotes {stale}, which none of its stored outputs shows (re-executed without its text?)"


def test_the_check_finds_a_stale_number(tmp_path):
    notebook = {"cells": [
        {"cell_type": "code", "source": "", "outputs": [{"output_type": "stream", "text": ["ARI 0.7294\n"]}]},
        {"cell_type": "markdown", "source": ["ARI 0.729, z −17.842, FDR 6.28e-02 (6.277e-05 shown)"]},
        {"cell_type": "code", "source": "", "outputs": [{"output_type": "stream", "text": ["FDR 6.277e-05\n"]}]},
    ]}  # fmt: skip
    path = tmp_path / "stale.ipynb"
    path.write_text(json.dumps(notebook))
    with pytest.raises(AssertionError, match=r"\['−17.842', '6.28e-02'\]"):
        test_quoted_results_are_in_the_outputs(path)
