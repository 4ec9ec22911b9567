"""Where a shipped network came from: the script, the commit it was trained at and its arguments (no local paths)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def provenance(script: str, brca_m2c_path: str | Path | None) -> dict:
    """``{"script", "commit", "argv"}`` recorded when training starts; the BRCA-M2C folder becomes ``BRCA_M2C_PATH``."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=Path(script).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    argv = [a if brca_m2c_path is None or a != str(brca_m2c_path) else "BRCA_M2C_PATH" for a in sys.argv[1:]]  # no local paths in a card that ships
    return {"script": f"scripts/{Path(script).name}", "commit": commit, "argv": argv}
