"""The examples run as documented (shortened), from a folder that is not the clone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_python_api_example_defends_the_shipped_victim_and_loads_the_result(tmp_path):
    example = REPO / "examples" / "defend_with_python.py"
    result = subprocess.run([sys.executable, str(example), "--quick"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "runs" / "refine_python" / "version_0" / "defended.safetensors").is_file()
    assert "victim BA" in result.stdout and "the loaded model on the first clean batch" in result.stdout
