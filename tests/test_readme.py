"""The README's real-H&E quick start runs as written (embedded data, shipped weights)."""

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(marker: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- {marker} -->\s*```python\n(.*?)```", text, flags=re.S)
    assert match, f"README has no python block after <!-- {marker} -->"
    return match.group(1)


def test_real_he_quick_start_runs():
    import matplotlib.pyplot as plt

    namespace: dict = {}
    exec(compile(_block("quickstart-real"), "README quick start", "exec"), namespace)
    obs = namespace["sdata"].tables["histocell"].obs
    assert len(obs) > 100  # a 500 µm patch holds hundreds of nuclei
    assert set(obs["cell_type"].cat.categories) <= set(namespace["model"].cell_types)
    assert obs["cell_type"].notna().all()
    plt.close("all")
